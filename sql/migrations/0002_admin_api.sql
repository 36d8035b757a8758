-- outbox schema, version 2: admin API tokens, and replays of finished deliveries.

-- A token belongs to one account and sees only that account's webhooks. Only its
-- SHA-256 digest is kept: the token is 256 random bits, shown once when created, so a
-- fast hash is as good as a slow one and no one can read a token back from here.
CREATE TABLE outbox.api_tokens (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id   text NOT NULL
                 CHECK (account_id <> '' OR outbox.reject('account_id must not be empty')),
    token_sha256 bytea NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz
);

CREATE INDEX api_tokens_by_account ON outbox.api_tokens (account_id, id);

-- A replayed delivery goes back to 'pending' as the same row (so the receiver sees the
-- same X-Webhook-Id) with a fresh series of retries: retry_base is how many attempts
-- came before the replay. Attempt numbers go on counting, so delivery_attempts keeps
-- the whole history; the retry schedule counts attempts - retry_base.
ALTER TABLE outbox.deliveries ADD COLUMN retry_base integer NOT NULL DEFAULT 0;
