-- outbox schema, version 10: events.data compressed with lz4.
--
-- An event's data of some 2 KB is compressed when the producer inserts it, in the
-- producer's transaction, and decompressed when a dispatcher claims it. With Postgres's
-- default method (pglz) that was the largest single cost of the producer's INSERT:
-- with lz4, make bench's cost section measured 436 -> 353 µs of Postgres CPU per event
-- to produce and 181 -> 164 µs to deliver, for 200 more bytes of WAL per event (lz4
-- compresses a little less). Values stored before keep pglz; Postgres reads both. A
-- server built without lz4 keeps pglz: the schema is the same otherwise.
DO $$
BEGIN
    ALTER TABLE outbox.events ALTER COLUMN data SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'this server has no lz4: outbox.events.data stays compressed with pglz';
END
$$;
