-- outbox schema, version 13: an endpoint's own headers, rate limits, and answers of 429
-- that do not use up retries (CONTRACT sections 18 and 19).
--
-- What this changes in a delivery's life (the whole of it is at the top of
-- sql/migrations/0007_state_functions.sql, and what version 9 changed, at the top of
-- 0009_lighter_delivery.sql):
--
--   pending --claim_v3()--> pending under a lease, as with claim_v2(), except that a
--       webhook with a rate_limit gets only the attempts that may start within a
--       moment (p_pace_ahead), each with the delay after which it starts.
--       outbox.webhook_pace holds when the webhook's next attempt may start; every
--       attempt handed out moves it on by 1/rate_limit seconds, whichever dispatcher
--       claims it. Deliveries over the limit stay pending and unclaimed, and
--       next_due_v3() says when they may go.
--   leased --record_v2()--> as record_v1(); and an answer of 429 that the dispatcher
--       let off (one of the first 10 of the delivery) is an attempt that does not
--       count: retry_base moves up with attempts, so the retries still to come are the
--       same, and slowdowns counts it.

-- Headers an endpoint wants on every attempt (a credential of its own, say): at most
-- 10, names that are HTTP tokens and not ones outbox sets itself, values of printable
-- ASCII. The message names the header; it never shows a value, which may be a secret.
CREATE FUNCTION outbox.valid_headers(headers jsonb) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    name text;
    value jsonb;
    seen text[] := '{}';  -- the names so far, as given
BEGIN
    IF jsonb_typeof(headers) <> 'object' THEN
        RETURN outbox.reject(format(
            'headers must be a JSON object of header names to values, not %s',
            jsonb_typeof(headers)));
    END IF;
    IF (SELECT count(*) FROM jsonb_object_keys(headers)) > 10 THEN
        RETURN outbox.reject(format('headers has %s headers; the limit is 10',
                                    (SELECT count(*) FROM jsonb_object_keys(headers))));
    END IF;
    FOR name, value IN SELECT * FROM jsonb_each(headers) LOOP
        IF name !~ '^[-!#$%&''*+.^_`|~0-9A-Za-z]{1,64}$' THEN
            RETURN outbox.reject(format(
                'headers: %L is not a header name (1 to 64 letters, digits and '
                '!#$%%&''*+-.^_`|~)', left(name, 80)));
        END IF;
        IF lower(name) IN ('host', 'content-type', 'content-length', 'transfer-encoding',
                           'connection', 'user-agent')
           OR lower(name) LIKE 'x-webhook-%' OR lower(name) LIKE 'webhook-%' THEN
            RETURN outbox.reject(format(
                'headers: %s is set by outbox itself and cannot be given', name));
        END IF;
        IF lower(name) = ANY (SELECT lower(s) FROM unnest(seen) s) THEN
            RETURN outbox.reject(format(
                'headers: %s and %s are the same header (names are not case-sensitive)',
                (SELECT s FROM unnest(seen) s WHERE lower(s) = lower(name) LIMIT 1), name));
        END IF;
        seen := seen || name;
        IF jsonb_typeof(value) <> 'string' THEN
            RETURN outbox.reject(format('headers: the value of %s must be a string, not %s',
                                        name, jsonb_typeof(value)));
        END IF;
        IF length(value #>> '{}') > 1024 THEN
            RETURN outbox.reject(format(
                'headers: the value of %s is %s characters; the limit is 1024',
                name, length(value #>> '{}')));
        END IF;
        IF value #>> '{}' !~ '^[ -~]*$' THEN
            RETURN outbox.reject(format(
                'headers: the value of %s may have only printable ASCII characters '
                '(no line breaks or other control characters)', name));
        END IF;
    END LOOP;
    RETURN true;
END
$$;

ALTER TABLE outbox.webhooks
    ADD COLUMN headers jsonb NOT NULL DEFAULT '{}' CHECK (outbox.valid_headers(headers)),
    -- The most attempts that may start per second, across every dispatcher; NULL: no limit.
    ADD COLUMN rate_limit integer
        CHECK (rate_limit IS NULL OR rate_limit >= 1
               OR outbox.reject('rate_limit must be at least 1 (attempts per second), '
                                'or null for no limit'));

-- Answers of 429 that did not use up a retry (the first 10 of a delivery, including
-- those before a replay).
ALTER TABLE outbox.deliveries ADD COLUMN slowdowns integer NOT NULL DEFAULT 0;

-- When each rate-limited webhook may start its next attempt, for every dispatcher: a
-- claim that hands out n attempts moves next_start_at on by n/rate_limit seconds (from
-- now, if it was past), and last_span is that step. Written by the claims only, one
-- row per webhook, the first time it is claimed with a limit; a webhook whose limit is
-- removed keeps its row unread. No index but the key, so that each claim's update is a
-- HOT update.
CREATE TABLE outbox.webhook_pace (
    webhook_id    bigint PRIMARY KEY,
    next_start_at timestamptz NOT NULL,
    last_span     interval NOT NULL
) WITH (fillfactor = 50);

-- A deleted webhook's pace goes with it. (A claim that was under way may write it back;
-- such a row is never read.)
CREATE FUNCTION outbox.webhooks_forget_pace() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM outbox.webhook_pace WHERE webhook_id = OLD.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER webhooks_forget_pace AFTER DELETE ON outbox.webhooks
    FOR EACH ROW EXECUTE FUNCTION outbox.webhooks_forget_pace();

-- Take up to p_limit due deliveries under a lease (version 13): claim_v2() and rate
-- limits. A webhook with a rate_limit may start an attempt every 1/rate_limit seconds,
-- whichever dispatcher makes it. A claim hands such a webhook the attempts that may
-- start by p_pace_ahead seconds from now, each with its delay (seconds from the end of
-- the claim until it may start), and moves its outbox.webhook_pace on past them.
-- Concurrent claims of one webhook take turns on its pace row: the second waits for
-- the first to commit and builds on what it wrote, so its attempts start after the
-- first's, spaced the same. A webhook whose next start is further off is left out of
-- the scan, so its backlog neither fills the claim's window nor holds a slot another
-- webhook could use; next_due_v3() says when it may go. Webhooks with no rate_limit
-- are claimed exactly as by claim_v2(), with a delay of 0. The lease of a delayed
-- attempt runs from its start. Also returned: the webhook's headers, and how many
-- answers of 429 the delivery has been let off (record_v2()).
CREATE FUNCTION outbox.claim_v3(
    p_limit integer, p_window integer, p_lease uuid, p_lease_seconds float8,
    p_per_webhook integer, p_full_webhooks bigint[], p_busy_webhooks bigint[],
    p_busy_counts bigint[],
    p_per_account integer, p_full_accounts text[], p_busy_accounts text[],
    p_busy_account_counts bigint[], p_pace_ahead float8)
RETURNS TABLE (id bigint, webhook_id bigint, account_id text, attempt integer,
               enabled boolean, event text, "timestamp" text, data text, url text,
               secret text, retry_base integer, previous_secret text, format text,
               headers jsonb, slowdowns integer, delay float8)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    horizon timestamptz := now() + make_interval(secs => p_pace_ahead);
BEGIN
    RETURN QUERY
    WITH pace AS MATERIALIZED (
        -- The rate-limited webhooks whose next attempt may not start at once: a few rows
        -- (those claimed within the last 1/rate_limit seconds or so), read once.
        SELECT p.webhook_id, p.next_start_at
        FROM outbox.webhook_pace p
        JOIN outbox.webhooks w ON w.id = p.webhook_id
        WHERE p.next_start_at > now() AND w.rate_limit IS NOT NULL
    ),
    due AS MATERIALIZED (
        SELECT d.id, d.webhook_id, w.account_id, d.next_attempt_at, w.rate_limit
        FROM outbox.deliveries d
        -- Outer: a delivery whose webhook is gone (account_id NULL) is deleted below.
        LEFT JOIN outbox.webhooks w ON w.id = d.webhook_id
        WHERE d.status = 'pending'
          AND d.next_attempt_at <= now()
          AND (d.leased_until IS NULL OR d.leased_until <= now())
          AND d.webhook_id <> ALL (p_full_webhooks)
          -- Those that may not start one by the horizon are left out.
          AND d.webhook_id <> ALL (ARRAY(SELECT pace.webhook_id FROM pace
                                         WHERE pace.next_start_at > horizon))
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
        SELECT r.id, r.webhook_id, r.account_id, r.next_attempt_at, r.rate_limit, r.rank,
               row_number() OVER (PARTITION BY r.account_id ORDER BY r.next_attempt_at, r.id)
                   AS account_rank
        FROM (SELECT due.id, due.next_attempt_at, due.webhook_id, due.account_id,
                     due.rate_limit,
                     row_number() OVER (PARTITION BY due.webhook_id
                                        ORDER BY due.next_attempt_at, due.id) AS rank
              FROM due
              WHERE due.account_id IS NOT NULL) r
        LEFT JOIN unnest(p_busy_webhooks, p_busy_counts)
            AS busy (webhook_id, in_flight) ON busy.webhook_id = r.webhook_id
        LEFT JOIN pace ON pace.webhook_id = r.webhook_id
        WHERE r.rank <= p_per_webhook - coalesce(busy.in_flight, 0)
          -- A rate-limited webhook gets as many as may start by the horizon.
          AND (r.rate_limit IS NULL
               OR r.rank <= 1 + floor(r.rate_limit * extract(epoch FROM
                      horizon - greatest(now(), pace.next_start_at))))
    ),
    picked AS (
        -- In the order the ranks were counted in, so that each webhook's picked rows are
        -- its first ones, ranked 1, 2, ...: their places in its pace.
        SELECT r.id, r.webhook_id, r.next_attempt_at, r.rate_limit, r.rank
        FROM within_webhook r
        LEFT JOIN unnest(p_busy_accounts, p_busy_account_counts)
            AS busy (account_id, in_flight) ON busy.account_id = r.account_id
        WHERE r.account_rank <= p_per_account - coalesce(busy.in_flight, 0)
        ORDER BY r.next_attempt_at, r.id
        LIMIT p_limit
    ),
    paced_now AS (
        -- Each rate-limited webhook's pace moves on by the attempts picked, after those
        -- of a concurrent claim: the upsert waits for its row and reads it as that
        -- claim left it. In webhook order, so that claims lock pace rows in one order.
        INSERT INTO outbox.webhook_pace AS p (webhook_id, next_start_at, last_span)
        SELECT n.webhook_id, clock_timestamp() + n.span, n.span
        FROM (SELECT pk.webhook_id,
                     make_interval(secs => max(pk.rank)::float8 / pk.rate_limit) AS span
              FROM picked pk
              WHERE pk.rate_limit IS NOT NULL
              GROUP BY pk.webhook_id, pk.rate_limit) n
        ORDER BY n.webhook_id
        ON CONFLICT (webhook_id) DO UPDATE
        SET next_start_at = greatest(p.next_start_at, clock_timestamp()) + excluded.last_span,
            last_span = excluded.last_span
        RETURNING p.webhook_id, p.next_start_at - p.last_span AS first_start
    ),
    spaced AS (
        -- When each attempt of a rate-limited webhook starts: one every 1/rate_limit
        -- seconds from the first; NULL (now) for the others.
        SELECT pk.id,
               pn.first_start + make_interval(secs => (pk.rank - 1)::float8 / pk.rate_limit)
                   AS start_at
        FROM picked pk
        LEFT JOIN paced_now pn ON pn.webhook_id = pk.webhook_id
    )
    UPDATE outbox.deliveries d
    SET leased_until = greatest(now(), s.start_at) + make_interval(secs => p_lease_seconds),
        lease = p_lease,
        -- A concurrent producer can add a delivery for a webhook being disabled; it is
        -- cancelled here rather than sent.
        status = CASE WHEN w.enabled THEN 'pending' ELSE 'cancelled' END,
        finished_at = CASE WHEN w.enabled THEN NULL ELSE now() END,
        last_error = CASE WHEN w.enabled THEN d.last_error ELSE 'webhook disabled' END
    FROM spaced s, outbox.events e, outbox.webhooks w
    WHERE d.id = s.id AND e.id = d.event_id AND w.id = d.webhook_id
    RETURNING d.id, d.webhook_id, w.account_id, d.attempts + 1, w.enabled, e.event,
              to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
              e.data::text, w.url, w.secret, d.retry_base,
              -- A secret being rotated out signs beside the new one until it expires.
              CASE WHEN w.previous_secret_expires_at > now() THEN w.previous_secret END,
              w.format, w.headers, d.slowdowns,
              coalesce(extract(epoch FROM s.start_at - clock_timestamp())::float8, 0);
END
$$;

-- Seconds until the dispatcher should look again (version 13): next_due_v2() with rate
-- limits. The pending deliveries of a webhook that may not start an attempt within
-- p_pace_ahead seconds do not count as due; instead, the moment it may (when it has
-- pending deliveries) does. So a dispatcher with only such a backlog sleeps until its
-- next attempt may be claimed rather than look again and again.
CREATE FUNCTION outbox.next_due_v3(p_pace_ahead float8) RETURNS float8
LANGUAGE plpgsql AS $$
DECLARE
    ahead interval := make_interval(secs => p_pace_ahead);
    paced bigint[];
    paced_until timestamptz;
    due timestamptz;
BEGIN
    SELECT coalesce(array_agg(p.webhook_id), '{}'), min(p.next_start_at) FILTER (WHERE p.waiting)
    INTO paced, paced_until
    FROM (SELECT p.webhook_id, p.next_start_at,
                 EXISTS (SELECT FROM outbox.deliveries d
                         WHERE d.webhook_id = p.webhook_id AND d.status = 'pending') AS waiting
          FROM outbox.webhook_pace p
          JOIN outbox.webhooks w ON w.id = p.webhook_id
          WHERE p.next_start_at > now() + ahead AND w.rate_limit IS NOT NULL) p;
    SELECT d.next_attempt_at INTO due
    FROM outbox.deliveries d
    WHERE d.status = 'pending'
      AND (d.leased_until IS NULL OR d.leased_until <= greatest(now(), d.next_attempt_at))
      AND d.webhook_id <> ALL (paced)
    ORDER BY d.next_attempt_at
    LIMIT 1;
    due := least(due, paced_until - ahead);
    IF due IS NULL OR due > now() THEN
        SELECT least(due, min(d.leased_until)) INTO due
        FROM outbox.deliveries d
        WHERE d.status = 'pending' AND d.next_attempt_at <= now()
          AND d.leased_until > now();
    END IF;
    RETURN extract(epoch FROM due - now());
END
$$;

-- Store a batch of attempt results (version 13): record_v1(), and a result with
-- "slowdown": true (an answer of 429 that the dispatcher let off) does not count
-- towards the delivery's retries: retry_base and slowdowns move up by one with
-- attempts, so the next attempt is the same one of the retry schedule again.
CREATE FUNCTION outbox.record_v2(p_results json) RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[]; leases uuid[]; attempt_nos int[]; started timestamptz[];
    durations int[]; statuses int[]; errors text[]; outcomes text[];
    retry_ins float8[]; bodies text[]; slowed boolean[];
BEGIN
    -- The results as arrays: see record_v1().
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

-- Only the sidecar (and the schema's owner) runs these.
REVOKE ALL ON FUNCTION outbox.valid_headers(jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.webhooks_forget_pace() FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.claim_v3(integer, integer, uuid, double precision, integer,
    bigint[], bigint[], bigint[], integer, text[], text[], bigint[], double precision)
    FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.next_due_v3(double precision) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.record_v2(json) FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_sidecar') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.webhook_pace TO outbox_sidecar;
        -- The check of every webhook's headers, run by whoever writes a webhook.
        GRANT EXECUTE ON FUNCTION outbox.valid_headers(jsonb) TO outbox_sidecar;
        GRANT EXECUTE ON FUNCTION outbox.claim_v3(integer, integer, uuid, double precision,
            integer, bigint[], bigint[], bigint[], integer, text[], text[], bigint[],
            double precision) TO outbox_sidecar;
        GRANT EXECUTE ON FUNCTION outbox.next_due_v3(double precision) TO outbox_sidecar;
        GRANT EXECUTE ON FUNCTION outbox.record_v2(json) TO outbox_sidecar;
    END IF;
END
$$;
