-- outbox schema, version 5: functions that run with the owner's rights cannot be
-- steered by the caller; producers and the sidecar get roles with only what they need;
-- each webhook has a message format; and what a customer needs to act on a failure
-- (the newest attempt, the receiver's answer, why the product disabled a webhook, a
-- secret that keeps signing while it is rotated).

-- Functions that run as their owner take names from a fixed search_path, never from
-- the caller's: a producer that puts a schema of its own first could otherwise shadow
-- an operator or function that outbox code calls and run it with the owner's rights.
-- The functions they call are schema-qualified as well, so no path is ever consulted.
CREATE OR REPLACE FUNCTION outbox.emit(account_id text, event text, data jsonb DEFAULT '{}',
                                       occurred_at timestamptz DEFAULT NULL) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO outbox.events (account_id, event, data, occurred_at)
    VALUES ($1, $2, coalesce($3, '{}'), coalesce($4, pg_catalog.now()))
    RETURNING id
$$;

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
    IF FOUND AND NOT pg_catalog.pg_try_advisory_xact_lock_shared(1869968482, 1) THEN
        PERFORM pg_catalog.pg_notify('outbox_wake', '');
    END IF;
    RETURN NULL;
END
$$;

-- The event CHECK runs inside outbox.emit() as the owner. VOLATILE because it calls
-- outbox.reject(), which raises: the old IMMUTABLE promised something it did not keep.
CREATE OR REPLACE FUNCTION outbox.valid_event(account_id text, event text, data jsonb)
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

CREATE OR REPLACE FUNCTION outbox.reject_event(name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN outbox.reject(pg_catalog.format(
        'unknown event %L: valid events are %s',
        name, pg_catalog.array_to_string(outbox.event_names(), ', ')));
END
$$;

CREATE OR REPLACE FUNCTION outbox.reject_data(data jsonb) RETURNS boolean
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

-- Webhooks made before formats existed take their URL's format as well (a Slack URL
-- could not have worked with the JSON body); their updated_at stays as it was.
ALTER TABLE outbox.webhooks ADD COLUMN format text;
ALTER TABLE outbox.webhooks DISABLE TRIGGER webhooks_guard;
UPDATE outbox.webhooks SET format = outbox.format_for_url(url);
ALTER TABLE outbox.webhooks ENABLE TRIGGER webhooks_guard;
ALTER TABLE outbox.webhooks
    ALTER COLUMN format SET NOT NULL,
    ADD CONSTRAINT webhooks_format_check
        CHECK (format IN ('json', 'slack', 'discord')
               OR outbox.reject(pg_catalog.format(
                   'format must be json, slack or discord, not %L', format)));

-- Why the product disabled the webhook itself (it kept failing); enabling clears it.
ALTER TABLE outbox.webhooks ADD COLUMN disabled_reason text;

-- A changed secret keeps signing beside the new one until previous_secret_expires_at,
-- so receivers can switch over without losing a delivery.
ALTER TABLE outbox.webhooks
    ADD COLUMN previous_secret text,
    ADD COLUMN previous_secret_expires_at timestamptz;

CREATE OR REPLACE FUNCTION outbox.webhooks_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    used integer;
BEGIN
    IF TG_OP = 'DELETE' THEN
        UPDATE outbox.webhook_quota SET webhooks = webhooks - 1
        WHERE account_id = OLD.account_id;
        DELETE FROM outbox.deliveries WHERE webhook_id = OLD.id;
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

-- The first 1024 bytes of what the receiver answered, as text.
ALTER TABLE outbox.delivery_attempts ADD COLUMN response_body text;

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
    last_success_at     timestamptz
);

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
           min(p.next_attempt_at) FILTER (WHERE p.attempts > 0) AS next_retry_at
    FROM outbox.deliveries p
    WHERE p.webhook_id = w.id AND p.status = 'pending'
) pending
LEFT JOIN outbox.webhook_health h ON h.webhook_id = w.id;

-- Producers may set the columns of an event and nothing else: an id of their own
-- (OVERRIDING SYSTEM VALUE) could make other producers' transactions fail.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_producer') THEN
        REVOKE INSERT ON outbox.events FROM outbox_producer;
        GRANT INSERT (account_id, event, data, occurred_at) ON outbox.events
            TO outbox_producer;
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
        GRANT SELECT ON outbox.webhook_status TO outbox_sidecar;
        -- Tokens are created and revoked by `outbox tokens`; the API only checks them.
        GRANT SELECT, UPDATE (last_used_at) ON outbox.api_tokens TO outbox_sidecar;
        GRANT SELECT ON outbox.portal_secret TO outbox_sidecar;
        GRANT SELECT, INSERT, DELETE ON outbox.portal_links_used TO outbox_sidecar;
        GRANT SELECT, INSERT, DELETE ON outbox.portal_sessions TO outbox_sidecar;
    END IF;
END
$$;
