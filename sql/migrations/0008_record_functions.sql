-- outbox schema, version 8: recording attempts, and disabling a webhook that keeps
-- failing, as versioned functions like the other steps of a delivery's life (see
-- version 7).

-- Store a batch of attempt results: one JSON array, one object per result (one
-- parameter is far cheaper to send than ten arrays). A result counts only while its
-- claim still holds the row: after a lost lease, the new holder's result wins. Each
-- webhook's newest attempt and newest success go to webhook_health. Answers the
-- webhooks of deliveries that failed for good in this batch, for auto_disable_v1().
-- plpgsql, so that each session plans the statement once.
CREATE FUNCTION outbox.record_v1(p_results json) RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
    WITH result AS (
        SELECT *
        FROM json_to_recordset(p_results)
            AS r (id bigint, lease uuid, attempt int, started_at timestamptz,
                  duration_ms int, response_status int, error text, outcome text,
                  retry_in float8, response_body text)
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
            lease = NULL
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

-- Disable those of p_webhook_ids that have not had a successful attempt for
-- p_after_seconds (counted from their creation when they never had one), saying why
-- (p_after_text is that time in words). Run right after a record that answered them,
-- as a statement of its own, so that the record never holds delivery rows while it
-- waits for a webhook's row lock (an edit of the webhook holds that lock and may be
-- cancelling those very deliveries). The trigger outbox.webhooks_disabled() cancels
-- their pending deliveries.
CREATE FUNCTION outbox.auto_disable_v1(p_webhook_ids bigint[], p_after_seconds float8,
                                       p_after_text text)
RETURNS TABLE (id bigint, account_id text, disabled_reason text)
LANGUAGE sql AS $$
    WITH target AS (
        -- Locked in id order, so that dispatchers disabling the same webhooks take turns.
        SELECT w.id
        FROM outbox.webhooks w
        WHERE w.id = ANY (p_webhook_ids) AND w.enabled
        ORDER BY w.id
        FOR UPDATE
    )
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
$$;
