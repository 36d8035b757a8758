-- The outbox schema, whole: what `outbox migrate` applies, in one transaction, to a
-- database that has none, recording every version it ships as applied. `outbox sql`
-- prints it for review; create a database with `outbox migrate`, not by running this
-- file, or it has no versions recorded and no outbox will run on it.
--
-- sql/migrations/ only upgrade databases that an older outbox migrated, one version at
-- a time. A change goes into both: a new migration, and this file where the object is.
-- tests/db/test_migrations.py holds the two equal (a fresh install against the
-- migrations applied in order, catalogue line by catalogue line).
--
-- Data flow: a producer INSERTs into outbox.events in its own transaction; a statement
-- trigger fans the event out into outbox.deliveries (one row per enabled, subscribed
-- webhook) in that same transaction; dispatchers claim due deliveries, POST them, and
-- record each try in outbox.delivery_attempts. Every rule of the contract is enforced
-- here, so SQL users, the CLI and the API cannot disagree about what is valid.
--
-- The file goes by object: the rules and the tables (each with its checks, triggers
-- and indexes); the fan-out and the doorbell; a delivery's life and the functions that
-- move it; the notifications' sender; the status view; roles and rights.

CREATE SCHEMA IF NOT EXISTS outbox;

-- ======================================================================================
-- Rules: a broken one says what is wrong
-- ======================================================================================

CREATE FUNCTION outbox.event_names() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ARRAY['lead.created', 'lead.scored', 'reply.received', 'message.sent',
                 'ai_response.sent', 'meeting.booked', 'enrichment.completed']
$$;

-- Every rule is CHECK (rule OR outbox.reject...(...)), or on events a function that
-- does the same: a broken rule raises a check_violation with a message a person can act
-- on, instead of the bare "violates check constraint". These functions, which only
-- build the message and raise, run only when a rule is broken. They are VOLATILE so
-- that the planner never evaluates them ahead of time for a constant message, and
-- plpgsql so that it never inlines them: a CHECK is planned for every INSERT statement,
-- and inlining costs the producer even when the rule holds.
CREATE FUNCTION outbox.reject(message text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION '%', message USING ERRCODE = 'check_violation';
END
$$;

CREATE FUNCTION outbox.reject_event(name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN outbox.reject(pg_catalog.format(
        'unknown event %L: valid events are %s',
        name, pg_catalog.array_to_string(outbox.event_names(), ', ')));
END
$$;

-- An absolute https:// URL with a host, and a port (if any) that exists.
CREATE FUNCTION outbox.valid_url(url text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    parts text[] := regexp_match(url,
        '^https://(?:[^/?#@[:space:]]*@)?(\[[0-9a-f:.]+\]|[^][/?#:@[:space:]]+)'
        '(?::([0-9]{1,5}))?(?:[/?#][^[:space:]]*)?$', 'i');
BEGIN
    RETURN length(url) <= 2048 AND parts IS NOT NULL
       AND (parts[2] IS NULL OR parts[2]::integer BETWEEN 1 AND 65535);
END
$$;

-- A webhook's message format: the plain JSON body, or a Slack or Discord message.
-- Created without one, a webhook takes the format its URL calls for.
CREATE FUNCTION outbox.format_for_url(url text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN url ~* '^https://([^/?#@]*@)?hooks\.slack\.com(:[0-9]+)?([/?#]|$)' THEN 'slack'
        WHEN url ~* ('^https://([^/?#@]*@)?((ptb|canary)\.)?(discord|discordapp)\.com'
                     '(:[0-9]+)?/api/(v[0-9]+/)?webhooks/') THEN 'discord'
        ELSE 'json'
    END
$$;

CREATE FUNCTION outbox.reject_data(data jsonb) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN outbox.reject(CASE
        WHEN pg_catalog.jsonb_typeof(data) OPERATOR(pg_catalog.<>) 'object'
            THEN pg_catalog.format('data must be a JSON object, not %s',
                                   pg_catalog.jsonb_typeof(data))
        ELSE pg_catalog.format('data is %s bytes; the limit is 262144',
                               pg_catalog.octet_length(data::pg_catalog.text))
    END);
END
$$;

-- The producer's INSERT is the hot path. Postgres rebuilds every CHECK expression of a
-- table for each INSERT statement, so a CHECK costs in proportion to its size: events
-- has one small CHECK that calls a plpgsql function (whose plans are kept per session)
-- doing all the checks, instead of three CHECKs with a list of names.
CREATE FUNCTION outbox.valid_event(account_id text, event text, data jsonb)
RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF account_id OPERATOR(pg_catalog.=) '' THEN
        RETURN outbox.reject('account_id must not be empty');
    END IF;
    IF NOT event OPERATOR(pg_catalog.=) ANY (outbox.event_names()) THEN
        RETURN outbox.reject_event(event);
    END IF;
    IF pg_catalog.jsonb_typeof(data) OPERATOR(pg_catalog.<>) 'object'
       OR pg_catalog.octet_length(data::pg_catalog.text) OPERATOR(pg_catalog.>) 262144 THEN
        RETURN outbox.reject_data(data);
    END IF;
    RETURN true;
END
$$;

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

-- ======================================================================================
-- Events: what producers write
-- ======================================================================================

CREATE TABLE outbox.events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  text NOT NULL,
    event       text NOT NULL,
    data        jsonb NOT NULL DEFAULT '{}',
    occurred_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_valid CHECK (outbox.valid_event(account_id, event, data))
);

-- ======================================================================================
-- Webhooks: the subscriptions
-- ======================================================================================

CREATE TABLE outbox.webhooks (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id text NOT NULL
               CHECK (account_id <> '' OR outbox.reject('account_id must not be empty')),
    name       text NOT NULL
               CHECK (name !~ '^[[:space:]]*$' OR outbox.reject('name must not be empty')),
    url        text NOT NULL
               CHECK (outbox.valid_url(url)
                      OR outbox.reject('url must be an absolute https:// URL with a host')),
    event      text NOT NULL
               CHECK (event = ANY (outbox.event_names()) OR outbox.reject_event(event)),
    secret     text CHECK (secret IS NULL OR length(secret) >= 16
                           OR outbox.reject('secret must be at least 16 characters')),
    enabled    boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- json, slack or discord: the shape of the body. Left out, the URL's format.
    format     text NOT NULL
               CHECK (format IN ('json', 'slack', 'discord')
                      OR outbox.reject(pg_catalog.format(
                          'format must be json, slack or discord, not %L', format))),
    -- Why the product disabled the webhook itself (it kept failing); enabling clears it.
    disabled_reason text,
    -- A changed secret keeps signing beside the new one until previous_secret_expires_at.
    previous_secret text,
    previous_secret_expires_at timestamptz,
    -- Headers sent with every attempt (CONTRACT section 18).
    headers    jsonb NOT NULL DEFAULT '{}' CHECK (outbox.valid_headers(headers)),
    -- The most attempts that may start per second, across every dispatcher; NULL: no limit.
    rate_limit integer
               CHECK (rate_limit IS NULL OR rate_limit >= 1
                      OR outbox.reject('rate_limit must be at least 1 (attempts per second), '
                                       'or null for no limit'))
);

-- The fan-out looks webhooks up by (account, event) on every producer INSERT.
CREATE INDEX webhooks_subscribed ON outbox.webhooks (account_id, event) WHERE enabled;

-- How many webhooks each account has. Creators update the account's row, so concurrent
-- creates take turns on its lock (or, under REPEATABLE READ, fail to serialize) rather
-- than each counting 9 and both inserting.
CREATE TABLE outbox.webhook_quota (
    account_id text PRIMARY KEY,
    webhooks   integer NOT NULL
);

-- Webhook rules that a CHECK cannot express: the per-account limit, a fixed owner,
-- updated_at; and a deleted webhook takes its deliveries with it.
CREATE FUNCTION outbox.webhooks_guard() RETURNS trigger
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
            IF NEW.previous_secret_expires_at IS NOT DISTINCT FROM OLD.previous_secret_expires_at
            THEN
                -- A new secret alone: the old one signs beside it for a day.
                NEW.previous_secret := OLD.secret;
                NEW.previous_secret_expires_at := now() + interval '24 hours';
            ELSIF NEW.previous_secret_expires_at > now() THEN
                -- The same statement said until when: that wins over the day.
                NEW.previous_secret := OLD.secret;
            ELSE
                -- ... or that the overlap ends now (a leaked secret).
                NEW.previous_secret := NULL;
            END IF;
        ELSIF NEW.previous_secret_expires_at IS NULL
              OR NEW.previous_secret_expires_at <= now() THEN
            -- An overlap that has ended keeps nothing of the old secret.
            NEW.previous_secret := NULL;
        END IF;
        IF NEW.previous_secret_expires_at = '-infinity' THEN
            NEW.previous_secret_expires_at := NULL;
        ELSIF NEW.previous_secret_expires_at = 'infinity' THEN
            RAISE EXCEPTION 'previous_secret_expires_at must be a time, not infinity'
                USING ERRCODE = 'check_violation';
        END IF;
        NEW.updated_at := now();
        RETURN NEW;
    END IF;
    -- A new webhook has no secret to overlap with.
    NEW.previous_secret := NULL;
    NEW.previous_secret_expires_at := NULL;
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

CREATE TRIGGER webhooks_guard BEFORE INSERT OR UPDATE OR DELETE ON outbox.webhooks
    FOR EACH ROW EXECUTE FUNCTION outbox.webhooks_guard();

-- A new secret and the end of the overlap in one statement (contract 12):
-- `UPDATE ... SET secret = 'new', previous_secret_expires_at = NULL` (or a past time).
-- A NULL cannot be told from the column left alone, so a trigger that fires only when
-- the statement names the column marks a NULL written on purpose as '-infinity', which
-- outbox.webhooks_guard() reads as "ends now" and stores as NULL.
CREATE FUNCTION outbox.webhooks_overlap_given() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.previous_secret_expires_at IS NULL THEN
        NEW.previous_secret_expires_at := '-infinity';
    END IF;
    RETURN NEW;
END
$$;

-- Named to fire before webhooks_guard (triggers of a kind fire in name order).
CREATE TRIGGER webhooks_end_overlap BEFORE UPDATE OF previous_secret_expires_at
    ON outbox.webhooks
    FOR EACH ROW EXECUTE FUNCTION outbox.webhooks_overlap_given();

-- A disabled webhook gets nothing: what was still pending is cancelled, not kept for
-- later. (A delivery a concurrent producer adds is cancelled by the claim instead.)
CREATE FUNCTION outbox.webhooks_disabled() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE outbox.deliveries
    SET status = 'cancelled', finished_at = now(), last_error = 'webhook disabled'
    WHERE webhook_id = NEW.id AND status = 'pending';
    RETURN NULL;
END
$$;

CREATE TRIGGER webhooks_disabled AFTER UPDATE OF enabled ON outbox.webhooks
    FOR EACH ROW WHEN (OLD.enabled AND NOT NEW.enabled)
    EXECUTE FUNCTION outbox.webhooks_disabled();

-- A deleted webhook's pace (outbox.webhook_pace, below) goes with it. (A claim that was
-- under way may write it back; such a row is never read.)
CREATE FUNCTION outbox.webhooks_forget_pace() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM outbox.webhook_pace WHERE webhook_id = OLD.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER webhooks_forget_pace AFTER DELETE ON outbox.webhooks
    FOR EACH ROW EXECUTE FUNCTION outbox.webhooks_forget_pace();

-- ======================================================================================
-- Deliveries and their attempts
-- ======================================================================================

CREATE TABLE outbox.deliveries (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- No foreign keys here: they would put a check, and on webhooks a row lock that
    -- every concurrent producer shares (a MultiXact each time), into the producer's
    -- INSERT. Deleting a webhook deletes its deliveries (outbox.webhooks_guard()); a
    -- delivery a concurrent producer adds for it anyway is dropped by the claim.
    event_id             bigint NOT NULL,
    webhook_id           bigint NOT NULL,
    status               text NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'succeeded', 'failed', 'cancelled')),
    attempts             integer NOT NULL DEFAULT 0,
    -- When the next attempt is due. While a dispatcher holds the delivery, leased_until
    -- (below) says when its lease runs out: a crashed dispatcher's rows simply fall due
    -- again, with no sweeper.
    next_attempt_at      timestamptz NOT NULL DEFAULT now(),
    last_error           text,
    last_response_status integer,
    created_at           timestamptz NOT NULL DEFAULT now(),
    finished_at          timestamptz,
    -- Identifies the claim that holds the row; a result is recorded only by its holder.
    lease                uuid,
    -- A replayed delivery goes back to 'pending' as the same row (so the receiver sees
    -- the same X-Webhook-Id) with a fresh series of retries: retry_base is how many
    -- attempts came before the replay. Attempt numbers go on counting, so
    -- delivery_attempts keeps the whole history; the retry schedule counts
    -- attempts - retry_base.
    retry_base           integer NOT NULL DEFAULT 0,
    -- While a dispatcher holds the delivery, when its lease runs out; NULL otherwise.
    -- No index holds it, so that setting it is a HOT update.
    leased_until         timestamptz,
    -- Answers of 429 that did not use up a retry (the first 10 of a delivery,
    -- including those before a replay).
    slowdowns            integer NOT NULL DEFAULT 0
) WITH (
    -- Every delivery is updated two or three times: vacuum early and often so the hot
    -- pending rows stay on few pages.
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02,
    -- Room on each page for the claim's new row versions, so that they stay HOT: a page
    -- filled by producers' INSERTs has no room left, and a claim of its rows then
    -- writes entries in every index of the table (measured in bench/README.md).
    fillfactor = 70
);

-- The claim scans only pending rows, so finished history does not slow it down.
CREATE INDEX deliveries_due ON outbox.deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_pending_by_webhook ON outbox.deliveries (webhook_id)
    WHERE status = 'pending';
CREATE INDEX deliveries_by_webhook ON outbox.deliveries (webhook_id, id);
-- The status view's "last finished delivery" per webhook.
CREATE INDEX deliveries_finished_by_webhook ON outbox.deliveries (webhook_id, finished_at)
    WHERE status IN ('succeeded', 'failed');

-- Retention deletes old finished deliveries and events a bounded batch at a time, each
-- batch found through an index. Finished deliveries, oldest first: partial on finished
-- rows, so the producer's fan-out INSERT (a pending row) writes nothing here; the
-- dispatcher writes one entry when a delivery finishes (that UPDATE changes status, so
-- it writes a new entry in every index anyway: this is one more).
CREATE INDEX deliveries_finished ON outbox.deliveries (finished_at)
    WHERE status <> 'pending';

-- An event is deleted only once no delivery of it is left: without this, finding that
-- out reads all of deliveries. It costs the producer one index entry per delivery its
-- INSERT fans out to, an increasing key, so always the same rightmost page: too little
-- to tell from noise (bench/README.md). Events themselves get no index: retention walks
-- them in id order, which follows their age closely enough (see the prune_events
-- query).
CREATE INDEX deliveries_by_event ON outbox.deliveries (event_id);

-- One row per attempt. No foreign key to its delivery: the check cost a lookup and a
-- row lock of the delivery per attempt, and without it an attempt is one index entry.
-- Attempts are only written by the record functions for a delivery their UPDATE just
-- found, and deleted with their delivery by retention and by outbox.webhooks_guard().
CREATE TABLE outbox.delivery_attempts (
    delivery_id     bigint NOT NULL,
    attempt         integer NOT NULL,
    started_at      timestamptz NOT NULL,
    duration_ms     integer NOT NULL,
    response_status integer,
    error           text,
    PRIMARY KEY (delivery_id, attempt),
    -- The first 1024 bytes of what the receiver answered, as text.
    response_body   text
);

-- ======================================================================================
-- Per webhook: health and pace
-- ======================================================================================

-- The newest attempt of each webhook, and its newest success, kept up to date by the
-- dispatcher with one row per webhook. The status view reads the newest attempt here
-- rather than search attempts of every delivery, and the auto-disable rule reads the
-- last success. No foreign key: a delete of the webhook removes its row
-- (outbox.webhooks_guard()), and a row a late result writes back for a deleted webhook
-- is never read.
CREATE TABLE outbox.webhook_health (
    webhook_id          bigint PRIMARY KEY,
    last_attempt_at     timestamptz NOT NULL,
    last_attempt_status text NOT NULL
                        CHECK (last_attempt_status IN ('succeeded', 'failed')),
    last_attempt_error  text,
    last_success_at     timestamptz,
    -- When the current failing streak began, NULL while the newest attempt succeeded
    -- (for the page); and what the latest record did to the state ('failing',
    -- 'recovered' or NULL), written by every record so that its RETURNING says whether
    -- this very statement changed it (Postgres returns only the new row; record_v3).
    failing_since       timestamptz,
    last_change         text
);

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

-- ======================================================================================
-- Operational events
-- ======================================================================================

-- Operational events (contract 17): one row when a webhook's state changes
-- (webhook.failing, webhook.recovered, webhook.disabled) and one per delivery that fails
-- for good (delivery.failed). They are written in the transaction that records the
-- change, from the row of webhook_health that the record locks anyway, so a failing
-- streak has one webhook.failing however many sidecars record its failures. A sidecar
-- with OUTBOX_NOTIFY_URL POSTs them (outbox/notify.py): attempts, next_attempt_at and
-- sent_at say how far that got; the claim moves next_attempt_at on by a lease, and the
-- attempt number tells a late result from the current one.
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

-- ======================================================================================
-- API tokens and the settings page
-- ======================================================================================

-- A token belongs to one account and sees only that account's webhooks; an operator
-- token acts for any account (the SaaS's backend names it in the Outbox-Account
-- header), so it has no account of its own: account_id is NULL exactly when operator
-- is true. Only a token's SHA-256 digest is kept: the token is 256 random bits, shown
-- once when created, so a fast hash is as good as a slow one and no one can read a
-- token back from here.
CREATE TABLE outbox.api_tokens (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id   text CHECK (account_id IS NULL OR account_id <> ''
                             OR outbox.reject('account_id must not be empty')),
    token_sha256 bytea NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    operator     boolean NOT NULL DEFAULT false,
    CONSTRAINT api_tokens_operator_check
        CHECK ((account_id IS NULL) = operator
               OR outbox.reject('a token has an account_id, or is an operator token without one'))
);

CREATE INDEX api_tokens_by_account ON outbox.api_tokens (account_id, id);

-- The key that signs portal links (HMAC-SHA256): one row, 32 bytes from
-- gen_random_uuid() (pg_strong_random, 244 random bits). It lives here so that every
-- replica accepts the links any replica mints, also after restarts. To rotate it
-- (every link not yet opened stops working; sessions stay):
--   UPDATE outbox.portal_secret SET secret = <32 new random bytes>;
CREATE TABLE outbox.portal_secret (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    secret     bytea NOT NULL CHECK (length(secret) >= 32),
    created_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO outbox.portal_secret (secret)
SELECT decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex');

-- A link works once: opening it records its nonce here. The link's expiry is signed
-- into it and checked against this database's clock, so a nonce is kept only until
-- then; expired rows are swept when the next link is opened.
CREATE TABLE outbox.portal_links_used (
    nonce      text PRIMARY KEY,
    account_id text NOT NULL,
    used_at    timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

CREATE INDEX portal_links_used_expiry ON outbox.portal_links_used (expires_at);

-- A browser signed in to one account's settings page. The cookie holds a random
-- session token; only its SHA-256 is kept, as for API tokens. csrf_token must come
-- back in X-CSRF-Token with every change the page makes. Deleting an account's rows
-- signs it out everywhere; expired rows are swept when the next session starts.
CREATE TABLE outbox.portal_sessions (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id     text NOT NULL
                   CHECK (account_id <> '' OR outbox.reject('account_id must not be empty')),
    session_sha256 bytea NOT NULL UNIQUE,
    csrf_token     text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    -- The name the page shows instead of the account id (POST /api/v1/portal-links'
    -- display_name), carried by the signed link into the session it opens; NULL: the id.
    display_name   text
                   CHECK (display_name IS NULL OR length(display_name) BETWEEN 1 AND 100
                          OR outbox.reject('display_name must be from 1 to 100 characters'))
);

CREATE INDEX portal_sessions_expiry ON outbox.portal_sessions (expires_at);

-- ======================================================================================
-- Locks
-- ======================================================================================

-- The pruners take turns on a row of outbox.locks, not an advisory lock: any role may
-- take any advisory lock, and a producer holding the pruners' one would stop retention
-- for as long as it liked. A row lock needs UPDATE on the table, which only the sidecar
-- has.
CREATE TABLE outbox.locks (
    name text PRIMARY KEY
);
INSERT INTO outbox.locks (name) VALUES ('prune');

-- ======================================================================================
-- The fan-out and the doorbell
-- ======================================================================================

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
-- turns (outbox/db/core.py); with 1, the doorbell. (Pruners take turns on a row of
-- outbox.locks instead: any role may take an advisory lock.)
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
CREATE FUNCTION outbox.fan_out() RETURNS trigger
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

-- Only its trigger may call it: on a table of a producer's own, it would enqueue any
-- event to any account's webhooks.
REVOKE ALL ON FUNCTION outbox.fan_out() FROM PUBLIC;

CREATE TRIGGER events_fan_out AFTER INSERT ON outbox.events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.fan_out();

CREATE FUNCTION outbox.emit(account_id text, event text, data jsonb DEFAULT '{}',
                                       occurred_at timestamptz DEFAULT NULL) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO outbox.events (account_id, event, data, occurred_at)
    VALUES ($1, $2, coalesce($3, '{}'), coalesce($4, pg_catalog.now()))
    RETURNING id
$$;

-- ======================================================================================
-- A delivery's life, and the functions that move it
-- ======================================================================================

-- Every change of a delivery's state is a function of the schema:
--
--   (producer INSERT) --outbox.fan_out()--> pending
--   pending --claim_v3()--> pending under a lease: lease = the claim's id, leased_until =
--       the lease's end; next_attempt_at stays as it was, so the claim changes no
--       indexed column (a HOT update). Also:
--       --> cancelled, when its webhook was disabled meanwhile
--       --> deleted, when its webhook is gone
--   leased --record_v3()--> succeeded | failed (retries used up) | pending (retry due)
--       An answer of 429 that the dispatcher let off (one of the first 10 of the
--       delivery) is an attempt that does not count: retry_base and slowdowns move up
--       with attempts, so the retries still to come are the same.
--   leased, lease run out (its dispatcher died) --> due again, with no sweeper
--   pending --webhook disabled (outbox.webhooks_disabled())--> cancelled
--       ('webhook disabled'; by auto_disable_v2(): 'webhook disabled automatically')
--   succeeded | failed | cancelled --replay_v1()--> pending (a new series of retries:
--       retry_base = attempts); failed, or cancelled by an automatic disable, since a
--       time --recover_v2()--> pending, the same way
--   webhook deleted --> gone (outbox.webhooks_guard()); finished and old --> pruned
--
-- A webhook's rate_limit holds its deliveries back: over the limit they stay pending
-- and unclaimed (claim_v3(), with outbox.webhook_pace), and next_due_v3() says when they
-- may go.
--
-- A webhook's state goes with its deliveries: record_v3() keeps its newest attempt and
-- success in webhook_health and writes webhook.failing, webhook.recovered and
-- delivery.failed notifications; auto_disable_v2() disables one with no success for
-- days and writes webhook.disabled.
--
-- A change to a step adds the next version (claim_v4) beside the old one, so sidecars
-- of the previous release go on working while a deploy rolls: each calls the version it
-- was built with, and stops when the schema check finds a newer schema. A version is
-- dropped once no supported release calls it; until then it stays here, beside its
-- successors.

-- Take up to p_limit due deliveries under a lease. Rows another dispatcher holds are
-- skipped, not waited for. Each webhook and each account has a share of this
-- dispatcher's attempts in flight: webhooks and accounts already at theirs are left
-- out, and none gets more than what is left of its share, so neither one slow endpoint
-- nor one account's many webhooks can fill every slot. Locked rows that are not picked
-- are released when the claim commits. plpgsql, so that each session plans the
-- statement once rather than at every call.
--
-- And rate limits: a webhook with a rate_limit may start an attempt every 1/rate_limit
-- seconds, whichever dispatcher makes it. A claim hands such a webhook the attempts
-- that may start by p_pace_ahead seconds from now, each with its delay (seconds from
-- the end of the claim until it may start), and moves its outbox.webhook_pace on past
-- them. Concurrent claims of one webhook take turns on its pace row: the second waits
-- for the first to commit and builds on what it wrote, so its attempts start after the
-- first's, spaced the same. A webhook whose next start is further off is left out of
-- the scan, so its backlog neither fills the claim's window nor holds a slot another
-- webhook could use; next_due_v3() says when it may go. Webhooks with no rate_limit are
-- claimed exactly as by claim_v2(), with a delay of 0. The lease of a delayed attempt
-- runs from its start. Also returned: the webhook's headers, and how many answers of
-- 429 the delivery has been let off (record_v3()).
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

-- claim_v3() without rate limits, headers or slowdowns, for sidecars that call it. Both
-- skip a row under either's lease, so releases can run side by side until the older
-- sidecars see the new schema and stop (within OUTBOX_SCHEMA_CHECK_INTERVAL of `outbox
-- migrate`).
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

-- claim_v2() plus a move of next_attempt_at to the lease's end, for sidecars whose
-- next_due reads the end of a lease from there. They read the newer claims' leased rows
-- as overdue, so they look again every 20 ms, in vain, until they stop.
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

-- Seconds until the dispatcher should look again: the earliest pending delivery not
-- under a lease, or, when none is due yet, the earliest lease to run out (a dispatcher
-- that died holding it). NULL when nothing is pending. Leased rows keep their
-- next_attempt_at and so sit at the front of deliveries_due; they are few (what is in
-- flight), and only they are read for the second answer.
--
-- And rate limits: the pending deliveries of a webhook that may not start an attempt
-- within p_pace_ahead seconds do not count as due; instead, the moment it may (when it
-- has pending deliveries) does. So a dispatcher with only such a backlog sleeps until
-- its next attempt may be claimed rather than look again and again.
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

-- next_due_v3() without rate limits.
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

-- Store a batch of attempt results: one JSON array, one object per result (one
-- parameter is far cheaper to send than ten arrays). A result counts only while its
-- claim still holds the row: after a lost lease, the new holder's result wins. Each
-- webhook's newest attempt and newest success go to webhook_health. Answers the
-- webhooks of deliveries that failed for good in this batch, for auto_disable_v2().
-- plpgsql, so that each session plans the statement once.
--
-- A result with "slowdown": true (an answer of 429 that the dispatcher let off) does
-- not count towards the delivery's retries: retry_base and slowdowns move up by one with
-- attempts, so the next attempt is the same one of the retry schedule again. And a
-- notification where a webhook's state changes (webhook.failing, webhook.recovered), and
-- one per delivery that failed for good (delivery.failed).
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

-- record_v3() without notifications.
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

-- record_v2() without slowdowns.
CREATE FUNCTION outbox.record_v1(p_results json) RETURNS SETOF bigint
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

-- Disable those of p_webhook_ids that have not had a successful attempt for
-- p_after_seconds (counted from their creation when they never had one), saying why
-- (p_after_text is that time in words). Run right after a record that answered them,
-- as a statement of its own, so that the record never holds delivery rows while it
-- waits for a webhook's row lock (an edit of the webhook holds that lock and may be
-- cancelling those very deliveries). The trigger outbox.webhooks_disabled() cancels
-- their pending deliveries.
--
-- The deliveries its disable cancels then say that the product disabled the webhook
-- ('webhook disabled automatically', where a disable by a person says 'webhook
-- disabled'), so that recover_v2() can send them again; and each webhook it disables
-- gets a webhook.disabled notification. plpgsql: the trigger that cancels runs at the
-- end of the UPDATE, and the marking comes after it. Rare (once per webhook that has
-- failed for days), so it may write its cancelled rows twice.
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

-- auto_disable_v2() without the marking and the notification.
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
            finished_at = NULL, lease = NULL, leased_until = NULL
        FROM target t
        WHERE d.id = t.id AND t.enabled AND t.status <> 'pending'
        RETURNING d.id
    )
    SELECT t.status, t.enabled, r.id IS NOT NULL
    FROM target t
    LEFT JOIN requeued r USING (id)
$$;

-- Every delivery of one enabled webhook that failed at or after p_since, replayed as by
-- outbox.replay_v1(), and those that an automatic disable cancelled at or after p_since
-- (their webhook enabled again since): they never had their chance. Returns their ids.
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

-- recover_v2() without the deliveries an automatic disable cancelled.
CREATE FUNCTION outbox.recover_v1(p_webhook_id bigint, p_since timestamptz)
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

-- ======================================================================================
-- The notifications' sender
-- ======================================================================================

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

-- ======================================================================================
-- The status view
-- ======================================================================================

-- The dashboard: per webhook, its last finished delivery, what is pending, and its
-- newest attempt (from webhook_health). While a retry is under way, its next attempt is
-- when the lease runs out.
CREATE VIEW outbox.webhook_status AS
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

-- ======================================================================================
-- Roles and rights
-- ======================================================================================

-- Producers get exactly what they need and nothing more. The role is cluster-wide,
-- so another database (or a concurrent migrate) may have created it already.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_producer') THEN
        BEGIN
            CREATE ROLE outbox_producer NOLOGIN;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN NULL;
            WHEN insufficient_privilege THEN
                RAISE WARNING 'outbox: cannot create role outbox_producer (%); create it '
                              'as a superuser and rerun migrate to grant it', SQLERRM;
        END;
    END IF;
END
$$;

-- `outbox run` needs no ownership: outbox_sidecar has the rights it uses and no more.
-- Cluster-wide, like outbox_producer.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_sidecar') THEN
        BEGIN
            CREATE ROLE outbox_sidecar NOLOGIN;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN NULL;
            WHEN insufficient_privilege THEN
                RAISE WARNING 'outbox: cannot create role outbox_sidecar (%); create it '
                              'as a superuser and rerun migrate to grant it', SQLERRM;
        END;
    END IF;
END
$$;

-- Nothing of outbox is executable by PUBLIC but what producers need: the checks of
-- outbox.events (valid_event and what it calls) and outbox.emit, granted to
-- outbox_producer. The doorbell, the state functions and the webhooks' rules are the
-- sidecar's; trigger functions need no EXECUTE at all.
REVOKE ALL ON FUNCTION
    outbox.emit(text, text, jsonb, timestamptz),
    outbox.valid_url(text),
    outbox.format_for_url(text),
    outbox.valid_headers(jsonb),
    outbox.webhooks_disabled(),
    outbox.webhooks_guard(),
    outbox.webhooks_overlap_given(),
    outbox.webhooks_forget_pace(),
    outbox.lock_key(),
    outbox.arm_doorbell_v1(),
    outbox.disarm_doorbell_v1(),
    outbox.claim_v1(integer, integer, uuid, double precision, integer, bigint[], bigint[],
                    bigint[], integer, text[], text[], bigint[]),
    outbox.claim_v2(integer, integer, uuid, double precision, integer, bigint[], bigint[],
                    bigint[], integer, text[], text[], bigint[]),
    outbox.claim_v3(integer, integer, uuid, double precision, integer, bigint[], bigint[],
                    bigint[], integer, text[], text[], bigint[], double precision),
    outbox.next_due_v2(),
    outbox.next_due_v3(double precision),
    outbox.record_v1(json),
    outbox.record_v2(json),
    outbox.record_v3(json),
    outbox.auto_disable_v1(bigint[], double precision, text),
    outbox.auto_disable_v2(bigint[], double precision, text),
    outbox.replay_v1(bigint, text),
    outbox.recover_v1(bigint, timestamptz),
    outbox.recover_v2(bigint, timestamptz),
    outbox.claim_notifications_v1(integer, double precision),
    outbox.notification_sent_v1(bigint, integer, text, double precision)
FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_producer') THEN
        GRANT USAGE ON SCHEMA outbox TO outbox_producer;
        -- Producers set the columns of an event and nothing else: an id of their own
        -- (OVERRIDING SYSTEM VALUE) could make other producers' transactions fail.
        GRANT INSERT (account_id, event, data, occurred_at) ON outbox.events
            TO outbox_producer;
        GRANT EXECUTE ON FUNCTION outbox.emit(text, text, jsonb, timestamptz)
            TO outbox_producer;
    END IF;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_sidecar') THEN
        GRANT USAGE ON SCHEMA outbox TO outbox_sidecar;
        -- The delivery log and retention read and delete events; producers write them.
        GRANT SELECT, DELETE ON outbox.events TO outbox_sidecar;
        -- The admin API and the settings page manage webhooks; the dispatcher disables
        -- one that keeps failing. The quota is kept by a trigger that runs as the caller.
        GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.webhooks TO outbox_sidecar;
        GRANT SELECT, INSERT, UPDATE ON outbox.webhook_quota TO outbox_sidecar;
        GRANT SELECT, UPDATE, DELETE ON outbox.deliveries TO outbox_sidecar;
        GRANT SELECT, INSERT, DELETE ON outbox.delivery_attempts TO outbox_sidecar;
        GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.webhook_health TO outbox_sidecar;
        GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.webhook_pace TO outbox_sidecar;
        -- Written by the record and auto-disable functions (which run as the caller),
        -- sent by the notifier, deleted by retention.
        GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.notifications TO outbox_sidecar;
        GRANT SELECT ON outbox.webhook_status TO outbox_sidecar;
        -- Tokens are created and revoked by `outbox tokens`; the API only checks them.
        GRANT SELECT, UPDATE (last_used_at) ON outbox.api_tokens TO outbox_sidecar;
        GRANT SELECT ON outbox.portal_secret TO outbox_sidecar;
        GRANT SELECT, INSERT, DELETE ON outbox.portal_links_used TO outbox_sidecar;
        GRANT SELECT, INSERT, DELETE ON outbox.portal_sessions TO outbox_sidecar;
        GRANT SELECT, UPDATE ON outbox.locks TO outbox_sidecar;
        -- A webhook's checks, run by whoever writes one; the doorbell; the state
        -- functions and the notifications' sender.
        GRANT EXECUTE ON FUNCTION
            outbox.valid_url(text),
            outbox.format_for_url(text),
            outbox.valid_headers(jsonb),
            outbox.lock_key(),
            outbox.arm_doorbell_v1(),
            outbox.disarm_doorbell_v1(),
            outbox.claim_v1(integer, integer, uuid, double precision, integer, bigint[],
                            bigint[], bigint[], integer, text[], text[], bigint[]),
            outbox.claim_v2(integer, integer, uuid, double precision, integer, bigint[],
                            bigint[], bigint[], integer, text[], text[], bigint[]),
            outbox.claim_v3(integer, integer, uuid, double precision, integer, bigint[],
                            bigint[], bigint[], integer, text[], text[], bigint[],
                            double precision),
            outbox.next_due_v2(),
            outbox.next_due_v3(double precision),
            outbox.record_v1(json),
            outbox.record_v2(json),
            outbox.record_v3(json),
            outbox.auto_disable_v1(bigint[], double precision, text),
            outbox.auto_disable_v2(bigint[], double precision, text),
            outbox.replay_v1(bigint, text),
            outbox.recover_v1(bigint, timestamptz),
            outbox.recover_v2(bigint, timestamptz),
            outbox.claim_notifications_v1(integer, double precision),
            outbox.notification_sent_v1(bigint, integer, text, double precision)
        TO outbox_sidecar;
    END IF;
END
$$;
