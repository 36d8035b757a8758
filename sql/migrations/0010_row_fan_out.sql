-- outbox schema, version 10: a producer's INSERT costs less.
--
-- The checks of an event move from a CHECK constraint into the fan-out trigger, and the
-- trigger runs for each row before it is written instead of once per statement after
-- it. The rules, their messages and the deliveries written are unchanged.

ALTER TABLE outbox.events DROP CONSTRAINT events_valid;
DROP FUNCTION outbox.valid_event(text, text, jsonb);
DROP TRIGGER events_fan_out ON outbox.events;
DROP FUNCTION outbox.fan_out();

-- Step 2 of the doorbell, in the producer's transaction: the checks of the event, then
-- the fan-out to subscribed webhooks, which makes enqueueing exactly once because it
-- commits or rolls back with the business change. A row trigger, before the row is
-- written: a producer's single-event INSERT then pays for no transition table, no
-- queued after-trigger event and no per-statement rebuild of a CHECK expression (about
-- a tenth of its Postgres CPU, measured in bench/README.md); a multi-row INSERT pays a
-- fan-out statement per row instead of one in all. NULLs pass the checks here and fail
-- the columns' NOT NULL after. SECURITY DEFINER so producers need no rights on
-- deliveries or webhooks; its search_path is fixed and every name in it
-- schema-qualified, so a producer's own search_path can never make it run the
-- producer's functions with the owner's rights.
CREATE FUNCTION outbox.fan_out() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NEW.account_id OPERATOR(pg_catalog.=) '' THEN
        PERFORM outbox.reject('account_id must not be empty');
    END IF;
    IF NOT NEW.event OPERATOR(pg_catalog.=) ANY (outbox.event_names()) THEN
        PERFORM outbox.reject_event(NEW.event);
    END IF;
    IF pg_catalog.jsonb_typeof(NEW.data) OPERATOR(pg_catalog.<>) 'object'
       OR pg_catalog.octet_length(NEW.data::pg_catalog.text)
          OPERATOR(pg_catalog.>) 262144 THEN
        PERFORM outbox.reject_data(NEW.data);
    END IF;
    IF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
        RETURN NEW;
    END IF;
    INSERT INTO outbox.deliveries (event_id, webhook_id)
    SELECT NEW.id, w.id
    FROM outbox.webhooks w
    WHERE w.account_id OPERATOR(pg_catalog.=) NEW.account_id
      AND w.event OPERATOR(pg_catalog.=) NEW.event
      AND w.enabled;
    IF FOUND AND NOT pg_catalog.pg_try_advisory_xact_lock_shared(outbox.lock_key(), 1) THEN
        PERFORM pg_catalog.pg_notify('outbox_wake', '');
    END IF;
    RETURN NEW;
END
$$;

-- An UPDATE (only the owner may) is checked the same way and fans out to nothing.
CREATE TRIGGER events_fan_out BEFORE INSERT OR UPDATE ON outbox.events
    FOR EACH ROW EXECUTE FUNCTION outbox.fan_out();
