"""The database side of security: what a producer can and cannot make outbox code do.

Each test logs in as a real role that has only what the schema grants, the way a
producer's service or the sidecar would.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import SQL, login_url

SECRET = "whsec_do_not_read_me_0123"


@pytest.fixture
def attacker(sql: SQL) -> Iterator[str]:
    """A login role with outbox_producer and a schema of its own, as a producer may have."""
    name = f"outbox_attacker_{uuid.uuid4().hex[:8]}"
    sql(f"CREATE ROLE {name} LOGIN IN ROLE outbox_producer")
    sql(f"CREATE SCHEMA {name} AUTHORIZATION {name}")
    yield name
    sql(f"DROP SCHEMA {name} CASCADE")
    sql(f"DROP OWNED BY {name}")
    sql(f"DROP ROLE {name}")


def connect_as(sql: SQL, user: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(login_url(sql.url, user), autocommit=True)


class TestSearchPath:
    """Functions that run as the owner never take a name from the caller's search_path."""

    @staticmethod
    def plant_shadows(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> None:
        """A function and an operator that outbox code calls unqualified, which note who
        ran them and what that user could read of webhook secrets."""
        conn.execute(f"CREATE TABLE {schema}.ran_as (who text, secrets text)")
        conn.execute(f"GRANT INSERT ON {schema}.ran_as TO PUBLIC")
        spy = f"""
            INSERT INTO {schema}.ran_as
            SELECT current_user,
                   (SELECT string_agg(secret, ',') FROM outbox.webhooks)
        """
        conn.execute(
            f"""CREATE FUNCTION {schema}.jsonb_typeof(jsonb) RETURNS text
            LANGUAGE plpgsql AS $$
            BEGIN
                BEGIN {spy}; EXCEPTION WHEN OTHERS THEN
                    INSERT INTO {schema}.ran_as VALUES (current_user, NULL);
                END;
                RETURN pg_catalog.jsonb_typeof($1);
            END $$"""
        )
        conn.execute(
            f"""CREATE FUNCTION {schema}.spy_texteq(text, text) RETURNS boolean
            LANGUAGE plpgsql AS $$
            BEGIN
                BEGIN {spy}; EXCEPTION WHEN OTHERS THEN
                    INSERT INTO {schema}.ran_as VALUES (current_user, NULL);
                END;
                RETURN pg_catalog.texteq($1, $2);
            END $$"""
        )
        conn.execute(
            f"CREATE OPERATOR {schema}.= (LEFTARG = text, RIGHTARG = text,"
            f" FUNCTION = {schema}.spy_texteq)"
        )

    def test_shadow_function_and_operator_never_run_as_the_owner(
        self, sql: SQL, attacker: str
    ) -> None:
        """A producer's shadows of jsonb_typeof and = run, if at all, as the producer."""
        sql.webhook("https://hooks.example.com/in", secret=SECRET)
        with connect_as(sql, attacker) as conn:
            self.plant_shadows(conn, attacker)
            conn.execute(f"SET search_path = {attacker}, pg_catalog")
            conn.execute("SELECT outbox.emit('acct_1', 'lead.scored', '{\"a\": 1}'::jsonb)")
            conn.execute(
                "INSERT INTO outbox.events (account_id, event, data)"
                " VALUES ('acct_1', 'lead.scored', '{\"b\": 2}')"
            )
        ran = sql(f"SELECT who, secrets FROM {attacker}.ran_as")
        assert all(who == attacker for who, _ in ran), ran
        assert not any(secrets and SECRET in secrets for _, secrets in ran), ran
        assert sql.one("SELECT count(*) FROM outbox.deliveries") == 2

    def test_every_security_definer_function_fixes_its_search_path(self, sql: SQL) -> None:
        """No function of schema outbox runs as its owner with the caller's search_path."""
        loose = sql(
            "SELECT p.oid::regprocedure::text FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'outbox' AND p.prosecdef"
            "   AND NOT coalesce(p.proconfig::text[] @> ARRAY['search_path=pg_catalog, pg_temp'],"
            "                    false)"
        )
        assert loose == []


class TestProducerColumns:
    """Producers set account_id, event, data and occurred_at, and nothing else."""

    def test_a_planted_id_is_refused(self, sql: SQL, attacker: str) -> None:
        """OVERRIDING SYSTEM VALUE with an id of the producer's choosing is refused."""
        with (
            connect_as(sql, attacker) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege, match="events"),
        ):
            conn.execute(
                "INSERT INTO outbox.events (id, account_id, event)"
                " OVERRIDING SYSTEM VALUE VALUES (1000000, 'acct_1', 'lead.scored')"
            )
        assert sql.one("SELECT count(*) FROM outbox.events") == 0

    def test_the_four_columns_and_emit_still_work(self, sql: SQL, attacker: str) -> None:
        """A producer's INSERT of the contract's columns, and emit, both enqueue."""
        sql.webhook("https://hooks.example.com/in")
        with connect_as(sql, attacker) as conn:
            conn.execute(
                "INSERT INTO outbox.events (account_id, event, data, occurred_at)"
                " VALUES ('acct_1', 'lead.scored', '{}', now())"
            )
            conn.execute("SELECT outbox.emit('acct_1', 'lead.scored')")
        assert sql.one("SELECT count(*) FROM outbox.deliveries") == 2


class TestFanOutFunction:
    """The fan-out runs as the schema's owner: only outbox.events' trigger may call it."""

    def test_it_cannot_be_attached_to_a_table_of_ones_own(self, sql: SQL, attacker: str) -> None:
        """A producer's own table with the fan-out as its trigger would enqueue any event
        to any account's webhooks (the claim joins the event by id): refused."""
        sql.webhook("https://victim.example.com/in", account="acct_victim")
        sql.webhook("https://evil.example.com/in", account="acct_evil")
        victim = sql.one(
            "INSERT INTO outbox.events (account_id, event, data)"
            " VALUES ('acct_victim', 'lead.scored', '{\"secret\": 1}') RETURNING id"
        )
        with connect_as(sql, attacker) as conn:
            conn.execute(
                f"CREATE TABLE {attacker}.t (id bigint, account_id text, event text, data jsonb)"
            )
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="fan_out"):
                conn.execute(
                    f"CREATE TRIGGER x BEFORE INSERT ON {attacker}.t"
                    " FOR EACH ROW EXECUTE FUNCTION outbox.fan_out()"
                )
        assert sql("SELECT event_id FROM outbox.deliveries") == [(victim,)]

    def test_no_function_that_runs_as_the_owner_is_public(self, sql: SQL) -> None:
        """Every SECURITY DEFINER function of schema outbox is granted, not public."""
        public = sql(
            "SELECT p.oid::regprocedure::text FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace,"
            " aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a"
            " WHERE n.nspname = 'outbox' AND p.prosecdef AND a.grantee = 0"
        )
        assert public == []

    def test_nothing_is_public_but_what_producers_need(self, sql: SQL) -> None:
        """Only the checks an INSERT into outbox.events runs are executable by PUBLIC
        (emit is granted to outbox_producer); the doorbell, state functions and rules
        belong to the sidecar."""
        public = sql(
            "SELECT p.proname::text FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace,"
            " aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a"
            " WHERE n.nspname = 'outbox' AND a.grantee = 0 AND a.privilege_type = 'EXECUTE'"
            " ORDER BY 1"
        )
        assert [name for (name,) in public] == [
            "event_names",
            "reject",
            "reject_data",
            "reject_event",
            "valid_event",
        ]

    def test_a_producer_cannot_ring_or_hold_the_doorbell(self, sql: SQL, attacker: str) -> None:
        with connect_as(sql, attacker) as conn:
            for call in ("outbox.arm_doorbell_v1()", "outbox.next_due_v2()", "outbox.lock_key()"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(f"SELECT {call}")
            conn.execute(
                "INSERT INTO outbox.events (account_id, event, data)"
                " VALUES ('a', 'lead.scored', '{}')"
            )


class TestSidecarRole:
    """outbox_sidecar has the rights `outbox run` uses, and owns nothing."""

    def test_owns_nothing_and_cannot_change_the_schema(self, sql: SQL) -> None:
        """No object belongs to the role; DDL and reading producers' rights are refused."""
        owned = sql(
            "SELECT c.relname FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner"
            " WHERE r.rolname = 'outbox_sidecar'"
        )
        assert owned == []
        name = f"outbox_sidecar_probe_{uuid.uuid4().hex[:8]}"
        sql(f"CREATE ROLE {name} LOGIN IN ROLE outbox_sidecar")
        try:
            with connect_as(sql, name) as conn:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute("ALTER TABLE outbox.deliveries ADD COLUMN x int")
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute("SELECT outbox.emit('acct_1', 'lead.scored')")
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(
                        "INSERT INTO outbox.api_tokens (account_id, token_sha256)"
                        " VALUES ('a', '\\x00')"
                    )
                assert conn.execute("SELECT count(*) FROM outbox.webhook_status").fetchone()
        finally:
            sql(f"DROP ROLE {name}")
