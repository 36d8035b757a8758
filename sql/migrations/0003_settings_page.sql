-- outbox schema, version 3: the settings page's one-time links and sign-in sessions.

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
    expires_at     timestamptz NOT NULL
);

CREATE INDEX portal_sessions_expiry ON outbox.portal_sessions (expires_at);
