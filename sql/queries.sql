-- Named queries, loaded and run by outbox/db/: "-- name --" starts each one.
-- Parameters are psycopg's %(name)s placeholders.

-- claim --
-- Take up to %(limit)s due deliveries under a lease, within each webhook's and each
-- account's share of this dispatcher's slots, and each webhook's rate limit (see
-- outbox.claim_v3()).
SELECT * FROM outbox.claim_v3(
    %(limit)s::integer, %(window)s::integer, %(lease)s::uuid, %(lease_seconds)s::float8,
    %(per_webhook)s::integer, %(full_webhooks)s::bigint[], %(busy_webhooks)s::bigint[],
    %(busy_counts)s::bigint[],
    %(per_account)s::integer, %(full_accounts)s::text[], %(busy_accounts)s::text[],
    %(busy_account_counts)s::bigint[], %(pace_ahead)s::float8);

-- record --
-- Store a batch of attempt results in one round trip (outbox.record_v3()), with an
-- operational event where a webhook's state changed; answers the webhooks of
-- deliveries that failed for good, for auto_disable.
SELECT * FROM outbox.record_v3(%(results)s::json);

-- auto_disable --
-- Disable those of the given webhooks that have not succeeded for %(after_seconds)s
-- (outbox.auto_disable_v2()); a statement of its own, right after the record.
SELECT * FROM outbox.auto_disable_v2(
    %(webhook_ids)s::bigint[], %(after_seconds)s::float8, %(after_text)s::text);

-- dispatcher_session --
-- Set on each of a dispatcher's own connections, which run the claim and record
-- queries thousands of times: plan them once, not at every run (planning the claim
-- costs more than running it, and it sits between a commit and its delivery). Left to
-- choose, Postgres would plan the claim at every run, and switch other queries to the
-- plan it made at their sixth run and keep it; a plan made while deliveries or events
-- was empty scans the whole table for every row once it has grown, which on a new
-- install took most of the record query's time. So the dispatcher has the plans made
-- again every few seconds (dispatcher.Connection). Figures: bench/README.md.
SET plan_cache_mode = force_generic_plan;

-- claim_session --
-- The loop's connection does not wait for its claims to reach the disk: that wait would
-- sit between every commit and its delivery. A claim lost in a crash of Postgres (not in
-- a restart, which writes everything first) leaves its rows due again, so they may be
-- sent twice, which at-least-once delivery allows; results are written with the usual
-- durability, and writing one makes every claim before it durable too.
SET synchronous_commit = off;

-- next_due --
-- Seconds until the earliest pending delivery falls due (a retry, a lease running out,
-- or a rate-limited webhook's next attempt); NULL when nothing is pending.
SELECT outbox.next_due_v3(%(pace_ahead)s::float8);

-- arm_doorbell --
-- Held while the dispatcher sleeps, so that producers ring (the doorbell's protocol is
-- described where it is implemented, beside outbox.fan_out() in sql/schema.sql).
SELECT outbox.arm_doorbell_v1();

-- disarm_doorbell --
SELECT outbox.disarm_doorbell_v1();

-- help --
-- A dispatcher with a backlog wakes its idle peers; this costs producers nothing.
SELECT pg_notify('outbox_wake', 'backlog');

-- emit --
SELECT outbox.emit(%(account_id)s, %(event)s, %(data)s::jsonb);

-- webhook_add --
-- A NULL format is the one the URL calls for (outbox.webhooks_guard()).
INSERT INTO outbox.webhooks
    (account_id, name, url, event, secret, enabled, format, headers, rate_limit)
VALUES (%(account_id)s, %(name)s, %(url)s, %(event)s, %(secret)s, %(enabled)s, %(format)s,
        coalesce(%(headers)s::jsonb, '{}'), %(rate_limit)s::integer)
RETURNING id;

-- webhook_get --
SELECT w.id, w.account_id, w.name, w.url, w.event, w.enabled, w.secret,
       CASE WHEN w.previous_secret_expires_at > now() THEN w.previous_secret
       END AS previous_secret,
       w.created_at, w.updated_at, w.format, w.headers, w.rate_limit
FROM outbox.webhooks w
WHERE w.id = %(id)s;

-- webhook_delete --
DELETE FROM outbox.webhooks WHERE id = %(id)s RETURNING id;

-- webhook_status --
-- next_retry_attempt: the number, within its series, of the attempt due at
-- next_retry_at (found among the webhook's pending deliveries only). Of the webhook's
-- own headers, only the names: their values are kept like secrets. failing_since:
-- when the current failing streak began; failed_in_streak: the deliveries that failed
-- for good since then (0 while the webhook is not failing).
SELECT s.id, s.account_id, s.name, s.url, s.event, s.enabled, s.last_delivery_status,
       s.last_delivery_at, s.last_error, s.pending, w.secret IS NOT NULL AS has_secret,
       w.previous_secret_expires_at, w.created_at, w.updated_at, s.format,
       s.retrying, s.last_attempt_at, s.last_attempt_status, s.last_attempt_error,
       s.next_retry_at, s.disabled_reason, retry.next_retry_attempt,
       ARRAY(SELECT k FROM jsonb_object_keys(w.headers) k ORDER BY lower(k)) AS header_names,
       w.rate_limit, h.failing_since, streak.failed_in_streak
FROM outbox.webhook_status s
JOIN outbox.webhooks w USING (id)
LEFT JOIN outbox.webhook_health h ON h.webhook_id = s.id
CROSS JOIN LATERAL (
    SELECT count(*) AS failed_in_streak
    FROM outbox.deliveries f
    WHERE f.webhook_id = s.id AND f.status = 'failed' AND f.finished_at >= h.failing_since
) streak
LEFT JOIN LATERAL (
    SELECT p.attempts - p.retry_base + 1 AS next_retry_attempt
    FROM outbox.deliveries p
    WHERE p.webhook_id = s.id AND p.status = 'pending' AND p.attempts > 0
    ORDER BY p.next_attempt_at, p.id
    LIMIT 1
) retry ON true
WHERE %(account_id)s::text IS NULL OR s.account_id = %(account_id)s
ORDER BY s.account_id, s.id;

-- migrate_lock --
-- Makes concurrent `outbox migrate` runs take turns, one transaction at a time: the key
-- of outbox.lock_key(), written out because the schema may not exist yet. Not a
-- session lock: through a transaction pooler it would be taken on one server
-- connection and stay there, held, after this client has gone.
SELECT pg_advisory_xact_lock(1869968482, 0);

-- migrations_table --
-- Which migrations a database has had; `migrate` makes it before anything else.
CREATE SCHEMA IF NOT EXISTS outbox;
CREATE TABLE IF NOT EXISTS outbox.schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- schema_state --
-- Whether migrate has recorded any version, and whether schema outbox holds anything
-- but the table of versions (relations, types, functions): on an empty database
-- migrate applies sql/schema.sql, and it refuses a schema it did not make.
SELECT EXISTS (SELECT FROM outbox.schema_migrations),
       EXISTS (SELECT FROM pg_class
               WHERE relnamespace = 'outbox'::regnamespace
                 AND relname NOT IN ('schema_migrations', 'schema_migrations_pkey'))
       OR EXISTS (SELECT FROM pg_type
                  WHERE typnamespace = 'outbox'::regnamespace
                    AND typname NOT IN ('schema_migrations', '_schema_migrations'))
       OR EXISTS (SELECT FROM pg_proc WHERE pronamespace = 'outbox'::regnamespace);

-- migration_applied --
SELECT FROM outbox.schema_migrations WHERE version = %(version)s;

-- migration_record --
INSERT INTO outbox.schema_migrations (version, name) VALUES (%(version)s, %(name)s);

-- schema_version_grant --
-- Run by migrate after the migrations: outbox_sidecar (when it exists) reads the
-- schema version, in the table migrate itself creates.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_sidecar') THEN
        GRANT SELECT ON outbox.schema_migrations TO outbox_sidecar;
    END IF;
END
$$;

-- replan --
-- The dispatcher's connections make their plans again now and then (see
-- dispatcher_session).
DISCARD PLANS;

-- listen --
-- The listener's connection: producers and peers NOTIFY here to wake idle dispatchers.
LISTEN outbox_wake;

-- ping --
SELECT 1;

-- schema_version --
-- The newest migration applied (NULL when none is): a primary key's last entry.
SELECT max(version) FROM outbox.schema_migrations;

-- webhook_update --
-- NULL leaves a field as it is; the secret and the rate limit, which may be set to NULL,
-- have their own flags. Headers change by name, whatever its case: %(headers)s gives
-- new values, and null for each header to remove; %(clear_headers)s removes every one
-- first.
UPDATE outbox.webhooks
SET name = coalesce(%(name)s, name),
    url = coalesce(%(url)s, url),
    event = coalesce(%(event)s, event),
    enabled = coalesce(%(enabled)s, enabled),
    format = coalesce(%(format)s, format),
    secret = CASE WHEN %(set_secret)s THEN %(secret)s ELSE secret END,
    headers = CASE WHEN %(headers)s::jsonb IS NULL AND NOT %(clear_headers)s THEN headers ELSE
        (SELECT coalesce(jsonb_object_agg(h.key, h.value), '{}')
         FROM jsonb_each(CASE WHEN %(clear_headers)s THEN '{}' ELSE headers END) h
         WHERE lower(h.key) NOT IN (
             SELECT lower(k) FROM jsonb_object_keys(coalesce(%(headers)s::jsonb, '{}')) k))
        || jsonb_strip_nulls(coalesce(%(headers)s::jsonb, '{}'))
    END,
    rate_limit = CASE WHEN %(set_rate_limit)s THEN %(rate_limit)s::integer ELSE rate_limit END
WHERE id = %(id)s
RETURNING id;

-- webhook_end_overlap --
-- A rotated-out secret stops signing now, also when this statement's transaction has
-- just changed the secret. Naming the column is what says so: outbox.webhooks_guard()
-- tells a NULL written here from the column left alone (see migration 11).
UPDATE outbox.webhooks SET previous_secret_expires_at = NULL WHERE id = %(id)s;

-- token_create --
-- An operator token has no account_id (migration 12).
INSERT INTO outbox.api_tokens (account_id, token_sha256, operator)
VALUES (%(account_id)s, %(token_sha256)s, %(account_id)s::text IS NULL)
RETURNING id;

-- token_list --
-- One account's tokens, or with a NULL account_id the operator tokens.
SELECT id, account_id, operator, created_at, last_used_at
FROM outbox.api_tokens
WHERE account_id = %(account_id)s OR (%(account_id)s::text IS NULL AND operator)
ORDER BY id;

-- token_revoke --
DELETE FROM outbox.api_tokens WHERE id = %(id)s RETURNING id;

-- token_digests --
-- Every token there is, as its digest: the admin server keeps them in memory, so that
-- a token nobody issued is refused without a query of its own.
SELECT token_sha256 FROM outbox.api_tokens;

-- token_account --
-- The account a token belongs to (NULL for an operator token) and whether it is an
-- operator token, or no row. last_used_at is written at most once a
-- minute per token, so a busy client does not turn every read into a write.
WITH token AS (
    SELECT id, account_id, operator, last_used_at
    FROM outbox.api_tokens
    WHERE token_sha256 = %(token_sha256)s
),
touched AS (
    UPDATE outbox.api_tokens t
    SET last_used_at = now()
    FROM token
    WHERE t.id = token.id
      AND (token.last_used_at IS NULL OR token.last_used_at < now() - interval '1 minute')
)
SELECT account_id, operator FROM token;

-- delivery_page --
-- One page of a webhook's delivery log, newest first; %(before)s is the cursor (the
-- last id of the previous page). %(status)s and %(since)s (created at or after), when
-- not NULL, keep only those deliveries. next_attempt_at only means something while pending;
-- while an attempt is under way, it is when that attempt's lease runs out.
-- The wire_ columns rebuild the requests that were sent (outbox.deliverylog.sent_request).
SELECT d.id, d.event_id, e.event, e.occurred_at, d.status, d.attempts,
       CASE WHEN d.status = 'pending' THEN greatest(d.next_attempt_at, d.leased_until)
       END AS next_attempt_at,
       d.last_error, d.last_response_status, d.created_at, d.finished_at,
       to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
           AS wire_timestamp,
       e.data::text AS wire_data, w.url AS wire_url, w.secret AS wire_secret,
       w.previous_secret AS wire_previous_secret,
       w.previous_secret_expires_at AS wire_previous_secret_expires_at,
       w.format AS wire_format, w.updated_at AS wire_updated_at,
       ARRAY(SELECT jsonb_object_keys(w.headers)) AS wire_header_names
FROM outbox.deliveries d
JOIN outbox.events e ON e.id = d.event_id
JOIN outbox.webhooks w ON w.id = d.webhook_id
WHERE d.webhook_id = %(webhook_id)s
  AND (%(before)s::bigint IS NULL OR d.id < %(before)s::bigint)
  AND (%(status)s::text IS NULL OR d.status = %(status)s::text)
  AND (%(since)s::timestamptz IS NULL OR d.created_at >= %(since)s::timestamptz)
ORDER BY d.id DESC
LIMIT %(limit)s;

-- delivery_get --
-- One delivery, for an account (or for anyone when %(account_id)s is NULL).
SELECT d.id, d.event_id, e.event, e.occurred_at, d.status, d.attempts,
       CASE WHEN d.status = 'pending' THEN greatest(d.next_attempt_at, d.leased_until)
       END AS next_attempt_at,
       d.last_error, d.last_response_status, d.created_at, d.finished_at,
       to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
           AS wire_timestamp,
       e.data::text AS wire_data, w.url AS wire_url, w.secret AS wire_secret,
       w.previous_secret AS wire_previous_secret,
       w.previous_secret_expires_at AS wire_previous_secret_expires_at,
       w.format AS wire_format, w.updated_at AS wire_updated_at,
       ARRAY(SELECT jsonb_object_keys(w.headers)) AS wire_header_names
FROM outbox.deliveries d
JOIN outbox.events e ON e.id = d.event_id
JOIN outbox.webhooks w ON w.id = d.webhook_id
WHERE d.id = %(id)s
  AND (%(account_id)s::text IS NULL OR w.account_id = %(account_id)s::text);

-- delivery_attempts --
-- The newest %(per_delivery)s attempts of each delivery, oldest first: replays add
-- attempts without end, and the log renders each one.
SELECT delivery_id, attempt, started_at, duration_ms, response_status, error, response_body
FROM (
    SELECT a.*, row_number() OVER (PARTITION BY delivery_id ORDER BY attempt DESC) AS newest
    FROM outbox.delivery_attempts a
    WHERE delivery_id = ANY (%(ids)s::bigint[])
) a
WHERE newest <= %(per_delivery)s
ORDER BY delivery_id, attempt;

-- delivery_retry --
-- Re-queue one finished delivery as a new series of attempts (outbox.replay_v1()).
SELECT * FROM outbox.replay_v1(%(id)s::bigint, %(account_id)s::text);

-- webhook_recover --
-- Re-queue every delivery of one enabled webhook that failed, or that an automatic
-- disable cancelled, at or after %(since)s.
SELECT outbox.recover_v2(%(webhook_id)s::bigint, %(since)s::timestamptz);

-- wake --
-- Replayed deliveries are due now: tell the dispatchers rather than wait for a poll.
SELECT pg_notify('outbox_wake', 'replay');

-- pending_stats --
-- For /metrics, in one scan of the pending rows: how many are pending and how long ago
-- the oldest was enqueued; how many of them are due (waiting for a dispatcher: not for
-- a retry's time, not under a lease that still runs) and how long the one due longest
-- has waited since it fell due (NULL ages when there is none).
SELECT count(*), extract(epoch FROM now() - min(created_at))::float8,
       count(*) FILTER (WHERE due_at <= now()),
       extract(epoch FROM now() - min(due_at) FILTER (WHERE due_at <= now()))::float8
FROM (
    SELECT created_at, greatest(next_attempt_at, leased_until) AS due_at
    FROM outbox.deliveries WHERE status = 'pending'
) pending;

-- portal_secret --
-- The key that signs portal links, and the time by this database's clock, which is the
-- one clock that minting and opening links go by (replicas' clocks may differ).
SELECT secret, extract(epoch FROM now())::float8 FROM outbox.portal_secret;

-- portal_link_use --
-- Open a link whose signature was checked: whether it is still valid, and whether this
-- is its first use (recording it if so). Nonces of expired links are swept on the way:
-- such a link is refused for its expiry alone.
WITH swept AS (
    DELETE FROM outbox.portal_links_used WHERE expires_at < now()
),
used AS (
    INSERT INTO outbox.portal_links_used (nonce, account_id, expires_at)
    SELECT %(nonce)s, %(account_id)s, %(expires_at)s
    WHERE %(expires_at)s::timestamptz > now()
    ON CONFLICT (nonce) DO NOTHING
    RETURNING nonce
)
SELECT %(expires_at)s::timestamptz > now(), EXISTS (SELECT FROM used);

-- portal_session_create --
WITH swept AS (
    DELETE FROM outbox.portal_sessions WHERE expires_at < now()
)
INSERT INTO outbox.portal_sessions
    (account_id, session_sha256, csrf_token, expires_at, display_name)
VALUES (%(account_id)s, %(session_sha256)s, %(csrf_token)s,
        now() + make_interval(secs => %(seconds)s), %(display_name)s)
RETURNING expires_at;

-- portal_session --
-- The signed-in account of a session cookie, or no row once it has expired.
SELECT account_id, csrf_token, expires_at, display_name
FROM outbox.portal_sessions
WHERE session_sha256 = %(session_sha256)s AND expires_at > now();

-- portal_session_end --
-- Sign out one browser: its Sign out button.
DELETE FROM outbox.portal_sessions WHERE session_sha256 = %(session_sha256)s;

-- portal_sessions_end --
-- Sign an account out everywhere; counts the sessions that were still open (expired
-- rows of the account go too).
WITH ended AS (
    DELETE FROM outbox.portal_sessions WHERE account_id = %(account_id)s
    RETURNING expires_at
)
SELECT count(*) FILTER (WHERE expires_at > now()) FROM ended;

-- prune_cutoff --
-- Retention deletes what finished before this moment; fixed for a whole round, so that
-- a round ends even while deliveries keep finishing.
SELECT now() - make_interval(secs => %(older_than)s);

-- prune_lock --
-- One pruner at a time, batch by batch: each batch's transaction tries this row lock
-- first, and a sidecar that finds it taken leaves the round to the one pruning; `outbox
-- prune` tries again for a bounded time. A transaction lock, because a transaction
-- pooler gives each transaction whichever server connection is free; a row of a table
-- only the sidecar may update, because any role may take any advisory lock.
SELECT true FROM outbox.locks WHERE name = 'prune' FOR UPDATE SKIP LOCKED;

-- forget_expired_secrets --
-- A rotated-out secret whose overlap has ended is no longer kept (the guard clears it).
UPDATE outbox.webhooks SET previous_secret = NULL
WHERE previous_secret IS NOT NULL AND previous_secret_expires_at <= now();

-- prune_deliveries --
-- Delete finished deliveries older than the cutoff with their attempts, oldest first,
-- at most %(rows)s rows in all (a delivery and each of its attempts count one each):
-- deliveries_finished gives them in order, so no statement reads more than it deletes.
-- No row is locked before it is deleted (a lock is one more WAL record per row): the
-- DELETE checks status and age again on a row that changed meanwhile, so a delivery
-- replayed since it was found (pending again) stays, and so do its attempts. Nothing
-- else deletes the attempts (they have no foreign key to cascade). The rows
-- go to each DELETE as an array (= ANY) rather than by a join: a join may be planned
-- as a hash join that reads all of a table, an array is looked up in the primary key.
WITH candidate AS MATERIALIZED (
    SELECT d.id, d.finished_at, d.attempts
    FROM outbox.deliveries d
    WHERE d.status <> 'pending' AND d.finished_at < %(cutoff)s
    ORDER BY d.finished_at
    LIMIT %(rows)s
),
doomed AS (
    SELECT array_agg(c.id) AS ids
    FROM (SELECT id,
                 row_number() OVER w AS n,
                 sum(1 + attempts) OVER w AS rows_so_far
          FROM candidate
          WINDOW w AS (ORDER BY finished_at, id)) c
    -- The first one always, so a delivery with more attempts than a batch still goes.
    WHERE c.rows_so_far <= %(rows)s OR c.n = 1
),
deliveries AS (
    DELETE FROM outbox.deliveries d
    WHERE d.id = ANY ((SELECT ids FROM doomed)::bigint[])
      AND d.status <> 'pending' AND d.finished_at < %(cutoff)s
    RETURNING d.id
),
attempts AS (
    DELETE FROM outbox.delivery_attempts a
    WHERE a.delivery_id = ANY ((SELECT array_agg(id) FROM deliveries)::bigint[])
    RETURNING 1
)
SELECT (SELECT count(*) FROM deliveries), (SELECT count(*) FROM attempts);

-- prune_events --
-- Delete events older than the cutoff that have no delivery left, among the next
-- %(rows)s events in id order after %(after)s: one bounded range of the primary key,
-- whatever the table's size (events has no index on time, to keep the producer's
-- INSERT cheap). Ids follow insertion, and occurred_at defaults to the insertion time,
-- so the old events come first; the caller goes on to the next range while a range had
-- old events in it. Returns how many were deleted, the last id read, and how many of
-- the range were old. Each old event's deliveries are looked up one event at a time
-- (a subquery with LIMIT), never by reading all of deliveries; the doomed ids go to
-- the DELETE as an array, as in prune_deliveries.
WITH scanned AS MATERIALIZED (
    SELECT e.id, e.occurred_at
    FROM outbox.events e
    WHERE e.id > %(after)s
    ORDER BY e.id
    LIMIT %(rows)s
),
doomed AS (
    SELECT array_agg(s.id) AS ids
    FROM scanned s
    WHERE s.occurred_at < %(cutoff)s
      AND (SELECT 1 FROM outbox.deliveries d WHERE d.event_id = s.id LIMIT 1) IS NULL
),
deleted AS (
    DELETE FROM outbox.events e
    WHERE e.id = ANY ((SELECT ids FROM doomed)::bigint[])
    RETURNING 1
)
SELECT (SELECT count(*) FROM deleted), max(id), count(*) FILTER (WHERE occurred_at < %(cutoff)s)
FROM scanned;

-- notifications_claim --
-- Up to %(limit)s operational events due to be POSTed, held for %(lease_seconds)s
-- (outbox.claim_notifications_v1()).
SELECT * FROM outbox.claim_notifications_v1(%(limit)s::integer, %(lease_seconds)s::float8);

-- notification_sent --
-- One notification's attempt: sent, or due again in %(retry_in)s seconds.
SELECT outbox.notification_sent_v1(
    %(id)s::bigint, %(attempt)s::integer, %(error)s::text, %(retry_in)s::float8);

-- prune_notifications --
-- Delete operational events older than the cutoff, oldest first, at most %(rows)s.
WITH doomed AS MATERIALIZED (
    SELECT n.id
    FROM outbox.notifications n
    WHERE n.created_at < %(cutoff)s
    ORDER BY n.created_at
    LIMIT %(rows)s
),
deleted AS (
    DELETE FROM outbox.notifications n
    WHERE n.id = ANY ((SELECT array_agg(id) FROM doomed)::bigint[])
    RETURNING 1
)
SELECT count(*) FROM deleted;
