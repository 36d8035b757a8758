"""Webhook columns the database keeps by itself: format, secret rotation, disabled_reason."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests.conftest import SQL


def add(sql: SQL, url: str, fmt: str | None = None) -> int:
    if fmt is None:
        return sql.webhook(url)
    return int(
        sql.one(
            "INSERT INTO outbox.webhooks (account_id, name, url, event, format)"
            " VALUES ('acct_1', 'hook', %s, 'lead.scored', %s) RETURNING id",
            (url, fmt),
        )
    )


class TestFormat:
    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            ("https://hooks.slack.com/services/T000/B000/XXXX", "slack"),
            ("https://HOOKS.SLACK.COM/services/T/B/X", "slack"),
            ("https://discord.com/api/webhooks/123/abc", "discord"),
            ("https://discordapp.com/api/webhooks/123/abc", "discord"),
            ("https://discord.com/api/v10/webhooks/123/abc", "discord"),
            ("https://discord.com/channels/123", "json"),
            ("https://hooks.slack.com.evil.example/services/x", "json"),
            ("https://evil.example/hooks.slack.com/", "json"),
            ("https://crm.example.com/webhooks", "json"),
        ],
    )
    def test_left_out_it_follows_the_url(self, sql: SQL, url: str, expected: str) -> None:
        """A webhook created without a format gets the one its URL calls for."""
        hook = add(sql, url)
        assert sql.one("SELECT format FROM outbox.webhooks WHERE id = %s", (hook,)) == expected

    def test_given_it_is_kept(self, sql: SQL) -> None:
        """An explicit format wins over the URL's, also on a Slack URL."""
        hook = add(sql, "https://hooks.slack.com/services/T/B/X", "json")
        assert sql.one("SELECT format FROM outbox.webhooks WHERE id = %s", (hook,)) == "json"

    def test_a_bad_format_names_the_valid_ones(self, sql: SQL) -> None:
        """Anything but json, slack or discord is refused with the list."""
        with pytest.raises(psycopg.errors.CheckViolation, match="json, slack or discord"):
            add(sql, "https://crm.example.com/in", "xml")


class TestSecretRotation:
    def test_a_changed_secret_keeps_the_old_one_for_24_hours(self, sql: SQL) -> None:
        """previous_secret is the old secret, valid for 24 hours from the change."""
        hook = sql.webhook("https://crm.example.com/in", secret="old-secret-0123456789")
        sql("UPDATE outbox.webhooks SET secret = 'new-secret-0123456789' WHERE id = %s", (hook,))
        prev, hours = sql(
            "SELECT previous_secret,"
            " extract(epoch FROM previous_secret_expires_at - now()) / 3600"
            " FROM outbox.webhooks WHERE id = %s",
            (hook,),
        )[0]
        assert prev == "old-secret-0123456789"
        assert 23.9 < float(hours) <= 24

    def test_removing_the_secret_ends_signing_at_once(self, sql: SQL) -> None:
        """No secret: neither the old nor the new one signs."""
        hook = sql.webhook("https://crm.example.com/in", secret="old-secret-0123456789")
        sql("UPDATE outbox.webhooks SET secret = 'new-secret-0123456789' WHERE id = %s", (hook,))
        sql("UPDATE outbox.webhooks SET secret = NULL WHERE id = %s", (hook,))
        row = sql(
            "SELECT previous_secret, previous_secret_expires_at FROM outbox.webhooks WHERE id = %s",
            (hook,),
        )
        assert row == [(None, None)]

    def test_a_first_secret_has_nothing_to_overlap(self, sql: SQL) -> None:
        """Adding a secret where there was none leaves previous_secret empty."""
        hook = sql.webhook("https://crm.example.com/in", secret=None)
        sql("UPDATE outbox.webhooks SET secret = 'new-secret-0123456789' WHERE id = %s", (hook,))
        assert sql.one("SELECT previous_secret FROM outbox.webhooks WHERE id = %s", (hook,)) is None

    def test_clearing_the_expiry_ends_the_overlap(self, sql: SQL) -> None:
        """Setting previous_secret_expires_at to NULL forgets the old secret."""
        hook = sql.webhook("https://crm.example.com/in", secret="old-secret-0123456789")
        sql("UPDATE outbox.webhooks SET secret = 'new-secret-0123456789' WHERE id = %s", (hook,))
        sql("UPDATE outbox.webhooks SET previous_secret_expires_at = NULL WHERE id = %s", (hook,))
        assert sql.one("SELECT previous_secret FROM outbox.webhooks WHERE id = %s", (hook,)) is None

    def test_other_edits_keep_the_overlap(self, sql: SQL) -> None:
        """Renaming the webhook during the overlap does not end it."""
        hook = sql.webhook("https://crm.example.com/in", secret="old-secret-0123456789")
        sql("UPDATE outbox.webhooks SET secret = 'new-secret-0123456789' WHERE id = %s", (hook,))
        sql("UPDATE outbox.webhooks SET name = 'renamed' WHERE id = %s", (hook,))
        assert (
            sql.one("SELECT previous_secret FROM outbox.webhooks WHERE id = %s", (hook,))
            == "old-secret-0123456789"
        )

    def previous(self, sql: SQL, hook: int) -> tuple[Any, ...]:
        return tuple(
            sql(
                "SELECT previous_secret, previous_secret_expires_at"
                " FROM outbox.webhooks WHERE id = %s",
                (hook,),
            )[0]
        )

    @pytest.mark.parametrize("ends", ["NULL", "now()", "now() - interval '1 minute'"])
    def test_the_statement_that_changes_the_secret_may_end_the_overlap(
        self, sql: SQL, ends: str
    ) -> None:
        """A new secret and previous_secret_expires_at NULL or past in one UPDATE: the
        old secret stops signing at once (a leaked secret), first rotation or not."""
        for earlier_rotation in (False, True):
            hook = sql.webhook("https://crm.example.com/in", secret="old-secret-0123456789")
            if earlier_rotation:
                sql(
                    "UPDATE outbox.webhooks SET secret = 'mid-secret-0123456789' WHERE id = %s",
                    (hook,),
                )
            sql(
                "UPDATE outbox.webhooks SET secret = 'new-secret-0123456789',"
                f" previous_secret_expires_at = {ends} WHERE id = %s",
                (hook,),
            )
            previous, expires = self.previous(sql, hook)
            assert previous is None, (ends, earlier_rotation)
            assert expires is None or ends != "NULL"

    def test_a_time_given_with_the_new_secret_wins_over_the_day(self, sql: SQL) -> None:
        hook = sql.webhook("https://crm.example.com/in", secret="old-secret-0123456789")
        sql(
            "UPDATE outbox.webhooks SET secret = 'new-secret-0123456789',"
            " previous_secret_expires_at = now() + interval '1 hour' WHERE id = %s",
            (hook,),
        )
        hours = sql.one(
            "SELECT extract(epoch FROM previous_secret_expires_at - now()) / 3600"
            " FROM outbox.webhooks WHERE id = %s",
            (hook,),
        )
        assert self.previous(sql, hook)[0] == "old-secret-0123456789"
        assert 0.9 < float(hours) <= 1

    def test_no_endless_overlap_and_none_on_a_new_webhook(self, sql: SQL) -> None:
        """infinity is refused (it would break every read of the time); a new webhook
        has nothing to overlap, whatever the INSERT says."""
        hook = sql.webhook("https://crm.example.com/in", secret="old-secret-0123456789")
        with pytest.raises(psycopg.errors.CheckViolation, match="not infinity"):
            sql(
                "UPDATE outbox.webhooks SET previous_secret_expires_at = 'infinity' WHERE id = %s",
                (hook,),
            )
        new = sql.one(
            "INSERT INTO outbox.webhooks (account_id, name, url, event, secret, previous_secret,"
            " previous_secret_expires_at) VALUES ('acct_1', 'n', 'https://crm.example.com/in',"
            " 'lead.scored', 'new-secret-0123456789', 'planted-secret-012345', '-infinity')"
            " RETURNING id"
        )
        assert self.previous(sql, new) == (None, None)

    def test_an_overlap_that_has_ended_keeps_no_old_secret(self, sql: SQL) -> None:
        """Once its time has passed, the next change of the webhook forgets the old
        secret (retention's round makes that change when nothing else does)."""
        hook = sql.webhook("https://crm.example.com/in", secret="old-secret-0123456789")
        sql("UPDATE outbox.webhooks SET secret = 'new-secret-0123456789' WHERE id = %s", (hook,))
        sql(
            "UPDATE outbox.webhooks SET previous_secret_expires_at = now() - interval '1 s'"
            " WHERE id = %s",
            (hook,),
        )
        assert self.previous(sql, hook)[0] is None


class TestDisabledReason:
    def test_enabling_clears_it(self, sql: SQL) -> None:
        """The reason stays while disabled, and goes when the webhook is enabled again."""
        hook = sql.webhook("https://crm.example.com/in")
        sql(
            "UPDATE outbox.webhooks SET enabled = false, disabled_reason = 'kept failing'"
            " WHERE id = %s",
            (hook,),
        )
        sql("UPDATE outbox.webhooks SET name = 'renamed' WHERE id = %s", (hook,))
        assert (
            sql.one("SELECT disabled_reason FROM outbox.webhooks WHERE id = %s", (hook,))
            == "kept failing"
        )
        sql("UPDATE outbox.webhooks SET enabled = true WHERE id = %s", (hook,))
        assert sql.one("SELECT disabled_reason FROM outbox.webhooks WHERE id = %s", (hook,)) is None
