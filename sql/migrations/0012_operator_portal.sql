-- outbox schema, version 12: operator tokens, and what a portal link tells the page it opens.
--
-- An operator token acts for any account (the SaaS's backend names it in the
-- Outbox-Account header), so it has no account of its own: account_id is NULL exactly
-- when operator is true. Account tokens are as before.
ALTER TABLE outbox.api_tokens ALTER COLUMN account_id DROP NOT NULL;
ALTER TABLE outbox.api_tokens DROP CONSTRAINT api_tokens_account_id_check;
ALTER TABLE outbox.api_tokens ADD COLUMN operator boolean NOT NULL DEFAULT false;
ALTER TABLE outbox.api_tokens ADD CONSTRAINT api_tokens_account_id_check
    CHECK (account_id IS NULL OR account_id <> ''
           OR outbox.reject('account_id must not be empty'));
ALTER TABLE outbox.api_tokens ADD CONSTRAINT api_tokens_operator_check
    CHECK ((account_id IS NULL) = operator
           OR outbox.reject('a token has an account_id, or is an operator token without one'));

-- The name the page shows instead of the account id (POST /api/v1/portal-links'
-- display_name), carried by the signed link into the session it opens; NULL: the id.
ALTER TABLE outbox.portal_sessions ADD COLUMN display_name text
    CHECK (display_name IS NULL OR length(display_name) BETWEEN 1 AND 100
           OR outbox.reject('display_name must be from 1 to 100 characters'));
