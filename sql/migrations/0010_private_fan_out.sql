-- outbox schema, version 10: only the fan-out trigger may call outbox.fan_out().
--
-- The fan-out runs as the schema's owner (SECURITY DEFINER), and every role could
-- execute it: a producer with USAGE on the schema could attach it as a trigger to a
-- table of its own and write deliveries of any event id to any account's webhooks (the
-- claim joins the event by id), so reading another account's events at its own URL.
-- A trigger fires without an EXECUTE check: outbox.events' own fan-out is unchanged.
REVOKE ALL ON FUNCTION outbox.fan_out() FROM PUBLIC;
