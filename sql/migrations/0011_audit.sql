-- outbox schema, version 11: what the audit of 2026-12-05 found on the database side.
--
-- 1. A new secret and the end of the overlap in one statement (contract 12):
--    `UPDATE ... SET secret = 'new', previous_secret_expires_at = NULL` (or a past time)
--    ended nothing: the guard gave the old secret its 24 hours whatever the statement
--    said. A NULL is indistinguishable from the column left alone, so a trigger that
--    fires only when the statement names the column marks a NULL written on purpose as
--    '-infinity', which the guard reads as "ends now" and stores as NULL. An old secret
--    whose overlap has ended is no longer kept either.
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

-- 3. The pruners take turns on a row of outbox.locks, not an advisory lock: any role may
--    take any advisory lock, and a producer holding the pruners' one stopped retention
--    for as long as it liked. A row lock needs UPDATE on the table, which only the
--    sidecar has.
CREATE TABLE outbox.locks (
    name text PRIMARY KEY
);
INSERT INTO outbox.locks (name) VALUES ('prune');

-- 2. Nothing of outbox is executable by PUBLIC but what producers need: the checks of
--    outbox.events (valid_event and what it calls) and outbox.emit, granted to
--    outbox_producer. The doorbell, the state functions and the webhooks' rules are the
--    sidecar's; trigger functions need no EXECUTE at all.
REVOKE ALL ON FUNCTION
    outbox.valid_url(text),
    outbox.format_for_url(text),
    outbox.webhooks_disabled(),
    outbox.webhooks_guard(),
    outbox.webhooks_overlap_given(),
    outbox.lock_key(),
    outbox.arm_doorbell_v1(),
    outbox.disarm_doorbell_v1(),
    outbox.auto_disable_v1(bigint[], double precision, text),
    outbox.claim_v1(integer, integer, uuid, double precision, integer, bigint[], bigint[],
                    bigint[], integer, text[], text[], bigint[]),
    outbox.claim_v2(integer, integer, uuid, double precision, integer, bigint[], bigint[],
                    bigint[], integer, text[], text[], bigint[]),
    outbox.record_v1(json),
    outbox.replay_v1(bigint, text),
    outbox.recover_v1(bigint, timestamptz),
    outbox.next_due_v2()
FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_sidecar') THEN
        GRANT EXECUTE ON FUNCTION
            outbox.valid_url(text),
            outbox.format_for_url(text),
            outbox.lock_key(),
            outbox.arm_doorbell_v1(),
            outbox.disarm_doorbell_v1(),
            outbox.auto_disable_v1(bigint[], double precision, text),
            outbox.claim_v1(integer, integer, uuid, double precision, integer, bigint[],
                            bigint[], bigint[], integer, text[], text[], bigint[]),
            outbox.claim_v2(integer, integer, uuid, double precision, integer, bigint[],
                            bigint[], bigint[], integer, text[], text[], bigint[]),
            outbox.record_v1(json),
            outbox.replay_v1(bigint, text),
            outbox.recover_v1(bigint, timestamptz),
            outbox.next_due_v2()
        TO outbox_sidecar;
        GRANT SELECT, UPDATE ON outbox.locks TO outbox_sidecar;
    END IF;
END
$$;
