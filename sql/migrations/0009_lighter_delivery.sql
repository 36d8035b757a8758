-- outbox schema, version 9: less database work per delivery.
--
-- A claim is a HOT update (claim_v2 and leased_until); the table leaves room on each
-- page for it (fillfactor); a recorded batch looks its rows up by key (record_v1); an
-- attempt no longer checks a foreign key to its delivery. The state machine of version 7
-- is unchanged, except that a claimed delivery keeps its next_attempt_at and is held by
-- leased_until instead:
--
--   pending --claim_v2()--> pending under a lease (leased_until = lease end)

-- While a dispatcher holds a delivery, this is when its lease runs out (claim_v2); NULL
-- otherwise. No index holds it, so that setting it is a HOT update.
ALTER TABLE outbox.deliveries ADD COLUMN leased_until timestamptz;

-- Room on each page for the claim's new row versions, so that they stay HOT: a page
-- filled by producers' INSERTs has no room left, and a claim of its rows then writes
-- entries in every index of the table. New pages only; measured in bench/README.md.
ALTER TABLE outbox.deliveries SET (fillfactor = 70);

-- Without the foreign key, an attempt is one index entry and no check: the check cost
-- a lookup and a row lock of the delivery per attempt. Attempts are only written by
-- record_v1() for a delivery its UPDATE just found, and deleted with their delivery by
-- retention and by outbox.webhooks_guard().
ALTER TABLE outbox.delivery_attempts DROP CONSTRAINT delivery_attempts_delivery_id_fkey;

-- A deleted webhook's attempts go with its deliveries: no foreign key cascades them now.
CREATE OR REPLACE FUNCTION outbox.webhooks_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    used integer;
    gone bigint[];
BEGIN
    IF TG_OP = 'DELETE' THEN
        UPDATE outbox.webhook_quota SET webhooks = webhooks - 1
        WHERE account_id = OLD.account_id;
        -- The deliveries first, then their attempts in a statement of its own: a record
        -- that was writing an attempt holds its delivery's row until it commits, and only
        -- a statement begun after that sees the attempt.
        WITH deleted AS (
            DELETE FROM outbox.deliveries WHERE webhook_id = OLD.id RETURNING id
        )
        SELECT array_agg(id) INTO gone FROM deleted;
        DELETE FROM outbox.delivery_attempts WHERE delivery_id = ANY (gone);
        DELETE FROM outbox.webhook_health WHERE webhook_id = OLD.id;
        RETURN OLD;
    END IF;
    -- A format left out (or NULL) is the one the URL calls for.
    NEW.format := coalesce(NEW.format, outbox.format_for_url(NEW.url));
    IF TG_OP = 'UPDATE' THEN
        IF NEW.account_id IS DISTINCT FROM OLD.account_id THEN
            RAISE EXCEPTION 'account_id of a webhook cannot change'
                USING ERRCODE = 'check_violation';
        END IF;
        IF NEW.enabled AND NOT OLD.enabled THEN
            NEW.disabled_reason := NULL;
        END IF;
        IF NEW.secret IS NULL THEN
            -- No secret, no signature: the old one stops at once too.
            NEW.previous_secret := NULL;
            NEW.previous_secret_expires_at := NULL;
        ELSIF OLD.secret IS NOT NULL AND NEW.secret IS DISTINCT FROM OLD.secret THEN
            NEW.previous_secret := OLD.secret;
            NEW.previous_secret_expires_at := now() + interval '24 hours';
        ELSIF NEW.previous_secret_expires_at IS NULL THEN
            NEW.previous_secret := NULL;
        END IF;
        NEW.updated_at := now();
        RETURN NEW;
    END IF;
    INSERT INTO outbox.webhook_quota AS q (account_id, webhooks) VALUES (NEW.account_id, 1)
    ON CONFLICT (account_id) DO UPDATE SET webhooks = q.webhooks + 1
    RETURNING webhooks INTO used;
    IF used > 10 THEN
        RAISE EXCEPTION 'account % already has 10 webhooks, the limit', NEW.account_id
            USING ERRCODE = 'OB409';
    END IF;
    RETURN NEW;
END
$$;

-- While a retry is under way, its next attempt is when the lease runs out.
CREATE OR REPLACE VIEW outbox.webhook_status AS
SELECT w.id, w.account_id, w.name, w.url, w.event, w.enabled,
       last.status AS last_delivery_status,
       last.finished_at AS last_delivery_at,
       CASE WHEN last.status = 'failed' THEN last.last_error END AS last_error,
       pending.pending,
       pending.retrying,
       h.last_attempt_at,
       h.last_attempt_status,
       CASE WHEN h.last_attempt_status = 'failed' THEN h.last_attempt_error
       END AS last_attempt_error,
       pending.next_retry_at,
       w.format,
       w.disabled_reason
FROM outbox.webhooks w
LEFT JOIN LATERAL (
    SELECT d.status, d.finished_at, d.last_error
    FROM outbox.deliveries d
    WHERE d.webhook_id = w.id AND d.status IN ('succeeded', 'failed')
    ORDER BY d.finished_at DESC, d.id DESC
    LIMIT 1
) last ON true
CROSS JOIN LATERAL (
    -- A pending delivery with an attempt behind it has failed at least once.
    SELECT count(*) AS pending,
           count(*) FILTER (WHERE p.attempts > 0) AS retrying,
           min(greatest(p.next_attempt_at, p.leased_until)) FILTER (WHERE p.attempts > 0)
               AS next_retry_at
    FROM outbox.deliveries p
    WHERE p.webhook_id = w.id AND p.status = 'pending'
) pending
LEFT JOIN outbox.webhook_health h ON h.webhook_id = w.id;

-- The previous release's claim, for its sidecars while a deploy rolls (see claim_v2).
CREATE OR REPLACE FUNCTION outbox.claim_v1(
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
DECLARE
    claimed bigint[] := '{}';
BEGIN
    -- The previous release's sidecars read the end of a lease from next_attempt_at (their
    -- next_due): claim as claim_v2() does, then move next_attempt_at there too.
    FOR id, webhook_id, account_id, attempt, enabled, event, "timestamp", data, url, secret,
        retry_base, previous_secret, format IN
        SELECT * FROM outbox.claim_v2(
            p_limit, p_window, p_lease, p_lease_seconds, p_per_webhook, p_full_webhooks,
            p_busy_webhooks, p_busy_counts, p_per_account, p_full_accounts,
            p_busy_accounts, p_busy_account_counts)
    LOOP
        claimed := claimed || id;
        RETURN NEXT;
    END LOOP;
    UPDATE outbox.deliveries d
    SET next_attempt_at = d.leased_until
    WHERE d.id = ANY (claimed) AND d.status = 'pending';
END
$$;

-- The claim of version 7 with one change: the lease is leased_until, a column no index
-- holds, and next_attempt_at stays as it was. The claim then changes no indexed column,
-- so Postgres writes the new row version beside the old one on the same page (a HOT
-- update) with no new entry in any of the table's indexes, where moving next_attempt_at
-- wrote one in each. claim_v1() is now this claim plus that move, for the previous
-- release's sidecars: both skip a row under either's lease, so the two releases can run
-- side by side until the older sidecars see the new schema and stop (within
-- OUTBOX_SCHEMA_CHECK_INTERVAL of `outbox migrate`). Meanwhile their next_due reads
-- the new sidecars' leased rows as overdue, so they look again every 20 ms, in vain.
CREATE FUNCTION outbox.claim_v2(
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
          AND (d.leased_until IS NULL OR d.leased_until <= now())
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
        RETURNING d.id
    ),
    orphaned_attempts AS (
        -- Attempts too, if one was made while the webhook's delete was under way.
        DELETE FROM outbox.delivery_attempts a
        USING orphaned o
        WHERE a.delivery_id = o.id
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
    SET leased_until = now() + make_interval(secs => p_lease_seconds),
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

CREATE OR REPLACE FUNCTION outbox.record_v1(p_results json) RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[]; leases uuid[]; attempt_nos int[]; started timestamptz[];
    durations int[]; statuses int[]; errors text[]; outcomes text[];
    retry_ins float8[]; bodies text[];
BEGIN
    -- The results as arrays: the planner takes unnest() of a parameter for a few rows
    -- and looks each delivery up by its key, where json_to_recordset() counts as a
    -- hundred and has it read all of a small table to hash it, once per batch.
    SELECT array_agg(r.id), array_agg(r.lease), array_agg(r.attempt),
           array_agg(r.started_at), array_agg(r.duration_ms), array_agg(r.response_status),
           array_agg(r.error), array_agg(r.outcome), array_agg(r.retry_in),
           array_agg(r.response_body)
    INTO ids, leases, attempt_nos, started, durations, statuses, errors, outcomes,
         retry_ins, bodies
    FROM json_to_recordset(p_results)
        AS r (id bigint, lease uuid, attempt int, started_at timestamptz,
              duration_ms int, response_status int, error text, outcome text,
              retry_in float8, response_body text);
    RETURN QUERY
    WITH result AS (
        SELECT *
        FROM unnest(ids, leases, attempt_nos, started, durations, statuses, errors,
                    outcomes, retry_ins, bodies)
            AS r (id, lease, attempt, started_at, duration_ms, response_status, error,
                  outcome, retry_in, response_body)
    ),
    recorded AS (
        UPDATE outbox.deliveries d
        SET attempts = r.attempt,
            status = CASE WHEN d.status = 'pending' THEN r.outcome ELSE d.status END,
            next_attempt_at = CASE WHEN r.outcome = 'pending'
                                   THEN now() + make_interval(secs => r.retry_in)
                                   ELSE d.next_attempt_at END,
            finished_at = CASE WHEN d.status = 'pending' AND r.outcome <> 'pending'
                               THEN now() ELSE d.finished_at END,
            last_error = CASE WHEN d.status = 'pending' THEN r.error ELSE d.last_error END,
            last_response_status = r.response_status,
            lease = NULL,
            leased_until = NULL
        FROM result r
        WHERE d.id = r.id AND d.lease = r.lease
        RETURNING d.id, d.webhook_id, d.status
    ),
    attempts AS (
        INSERT INTO outbox.delivery_attempts
            (delivery_id, attempt, started_at, duration_ms, response_status, error,
             response_body)
        SELECT r.id, r.attempt, r.started_at, r.duration_ms, r.response_status, r.error,
               r.response_body
        FROM result r JOIN recorded USING (id)
        ON CONFLICT DO NOTHING
    ),
    newest AS (
        -- Per webhook, the batch's newest attempt and its newest success. Sorted by
        -- webhook so that concurrent batches lock health rows in the same order.
        SELECT DISTINCT ON (rec.webhook_id)
               rec.webhook_id, r.started_at, r.outcome, r.error,
               max(r.started_at) FILTER (WHERE r.outcome = 'succeeded')
                   OVER (PARTITION BY rec.webhook_id) AS success_at
        FROM result r JOIN recorded rec USING (id)
        ORDER BY rec.webhook_id, r.started_at DESC, r.id DESC
    ),
    health AS (
        -- A result that arrives late (an older attempt than the one stored) never
        -- moves the newest attempt back.
        INSERT INTO outbox.webhook_health AS h
            (webhook_id, last_attempt_at, last_attempt_status, last_attempt_error,
             last_success_at)
        SELECT n.webhook_id, n.started_at,
               CASE WHEN n.outcome = 'succeeded' THEN 'succeeded' ELSE 'failed' END,
               CASE WHEN n.outcome = 'succeeded' THEN NULL ELSE n.error END,
               n.success_at
        FROM newest n
        ORDER BY n.webhook_id
        ON CONFLICT (webhook_id) DO UPDATE
        SET last_attempt_at = greatest(h.last_attempt_at, excluded.last_attempt_at),
            last_attempt_status = CASE WHEN excluded.last_attempt_at >= h.last_attempt_at
                                       THEN excluded.last_attempt_status
                                       ELSE h.last_attempt_status END,
            last_attempt_error = CASE WHEN excluded.last_attempt_at >= h.last_attempt_at
                                      THEN excluded.last_attempt_error
                                      ELSE h.last_attempt_error END,
            last_success_at = greatest(h.last_success_at, excluded.last_success_at)
    )
    SELECT DISTINCT rec.webhook_id
    FROM recorded rec
    WHERE rec.status = 'failed';
END
$$;

CREATE OR REPLACE FUNCTION outbox.replay_v1(p_delivery_id bigint, p_account_id text)
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
            finished_at = NULL, lease = NULL, leased_until = NULL
        FROM target t
        WHERE d.id = t.id AND t.enabled AND t.status <> 'pending'
        RETURNING d.id
    )
    SELECT t.status, t.enabled, r.id IS NOT NULL
    FROM target t
    LEFT JOIN requeued r USING (id)
$$;

CREATE OR REPLACE FUNCTION outbox.recover_v1(p_webhook_id bigint, p_since timestamptz)
RETURNS SETOF bigint
LANGUAGE sql AS $$
    UPDATE outbox.deliveries d
    SET status = 'pending', next_attempt_at = now(), retry_base = d.attempts,
        finished_at = NULL, lease = NULL, leased_until = NULL
    FROM outbox.webhooks w
    WHERE w.id = p_webhook_id AND w.enabled
      AND d.webhook_id = w.id AND d.status = 'failed' AND d.finished_at >= p_since
    RETURNING d.id
$$;

-- Seconds until the dispatcher should look again: the earliest pending delivery not under
-- a lease, or, when none is due yet, the earliest lease to run out (a dispatcher that
-- died holding it). NULL when nothing is pending. Leased rows keep their next_attempt_at
-- and so sit at the front of deliveries_due; they are few (what is in flight), and only
-- they are read for the second answer.
CREATE FUNCTION outbox.next_due_v2() RETURNS float8
LANGUAGE plpgsql AS $$
DECLARE
    due timestamptz;
BEGIN
    SELECT d.next_attempt_at INTO due
    FROM outbox.deliveries d
    WHERE d.status = 'pending'
      -- (A lease of claim_v1 moved next_attempt_at to its end: that row counts.)
      AND (d.leased_until IS NULL OR d.leased_until <= greatest(now(), d.next_attempt_at))
    ORDER BY d.next_attempt_at
    LIMIT 1;
    IF due IS NULL OR due > now() THEN
        SELECT least(due, min(d.leased_until)) INTO due
        FROM outbox.deliveries d
        WHERE d.status = 'pending' AND d.next_attempt_at <= now()
          AND d.leased_until > now();
    END IF;
    RETURN extract(epoch FROM due - now());
END
$$;
