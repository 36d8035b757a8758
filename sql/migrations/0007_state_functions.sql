-- outbox schema, version 7: every change of a delivery's state is a function of the
-- schema, versioned, and the sidecar calls the versions it knows.
--
-- A delivery's life, and where each step happens:
--
--   (producer INSERT) --outbox.fan_out()--> pending
--   pending --claim_v1()--> pending under a lease (next_attempt_at = lease end)
--                        \-> cancelled, when its webhook was disabled meanwhile
--   leased --record_v1()--> succeeded | failed (retries used up) | pending (retry due)
--   pending --webhook disabled (outbox.webhooks_disabled())--> cancelled
--   succeeded | failed | cancelled --replay_v1(), recover_v1()--> pending (a new series)
--   webhook deleted --> gone (outbox.webhooks_guard()); finished and old --> pruned
--
-- A migration that changes a step adds the next version (claim_v2) beside the old one,
-- so sidecars of the previous release go on working while a deploy rolls: each calls
-- the version it was built with, and stops when the schema check finds a newer schema.
-- A version is dropped once no supported release calls it.

-- The doorbell: how an idle dispatcher is woken at once without producers paying for
-- NOTIFY. A NOTIFY in a producer's transaction serializes every notifying commit in the
-- cluster, so a producer notifies only when a dispatcher is asleep and has asked for it:
--
-- 1. A dispatcher about to sleep takes the doorbell lock (outbox.lock_key(), 1)
--    exclusively with outbox.arm_doorbell_v1(), which only tries and never waits (a
--    waiting request would make every producer's try below fail, so all would NOTIFY),
--    then polls once more, then sleeps on LISTEN outbox_wake.
-- 2. A producer whose INSERT fanned out to a delivery tries the same lock shared, held
--    until it commits (outbox.fan_out()). If it cannot have it, a dispatcher sleeps:
--    the producer NOTIFYs. If it can, no dispatcher sleeps yet, and the one that goes to
--    sleep next takes the lock only after this producer has committed, so its poll in
--    step 1 sees this producer's rows.
-- 3. A dispatcher that wakes with work to do lets go (outbox.disarm_doorbell_v1()).
--
-- The same key names every advisory lock of outbox: with 0, `outbox migrate` runs take
-- turns (outbox/db.py); with 2, pruners do (outbox/retention.py).
CREATE FUNCTION outbox.lock_key() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 1869968482 $$;

CREATE FUNCTION outbox.arm_doorbell_v1() RETURNS boolean
LANGUAGE sql AS $$ SELECT pg_catalog.pg_try_advisory_lock(outbox.lock_key(), 1) $$;

CREATE FUNCTION outbox.disarm_doorbell_v1() RETURNS boolean
LANGUAGE sql AS $$ SELECT pg_catalog.pg_advisory_unlock(outbox.lock_key(), 1) $$;

-- Step 2 of the doorbell, in the producer's transaction: the fan-out to subscribed
-- webhooks, which makes enqueueing exactly once because it commits or rolls back with
-- the business change. SECURITY DEFINER so producers need no rights on deliveries or
-- webhooks; its search_path is fixed and every name in it schema-qualified, so a
-- producer's own search_path can never make it run the producer's functions with the
-- owner's rights.
CREATE OR REPLACE FUNCTION outbox.fan_out() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO outbox.deliveries (event_id, webhook_id)
    SELECT e.id, w.id
    FROM new_events e
    JOIN outbox.webhooks w
      ON w.account_id OPERATOR(pg_catalog.=) e.account_id
     AND w.event OPERATOR(pg_catalog.=) e.event
     AND w.enabled;
    IF FOUND AND NOT pg_catalog.pg_try_advisory_xact_lock_shared(outbox.lock_key(), 1) THEN
        PERFORM pg_catalog.pg_notify('outbox_wake', '');
    END IF;
    RETURN NULL;
END
$$;

-- Take up to p_limit due deliveries under a lease. Rows another dispatcher holds are
-- skipped, not waited for. Each webhook and each account has a share of this
-- dispatcher's attempts in flight: webhooks and accounts already at theirs are left
-- out, and none gets more than what is left of its share, so neither one slow endpoint
-- nor one account's many webhooks can fill every slot. Locked rows that are not picked
-- are released when the claim commits. plpgsql, so that each session plans the
-- statement once rather than at every call.
CREATE FUNCTION outbox.claim_v1(
    p_limit integer, p_window integer, p_lease uuid, p_lease_seconds float8,
    p_per_webhook integer, p_full_webhooks bigint[], p_busy_webhooks bigint[],
    p_busy_counts bigint[],
    p_per_account integer, p_full_accounts text[], p_busy_accounts text[],
    p_busy_account_counts bigint[])
RETURNS TABLE (id bigint, webhook_id bigint, account_id text, attempt integer,
               enabled boolean, event text, "timestamp" text, data text, url text,
               secret text, retry_base integer, previous_secret text, format text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH due AS MATERIALIZED (
        SELECT d.id, d.webhook_id, w.account_id, d.next_attempt_at
        FROM outbox.deliveries d
        -- Outer: a delivery whose webhook is gone (account_id NULL) is deleted below.
        LEFT JOIN outbox.webhooks w ON w.id = d.webhook_id
        WHERE d.status = 'pending'
          AND d.next_attempt_at <= now()
          AND d.webhook_id <> ALL (p_full_webhooks)
          AND (w.account_id IS NULL OR w.account_id <> ALL (p_full_accounts))
        ORDER BY d.next_attempt_at
        LIMIT p_window
        FOR UPDATE OF d SKIP LOCKED
    ),
    orphaned AS (
        -- A producer that fanned out to a webhook while it was being deleted left a
        -- delivery with no webhook (deliveries have no foreign key; see the schema).
        DELETE FROM outbox.deliveries d
        USING due
        WHERE d.id = due.id
          AND due.account_id IS NULL
    ),
    within_webhook AS (
        SELECT r.id, r.account_id, r.next_attempt_at,
               row_number() OVER (PARTITION BY r.account_id ORDER BY r.next_attempt_at, r.id)
                   AS account_rank
        FROM (SELECT due.id, due.next_attempt_at, due.webhook_id, due.account_id,
                     row_number() OVER (PARTITION BY due.webhook_id
                                        ORDER BY due.next_attempt_at, due.id) AS rank
              FROM due
              WHERE due.account_id IS NOT NULL) r
        LEFT JOIN unnest(p_busy_webhooks, p_busy_counts)
            AS busy (webhook_id, in_flight) ON busy.webhook_id = r.webhook_id
        WHERE r.rank <= p_per_webhook - coalesce(busy.in_flight, 0)
    ),
    picked AS (
        SELECT r.id
        FROM within_webhook r
        LEFT JOIN unnest(p_busy_accounts, p_busy_account_counts)
            AS busy (account_id, in_flight) ON busy.account_id = r.account_id
        WHERE r.account_rank <= p_per_account - coalesce(busy.in_flight, 0)
        ORDER BY r.next_attempt_at
        LIMIT p_limit
    )
    UPDATE outbox.deliveries d
    SET next_attempt_at = now() + make_interval(secs => p_lease_seconds),
        lease = p_lease,
        -- A concurrent producer can add a delivery for a webhook being disabled; it is
        -- cancelled here rather than sent.
        status = CASE WHEN w.enabled THEN 'pending' ELSE 'cancelled' END,
        finished_at = CASE WHEN w.enabled THEN NULL ELSE now() END,
        last_error = CASE WHEN w.enabled THEN d.last_error ELSE 'webhook disabled' END
    FROM picked p, outbox.events e, outbox.webhooks w
    WHERE d.id = p.id AND e.id = d.event_id AND w.id = d.webhook_id
    RETURNING d.id, d.webhook_id, w.account_id, d.attempts + 1, w.enabled, e.event,
              to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
              e.data::text, w.url, w.secret, d.retry_base,
              -- A secret being rotated out signs beside the new one until it expires.
              CASE WHEN w.previous_secret_expires_at > now() THEN w.previous_secret END,
              w.format;
END
$$;

-- A finished delivery (succeeded, failed or cancelled) goes back to pending as a new
-- series of attempts: the same row, so the receiver sees the same X-Webhook-Id, due
-- now, with retry_base moved up to the attempts made so far (the retry schedule counts
-- attempts - retry_base; attempt numbers go on counting). last_error stays until the
-- next attempt replaces it. A pending delivery, or one of a disabled webhook (the claim
-- would cancel it at once), is left alone: the answer's status and enabled say why.
-- With p_account_id, only that account's delivery.
CREATE FUNCTION outbox.replay_v1(p_delivery_id bigint, p_account_id text)
RETURNS TABLE (status text, enabled boolean, requeued boolean)
LANGUAGE sql AS $$
    WITH target AS (
        SELECT d.id, d.status, w.enabled
        FROM outbox.deliveries d
        JOIN outbox.webhooks w ON w.id = d.webhook_id
        WHERE d.id = p_delivery_id
          AND (p_account_id IS NULL OR w.account_id = p_account_id)
        FOR UPDATE OF d
    ),
    requeued AS (
        UPDATE outbox.deliveries d
        SET status = 'pending', next_attempt_at = now(), retry_base = d.attempts,
            finished_at = NULL, lease = NULL
        FROM target t
        WHERE d.id = t.id AND t.enabled AND t.status <> 'pending'
        RETURNING d.id
    )
    SELECT t.status, t.enabled, r.id IS NOT NULL
    FROM target t
    LEFT JOIN requeued r USING (id)
$$;

-- Every delivery of one enabled webhook that failed at or after p_since, replayed as
-- by outbox.replay_v1(). Returns their ids.
CREATE FUNCTION outbox.recover_v1(p_webhook_id bigint, p_since timestamptz)
RETURNS SETOF bigint
LANGUAGE sql AS $$
    UPDATE outbox.deliveries d
    SET status = 'pending', next_attempt_at = now(), retry_base = d.attempts,
        finished_at = NULL, lease = NULL
    FROM outbox.webhooks w
    WHERE w.id = p_webhook_id AND w.enabled
      AND d.webhook_id = w.id AND d.status = 'failed' AND d.finished_at >= p_since
    RETURNING d.id
$$;
