-- outbox schema, version 1.
--
-- Data flow: a producer INSERTs into outbox.events in its own transaction; the
-- statement trigger fans the event out into outbox.deliveries (one row per enabled,
-- subscribed webhook) in that same transaction; dispatchers claim due deliveries,
-- POST them, and record each try in outbox.delivery_attempts.
--
-- Every rule of the contract is enforced here, so SQL users, the CLI and the API
-- cannot disagree about what is valid.

CREATE SCHEMA IF NOT EXISTS outbox;

CREATE FUNCTION outbox.event_names() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ARRAY['lead.created', 'lead.scored', 'reply.received', 'message.sent',
                 'ai_response.sent', 'meeting.booked', 'enrichment.completed']
$$;

-- Every rule is CHECK (rule OR outbox.reject...(...)): a broken rule raises a
-- check_violation with a message a person can act on, instead of the bare "violates
-- check constraint". The producer's INSERT is the hot path, so rules are plain
-- expressions that the planner folds, and these functions, which only build the message
-- and raise, run only when a rule is broken. They are VOLATILE so
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
    RETURN outbox.reject(format('unknown event %L: valid events are %s',
                                name, array_to_string(outbox.event_names(), ', ')));
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

CREATE FUNCTION outbox.reject_data(data jsonb) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN outbox.reject(CASE
        WHEN jsonb_typeof(data) <> 'object'
            THEN format('data must be a JSON object, not %s', jsonb_typeof(data))
        ELSE format('data is %s bytes; the limit is 262144', octet_length(data::text))
    END);
END
$$;

CREATE TABLE outbox.events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  text NOT NULL
                CHECK (account_id <> '' OR outbox.reject('account_id must not be empty')),
    -- The names are spelled out (as in outbox.event_names()): a CHECK is prepared for
    -- every INSERT statement, and inlining a function there costs more than the insert.
    event       text NOT NULL
                CHECK (event IN ('lead.created', 'lead.scored', 'reply.received', 'message.sent',
                                 'ai_response.sent', 'meeting.booked', 'enrichment.completed')
                       OR outbox.reject_event(event)),
    data        jsonb NOT NULL DEFAULT '{}'
                CHECK (jsonb_typeof(data) = 'object' AND octet_length(data::text) <= 262144
                       OR outbox.reject_data(data)),
    occurred_at timestamptz NOT NULL DEFAULT now()
);

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
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The fan-out looks webhooks up by (account, event) on every producer INSERT.
CREATE INDEX webhooks_subscribed ON outbox.webhooks (account_id, event) WHERE enabled;

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
    -- While a dispatcher holds a delivery, this is when its lease runs out: a crashed
    -- dispatcher's rows simply fall due again, with no sweeper.
    next_attempt_at      timestamptz NOT NULL DEFAULT now(),
    last_error           text,
    last_response_status integer,
    created_at           timestamptz NOT NULL DEFAULT now(),
    finished_at          timestamptz,
    -- Identifies the claim that holds the row; a result is recorded only by its holder.
    lease                uuid
) WITH (
    -- Every delivery is updated two or three times: vacuum early and often so the hot
    -- pending rows stay on few pages.
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);

-- The claim scans only pending rows, so finished history does not slow it down.
CREATE INDEX deliveries_due ON outbox.deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_pending_by_webhook ON outbox.deliveries (webhook_id)
    WHERE status = 'pending';
CREATE INDEX deliveries_by_webhook ON outbox.deliveries (webhook_id, id);
-- The status view's "last finished delivery" per webhook.
CREATE INDEX deliveries_finished_by_webhook ON outbox.deliveries (webhook_id, finished_at)
    WHERE status IN ('succeeded', 'failed');

CREATE TABLE outbox.delivery_attempts (
    delivery_id     bigint NOT NULL REFERENCES outbox.deliveries ON DELETE CASCADE,
    attempt         integer NOT NULL,
    started_at      timestamptz NOT NULL,
    duration_ms     integer NOT NULL,
    response_status integer,
    error           text,
    PRIMARY KEY (delivery_id, attempt)
);

-- The producer's INSERT fans out here, inside the producer's transaction: enqueueing
-- is exactly once because it commits or rolls back with the business change.
--
-- SECURITY DEFINER so producers need no rights on deliveries or webhooks; every name
-- and operator is schema-qualified instead of SET search_path, which would cost the
-- producer a configuration save and restore on every INSERT.
--
-- The wake-up: a NOTIFY in the producer's transaction serializes every notifying
-- commit in the cluster. So the producer notifies only when a dispatcher is asleep and
-- has asked for it by holding the doorbell lock (1869968482, 1) exclusively. A producer
-- that finds the lock free holds it shared until it commits, so a dispatcher that goes
-- to sleep (takes the lock, then polls) always sees that producer's rows.
CREATE FUNCTION outbox.fan_out() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    INSERT INTO outbox.deliveries (event_id, webhook_id)
    SELECT e.id, w.id
    FROM new_events e
    JOIN outbox.webhooks w
      ON w.account_id OPERATOR(pg_catalog.=) e.account_id
     AND w.event OPERATOR(pg_catalog.=) e.event
     AND w.enabled;
    IF FOUND AND NOT pg_catalog.pg_try_advisory_xact_lock_shared(1869968482, 1) THEN
        PERFORM pg_catalog.pg_notify('outbox_wake', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_fan_out AFTER INSERT ON outbox.events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.fan_out();

CREATE FUNCTION outbox.emit(account_id text, event text, data jsonb DEFAULT '{}',
                            occurred_at timestamptz DEFAULT NULL) RETURNS bigint
LANGUAGE sql SECURITY DEFINER AS $$
    INSERT INTO outbox.events (account_id, event, data, occurred_at)
    VALUES ($1, $2, coalesce($3, '{}'), coalesce($4, pg_catalog.now()))
    RETURNING id
$$;

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
BEGIN
    IF TG_OP = 'DELETE' THEN
        UPDATE outbox.webhook_quota SET webhooks = webhooks - 1
        WHERE account_id = OLD.account_id;
        DELETE FROM outbox.deliveries WHERE webhook_id = OLD.id;
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF NEW.account_id IS DISTINCT FROM OLD.account_id THEN
            RAISE EXCEPTION 'account_id of a webhook cannot change'
                USING ERRCODE = 'check_violation';
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

CREATE TRIGGER webhooks_guard BEFORE INSERT OR UPDATE OR DELETE ON outbox.webhooks
    FOR EACH ROW EXECUTE FUNCTION outbox.webhooks_guard();

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

CREATE VIEW outbox.webhook_status AS
SELECT w.id, w.account_id, w.name, w.url, w.event, w.enabled,
       last.status AS last_delivery_status,
       last.finished_at AS last_delivery_at,
       CASE WHEN last.status = 'failed' THEN last.last_error END AS last_error,
       (SELECT count(*) FROM outbox.deliveries p
        WHERE p.webhook_id = w.id AND p.status = 'pending') AS pending
FROM outbox.webhooks w
LEFT JOIN LATERAL (
    SELECT d.status, d.finished_at, d.last_error
    FROM outbox.deliveries d
    WHERE d.webhook_id = w.id AND d.status IN ('succeeded', 'failed')
    ORDER BY d.finished_at DESC, d.id DESC
    LIMIT 1
) last ON true;

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

REVOKE ALL ON FUNCTION outbox.emit(text, text, jsonb, timestamptz) FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_producer') THEN
        GRANT USAGE ON SCHEMA outbox TO outbox_producer;
        GRANT INSERT ON outbox.events TO outbox_producer;
        GRANT EXECUTE ON FUNCTION outbox.emit(text, text, jsonb, timestamptz)
            TO outbox_producer;
    END IF;
END
$$;
