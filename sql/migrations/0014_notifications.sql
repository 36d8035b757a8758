-- outbox schema, version 14: failures reach people (contract 17), and recovery from an
-- automatic disable (contract 9).
--
-- 1. Operational events: outbox.notifications, one row when a webhook's state changes
--    (webhook.failing, webhook.recovered, webhook.disabled) and one per delivery that
--    fails for good (delivery.failed). They are written in the transaction that records
--    the change, from the row of webhook_health that the record locks anyway, so a
--    failing streak has one webhook.failing however many sidecars record its failures.
--    A sidecar with OUTBOX_NOTIFY_URL POSTs them (outbox/notify.py): attempts,
--    next_attempt_at and sent_at say how far that got; the claim moves next_attempt_at
--    on by a lease, and the attempt number tells a late result from the current one.
CREATE TABLE outbox.notifications (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind            text NOT NULL
                    CHECK (kind IN ('webhook.failing', 'webhook.recovered',
                                    'delivery.failed', 'webhook.disabled')),
    account_id      text NOT NULL,
    webhook_id      bigint NOT NULL,
    data            jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    last_error      text
);

-- The sender looks only at unsent rows; retention deletes the oldest first.
CREATE INDEX notifications_unsent ON outbox.notifications (next_attempt_at)
    WHERE sent_at IS NULL;
CREATE INDEX notifications_created ON outbox.notifications (created_at);

-- failing_since: when the current failing streak began (NULL while the newest attempt
-- succeeded), for the page. last_change: what the latest record did to the state,
-- 'failing', 'recovered' or NULL, written by every record so that its RETURNING says
-- whether this very statement changed it (Postgres returns only the new row).
ALTER TABLE outbox.webhook_health ADD COLUMN failing_since timestamptz;
ALTER TABLE outbox.webhook_health ADD COLUMN last_change text;

UPDATE outbox.webhook_health SET failing_since = last_attempt_at
WHERE last_attempt_status = 'failed';

-- record_v2 (429s that use up no retry), and a notification where the state changes
-- (see 1. above).
CREATE FUNCTION outbox.record_v3(p_results json) RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[]; leases uuid[]; attempt_nos int[]; started timestamptz[];
    durations int[]; statuses int[]; errors text[]; outcomes text[];
    retry_ins float8[]; bodies text[]; slowed boolean[];
BEGIN
    -- The results as arrays: the planner takes unnest() of a parameter for a few rows
    -- and looks each delivery up by its key, where json_to_recordset() counts as a
    -- hundred and has it read all of a small table to hash it, once per batch.
    SELECT array_agg(r.id), array_agg(r.lease), array_agg(r.attempt),
           array_agg(r.started_at), array_agg(r.duration_ms), array_agg(r.response_status),
           array_agg(r.error), array_agg(r.outcome), array_agg(r.retry_in),
           array_agg(r.response_body), array_agg(coalesce(r.slowdown, false))
    INTO ids, leases, attempt_nos, started, durations, statuses, errors, outcomes,
         retry_ins, bodies, slowed
    FROM json_to_recordset(p_results)
        AS r (id bigint, lease uuid, attempt int, started_at timestamptz,
              duration_ms int, response_status int, error text, outcome text,
              retry_in float8, response_body text, slowdown boolean);
    RETURN QUERY
    WITH result AS (
        SELECT *
        FROM unnest(ids, leases, attempt_nos, started, durations, statuses, errors,
                    outcomes, retry_ins, bodies, slowed)
            AS r (id, lease, attempt, started_at, duration_ms, response_status, error,
                  outcome, retry_in, response_body, slowdown)
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
            retry_base = d.retry_base + CASE WHEN r.slowdown THEN 1 ELSE 0 END,
            slowdowns = d.slowdowns + CASE WHEN r.slowdown THEN 1 ELSE 0 END,
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
        -- moves the newest attempt back, nor changes the state. The upsert holds the
        -- health row until commit: a concurrent record of the same webhook waits, then
        -- sees this one's state, so only one of them finds it changed.
        INSERT INTO outbox.webhook_health AS h
            (webhook_id, last_attempt_at, last_attempt_status, last_attempt_error,
             last_success_at, failing_since, last_change)
        SELECT n.webhook_id, n.started_at,
               CASE WHEN n.outcome = 'succeeded' THEN 'succeeded' ELSE 'failed' END,
               CASE WHEN n.outcome = 'succeeded' THEN NULL ELSE n.error END,
               n.success_at,
               CASE WHEN n.outcome <> 'succeeded' THEN n.started_at END,
               CASE WHEN n.outcome <> 'succeeded' THEN 'failing' END
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
            last_success_at = greatest(h.last_success_at, excluded.last_success_at),
            failing_since = CASE WHEN excluded.last_attempt_at < h.last_attempt_at
                                 THEN h.failing_since
                                 WHEN excluded.last_attempt_status = 'failed'
                                 THEN coalesce(h.failing_since, excluded.failing_since)
                            END,
            last_change = CASE WHEN excluded.last_attempt_at >= h.last_attempt_at
                                AND excluded.last_attempt_status <> h.last_attempt_status
                               THEN CASE WHEN excluded.last_attempt_status = 'failed'
                                         THEN 'failing' ELSE 'recovered' END
                          END
        RETURNING h.webhook_id, h.last_change, h.last_attempt_error, h.failing_since
    ),
    change AS (
        -- Only where the state changed, and one per delivery that failed for good:
        -- nothing at all for most batches.
        SELECT c.webhook_id, 0 AS rank,
               CASE c.last_change WHEN 'failing' THEN 'webhook.failing'
                                  ELSE 'webhook.recovered' END AS kind,
               c.last_attempt_error AS reason, NULL::bigint AS delivery_id,
               c.failing_since
        FROM health c
        WHERE c.last_change IS NOT NULL
        UNION ALL
        SELECT rec.webhook_id, 1, 'delivery.failed', r.error, rec.id, NULL
        FROM recorded rec JOIN result r USING (id)
        WHERE rec.status = 'failed'
    ),
    noted AS (
        INSERT INTO outbox.notifications (kind, account_id, webhook_id, data)
        SELECT c.kind, w.account_id, w.id,
               jsonb_build_object(
                   'account_id', w.account_id, 'webhook_id', w.id,
                   'webhook_name', w.name, 'url', w.url, 'webhook_event', w.event,
                   'reason', c.reason)
               || CASE WHEN c.delivery_id IS NOT NULL
                       THEN jsonb_build_object('delivery_id', c.delivery_id)
                       ELSE '{}' END
               || CASE WHEN c.failing_since IS NOT NULL
                       THEN jsonb_build_object('failing_since', c.failing_since)
                       ELSE '{}' END
        FROM change c
        JOIN outbox.webhooks w ON w.id = c.webhook_id
        ORDER BY c.webhook_id, c.rank, c.delivery_id
    )
    SELECT DISTINCT rec.webhook_id
    FROM recorded rec
    WHERE rec.status = 'failed';
END
$$;

-- auto_disable_v1, and also: the deliveries its disable cancels say that the product
-- disabled the webhook ('webhook disabled automatically', where a disable by a person
-- says 'webhook disabled'), so that recover_v2 can send them again; and each webhook
-- it disables gets a webhook.disabled notification. plpgsql: the trigger that cancels
-- runs at the end of the UPDATE, and the marking comes after it. Rare (once per webhook
-- that has failed for days), so it may write its cancelled rows twice.
CREATE FUNCTION outbox.auto_disable_v2(p_webhook_ids bigint[], p_after_seconds float8,
                                       p_after_text text)
RETURNS TABLE (id bigint, account_id text, disabled_reason text)
LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[]; accounts text[]; reasons text[];
BEGIN
    WITH target AS (
        -- Locked in id order, so that dispatchers disabling the same webhooks take turns.
        SELECT w.id
        FROM outbox.webhooks w
        WHERE w.id = ANY (p_webhook_ids) AND w.enabled
        ORDER BY w.id
        FOR UPDATE
    ),
    disabled AS (
        UPDATE outbox.webhooks w
        SET enabled = false,
            disabled_reason = format(
                'disabled automatically at %s: deliveries kept failing and none succeeded '
                'for %s (last success: %s)',
                to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                p_after_text,
                coalesce(to_char(h.last_success_at AT TIME ZONE 'UTC',
                                 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                         'never'))
        FROM target t
        LEFT JOIN outbox.webhook_health h ON h.webhook_id = t.id
        WHERE w.id = t.id
          AND w.enabled
          AND coalesce(h.last_success_at, w.created_at)
              <= now() - make_interval(secs => p_after_seconds)
        RETURNING w.id, w.account_id, w.disabled_reason
    )
    SELECT array_agg(d.id ORDER BY d.id), array_agg(d.account_id ORDER BY d.id),
           array_agg(d.disabled_reason ORDER BY d.id)
    INTO ids, accounts, reasons
    FROM disabled d;
    IF ids IS NULL THEN
        RETURN;
    END IF;
    UPDATE outbox.deliveries d
    SET last_error = 'webhook disabled automatically'
    WHERE d.webhook_id = ANY (ids) AND d.status = 'cancelled'
      AND d.finished_at = now() AND d.last_error = 'webhook disabled';
    INSERT INTO outbox.notifications (kind, account_id, webhook_id, data)
    SELECT 'webhook.disabled', w.account_id, w.id,
           jsonb_build_object(
               'account_id', w.account_id, 'webhook_id', w.id, 'webhook_name', w.name,
               'url', w.url, 'webhook_event', w.event,
               'reason', CASE WHEN h.last_attempt_status = 'failed'
                              THEN h.last_attempt_error END,
               'disabled_reason', w.disabled_reason,
               'last_success_at', h.last_success_at)
    FROM outbox.webhooks w
    LEFT JOIN outbox.webhook_health h ON h.webhook_id = w.id
    WHERE w.id = ANY (ids)
    ORDER BY w.id;
    RETURN QUERY SELECT * FROM unnest(ids, accounts, reasons);
END
$$;

-- recover_v1, and the deliveries that an automatic disable cancelled at or after
-- p_since too (their webhook enabled again since): they never had their chance.
CREATE FUNCTION outbox.recover_v2(p_webhook_id bigint, p_since timestamptz)
RETURNS SETOF bigint
LANGUAGE sql AS $$
    UPDATE outbox.deliveries d
    SET status = 'pending', next_attempt_at = now(), retry_base = d.attempts,
        finished_at = NULL, lease = NULL, leased_until = NULL
    FROM outbox.webhooks w
    WHERE w.id = p_webhook_id AND w.enabled
      AND d.webhook_id = w.id AND d.finished_at >= p_since
      AND (d.status = 'failed'
           OR (d.status = 'cancelled' AND d.last_error = 'webhook disabled automatically'))
    RETURNING d.id
$$;

-- The notification sender's claim: up to p_limit unsent notifications that are due,
-- oldest first, each held for p_lease_seconds by moving next_attempt_at on (a sender
-- that dies leaves them due again then). attempt: this attempt's number, which its
-- result gives back to notification_sent_v1.
CREATE FUNCTION outbox.claim_notifications_v1(p_limit integer, p_lease_seconds float8)
RETURNS TABLE (id bigint, kind text, created_at text, data text, attempt integer)
LANGUAGE sql AS $$
    WITH due AS MATERIALIZED (
        SELECT n.id
        FROM outbox.notifications n
        WHERE n.sent_at IS NULL AND n.next_attempt_at <= now()
        ORDER BY n.next_attempt_at, n.id
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE outbox.notifications n
    SET attempts = n.attempts + 1,
        next_attempt_at = now() + make_interval(secs => p_lease_seconds)
    FROM due
    WHERE n.id = due.id
    RETURNING n.id, n.kind,
              to_char(n.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
              n.data::text, n.attempts
$$;

-- One notification attempt's result: sent (p_error NULL), or to be tried again in
-- p_retry_in seconds. Only the latest attempt's result counts.
CREATE FUNCTION outbox.notification_sent_v1(p_id bigint, p_attempt integer, p_error text,
                                            p_retry_in float8)
RETURNS boolean
LANGUAGE sql AS $$
    UPDATE outbox.notifications n
    SET sent_at = CASE WHEN p_error IS NULL THEN now() END,
        last_error = p_error,
        next_attempt_at = CASE WHEN p_error IS NULL THEN n.next_attempt_at
                               ELSE now() + make_interval(secs => p_retry_in) END
    WHERE n.id = p_id AND n.attempts = p_attempt AND n.sent_at IS NULL
    RETURNING true
$$;

-- As every outbox function since version 11: the sidecar's, not PUBLIC's.
REVOKE ALL ON FUNCTION
    outbox.record_v3(json),
    outbox.auto_disable_v2(bigint[], double precision, text),
    outbox.recover_v2(bigint, timestamptz),
    outbox.claim_notifications_v1(integer, double precision),
    outbox.notification_sent_v1(bigint, integer, text, double precision)
FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_sidecar') THEN
        GRANT EXECUTE ON FUNCTION
            outbox.record_v3(json),
            outbox.auto_disable_v2(bigint[], double precision, text),
            outbox.recover_v2(bigint, timestamptz),
            outbox.claim_notifications_v1(integer, double precision),
            outbox.notification_sent_v1(bigint, integer, text, double precision)
        TO outbox_sidecar;
        -- Written by the record and auto-disable functions (which run as the caller),
        -- sent by the notifier, deleted by retention.
        GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.notifications TO outbox_sidecar;
    END IF;
END
$$;
