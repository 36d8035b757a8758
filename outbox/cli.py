"""The `outbox` command: parses arguments and calls the module that does the work."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any, NoReturn

import psycopg

from outbox import (
    __version__,
    db,
    errors,
    jsontext,
    listen,
    retention,
    retry,
    sidecar,
    signing,
    testsend,
    tokens,
    webhooks,
)
from outbox.config import ConfigError, Settings, parse_duration
from outbox.delivery import Sender
from outbox.events import EVENTS, UnknownEvent
from outbox.log import configure
from outbox.web import portal

__all__ = ["main"]

Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]


class UsageError(Exception):
    """Bad input: reported on one line, exit 2, nothing written."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _webhook_id(raw: str) -> int:
    if not raw.isdigit():
        raise argparse.ArgumentTypeError(f"{raw!r} is not a webhook id (a number)")
    return int(raw)


def _event(raw: str) -> str:
    if raw not in EVENTS:
        raise argparse.ArgumentTypeError(str(UnknownEvent(raw)))
    return raw


async def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    applied = await db.migrate(settings.database_url)
    print(f"migrated: applied {applied}" if applied else "migrated: already up to date")
    return 0


async def _sql(args: argparse.Namespace, settings: Settings) -> int:
    print((db.SQL_DIR / "schema.sql").read_text(), end="")
    return 0


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    return await sidecar.run(settings, sidecar.DELIVER_ONLY if args.deliver_only else sidecar.BOTH)


async def _serve(args: argparse.Namespace, settings: Settings) -> int:
    if settings.api_listen is None:
        raise UsageError(
            "outbox serve runs the admin API and the settings page: OUTBOX_API_LISTEN "
            "must not be off"
        )
    return await sidecar.run(settings, sidecar.SERVE)


def _port(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= 65535):
        raise argparse.ArgumentTypeError(f"{raw!r} is not a port (1-65535)")
    return int(raw)


async def _listen(args: argparse.Namespace, settings: Settings) -> int:
    try:
        await listen.serve(args.host, args.port, args.secret)
    except listen.CannotListen as exc:
        raise UsageError(str(exc)) from None
    return 0


async def _emit(args: argparse.Namespace, settings: Settings) -> int:
    raw = args.json if args.json is not None else sys.stdin.read()
    try:
        data = json.loads(raw or "{}")
    except json.JSONDecodeError as exc:
        raise UsageError(f"JSON: {exc}") from None
    except RecursionError:
        raise UsageError("JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise UsageError(f"JSON: data must be an object, not {type(data).__name__}")
    async with await db.connect(settings.database_url) as conn:
        print(await webhooks.emit(conn, args.account, args.event, json.dumps(data)))
    return 0


_INT_MAX = 2**31 - 1


def _header(raw: str) -> tuple[str, str]:
    """``Name: value`` as (name, value), spaces around either left out as HTTP does."""
    name, colon, value = raw.partition(":")
    if not colon or not name.strip():
        raise argparse.ArgumentTypeError(f"{raw!r} is not a header: give it as 'Name: value'")
    return name.strip(), value.strip()


def _headers(given: list[tuple[str, str]] | None) -> dict[str, str] | None:
    """The --header options as names to values; None when there were none."""
    if not given:
        return None
    headers: dict[str, str] = {}
    for name, value in given:
        if any(name.lower() == seen.lower() for seen in headers):
            raise UsageError(f"--header {name} is given twice")
        headers[name] = value
    return headers


def _rate_limit(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit() and int(raw) <= _INT_MAX):
        raise argparse.ArgumentTypeError(
            f"{raw!r} is not a whole number of attempts per second (at most {_INT_MAX})"
        )
    return int(raw)


# `--secret generate`: a secret the product makes (signing.generate_secret). No secret
# typed can be this word: a secret has at least 16 characters.
_GENERATE = "generate"
_SIGNING_HELP = (
    "at least 16 characters; `generate` makes a whsec_ secret and shows it once, on stderr"
)


def _secret(raw: str | None) -> str | None:
    return signing.generate_secret() if raw == _GENERATE else raw


def _show_generated(args: argparse.Namespace, webhook_id: int, secret: str | None) -> None:
    """The generated secret, on stderr: stdout keeps what scripts read (the id alone)."""
    if args.secret == _GENERATE:
        print(
            f"signing secret of webhook {webhook_id}: {secret}"
            " (keep it now: it is not shown again)",
            file=sys.stderr,
        )


async def _add(args: argparse.Namespace, settings: Settings) -> int:
    secret = _secret(args.secret)
    async with await db.connect(settings.database_url) as conn:
        webhook_id = await webhooks.add(
            conn,
            account_id=args.account,
            name=args.name,
            url=args.url,
            event=args.event,
            secret=secret,
            enabled=not args.disabled,
            format=args.format,
            headers=_headers(args.header),
            rate_limit=args.rate_limit,
        )
    print(webhook_id)
    _show_generated(args, webhook_id, secret)
    return 0


_COLUMNS = (
    "id",
    "name",
    "event",
    "format",
    "enabled",
    "last_delivery_status",
    "last_delivery_at",
    "pending",
    "retrying",
    "next_retry_at",
    "last_attempt_status",
    "last_attempt_at",
    "url",
    "last_error",
    "last_attempt_error",
    "disabled_reason",
)
# `webhooks list` also shows each webhook's limit and the names of its own headers.
_LIST_COLUMNS = (*_COLUMNS, "rate_limit", "headers")


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    """A webhook's row as `webhooks list` shows it: its headers by name, each value
    masked as the API masks it."""
    shown = {k: v for k, v in row.items() if k != "header_names"}
    shown["headers"] = webhooks.masked(row["header_names"])
    return shown


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def text(value: Any) -> str:
        if value is None or value == {}:
            return "-"
        if isinstance(value, dict):
            return ",".join(value)
        if hasattr(value, "isoformat"):
            return str(value.isoformat(timespec="seconds"))
        return str(value)

    cells = [[text(row[c]) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


async def _list(args: argparse.Namespace, settings: Settings) -> int:
    async with await db.connect(settings.database_url) as conn:
        rows = [_shown(row) for row in await webhooks.status(conn, args.account)]
    if args.json:
        print(jsontext.dumps(rows, indent=2), end="")
    elif rows:
        print(_table(rows, _LIST_COLUMNS))
    else:
        print(f"account {args.account} has no webhooks")
    return 0


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    async with await db.connect(settings.database_url) as conn:
        rows = await webhooks.status(conn, args.account)
    print(_table(rows, ("account_id", *_COLUMNS)) if rows else "no webhooks")
    # On stderr: stdout stays the table alone, for scripts that read it.
    print(retry.retry_note(settings), file=sys.stderr)
    return 0


async def _update(args: argparse.Namespace, settings: Settings) -> int:
    fields: dict[str, Any] = {
        k: v
        for k, v in vars(args).items()
        if k in ("name", "url", "event", "format", "enabled") and v is not None
    }
    if args.no_secret:
        fields["secret"] = None
    elif args.secret is not None:
        fields["secret"] = _secret(args.secret)
    headers = _headers(args.header)
    if headers is not None:
        fields["headers"] = headers
    if args.no_headers:
        fields["clear_headers"] = True
    if args.no_rate_limit:
        fields["rate_limit"] = None
    elif args.rate_limit is not None:
        fields["rate_limit"] = args.rate_limit
    if not fields:
        raise UsageError(
            "nothing to change: give --name, --url, --event, --format, --secret, "
            "--no-secret, --header, --no-headers, --rate-limit, --no-rate-limit, --enable "
            "or --disable"
        )
    async with await db.connect(settings.database_url) as conn:
        await webhooks.update(conn, args.id, **fields)
    print(f"webhook {args.id} updated")
    _show_generated(args, args.id, fields.get("secret"))
    return 0


async def _delete(args: argparse.Namespace, settings: Settings) -> int:
    async with await db.connect(settings.database_url) as conn:
        await webhooks.delete(conn, args.id)
    print(f"webhook {args.id} deleted")
    return 0


async def _test(args: argparse.Namespace, settings: Settings) -> int:
    async with await db.connect(settings.database_url) as conn:
        webhook = await webhooks.get(conn, args.id)
    async with Sender(settings) as sender:
        attempt = await testsend.send(sender, webhook, args.event)
    outcome = "ok" if attempt.ok else "failed"
    detail = f"HTTP {attempt.status}" if attempt.ok else attempt.error
    print(f"{outcome}: {detail} in {attempt.duration_ms} ms")
    return 0 if attempt.ok else 1


def _id(kind: str) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        if not (raw.isascii() and raw.isdigit() and 0 < int(raw) < 2**63):
            raise argparse.ArgumentTypeError(f"{raw!r} is not a {kind} id (a number)")
        return int(raw)

    return parse


def _since(raw: str) -> datetime:
    try:
        return webhooks.parse_since(raw)
    except errors.Invalid as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def _token_create(args: argparse.Namespace, settings: Settings) -> int:
    async with await db.connect(settings.database_url) as conn:
        token_id, token = await tokens.create(conn, args.account)
    whose = f"of account {args.account}" if args.account is not None else "(operator)"
    print(token)
    print(f"token {token_id} {whose}: keep it now, it is not shown again", file=sys.stderr)
    if args.account is None:
        print(
            "it acts for any account, named in each request's Outbox-Account header",
            file=sys.stderr,
        )
    return 0


async def _token_list(args: argparse.Namespace, settings: Settings) -> int:
    async with await db.connect(settings.database_url) as conn:
        rows = await tokens.for_account(conn, args.account)
    if args.json:
        print(jsontext.dumps(rows, indent=2), end="")
    elif rows:
        kinds = [{**r, "kind": "operator" if r["operator"] else "account"} for r in rows]
        print(_table(kinds, ("id", "kind", "created_at", "last_used_at")))
    elif args.account is None:
        print("there are no operator tokens")
    else:
        print(f"account {args.account} has no tokens")
    return 0


async def _token_revoke(args: argparse.Namespace, settings: Settings) -> int:
    async with await db.connect(settings.database_url) as conn:
        if not await tokens.revoke(conn, args.id):
            raise UsageError(f"token {args.id} not found")
    print(f"token {args.id} revoked")
    return 0


async def _retry(args: argparse.Namespace, settings: Settings) -> int:
    async with await db.connect(settings.database_url) as conn:
        await webhooks.retry(conn, args.id)
    print(f"delivery {args.id} re-queued")
    return 0


async def _recover(args: argparse.Namespace, settings: Settings) -> int:
    async with await db.connect(settings.database_url) as conn:
        count = await webhooks.recover(conn, args.id, args.since)
    print(f"webhook {args.id}: re-queued {count} failed deliveries")
    return 0


def _ttl(raw: str) -> int:
    try:
        return portal.parse_ttl(raw)
    except errors.Invalid as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _display_name(raw: str) -> str | None:
    try:
        return portal.check_display_name(raw)
    except errors.Invalid as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def _portal_link(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.public_url:
        raise UsageError(
            "OUTBOX_API_LISTEN is off, so this process serves no settings page: "
            "set OUTBOX_PUBLIC_URL to the address of a sidecar's admin server"
        )
    async with await db.connect(settings.database_url) as conn:
        link = await portal.mint(
            conn,
            args.account,
            base_url=settings.public_url,
            seconds=args.ttl,
            display_name=args.display_name,
        )
    print(link.url)
    expires = link.expires_at.isoformat(timespec="seconds").replace("+00:00", "Z")
    print(
        f"settings page of account {args.account}: opens once, until {expires}",
        file=sys.stderr,
    )
    return 0


async def _portal_signout(args: argparse.Namespace, settings: Settings) -> int:
    async with await db.connect(settings.database_url) as conn:
        count = await portal.end_sessions(conn, args.account)
    sessions = "session" if count == 1 else "sessions"
    print(f"ended {count} settings-page {sessions} of account {args.account}")
    return 0


# The database checks the value, so every path says the same about a bad one.
_FORMAT_HELP = (
    "json (the default), slack or discord: the body the receiver gets; "
    "left out, a Slack or Discord webhook URL picks its own"
)
_HEADER_HELP = (
    "'Name: value': a header sent with every attempt, such as a credential of the "
    "endpoint's own (repeat for more, at most 10)"
)
_RATE_LIMIT_HELP = "the most attempts per second to this webhook, from all sidecars together"


def _duration(raw: str) -> float:
    try:
        return parse_duration(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def _prune(args: argparse.Namespace, settings: Settings) -> int:
    older_than = args.older_than if args.older_than is not None else settings.retention
    if older_than is None:
        print("OUTBOX_RETENTION is off: nothing to do (give --older-than to prune anyway)")
        return 0
    async with await db.connect(settings.database_url, **settings.connect_options) as conn:
        pruned = await retention.prune(conn, older_than, wait=args.wait)
    # Operational events are named only when there were some: the line stays as it was.
    notes = f", {pruned.notifications} operational events" if pruned.notifications else ""
    print(
        f"deleted {pruned.deliveries} deliveries, {pruned.attempts} attempts,"
        f" {pruned.events} events{notes}"
    )
    if pruned.yielded:
        print(
            f"outbox: stopped early: another session held the pruners' lock"
            f" {retention.LOCK} for {args.wait:g}s; run prune again later",
            file=sys.stderr,
        )
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="outbox", description="Postgres-native webhook delivery sidecar.")
    parser.add_argument("--version", action="version", version=f"outbox {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    commands.add_parser("migrate", help="create or upgrade the schema").set_defaults(func=_migrate)
    run = commands.add_parser("run", help="run the sidecar until SIGTERM")
    run.add_argument(
        "--deliver-only",
        action="store_true",
        help="deliver only: the listener answers just /healthz, /readyz and /metrics",
    )
    run.set_defaults(func=_run)
    commands.add_parser(
        "serve", help="the admin API and the settings page alone, until SIGTERM (no deliveries)"
    ).set_defaults(func=_serve)
    commands.add_parser("sql", help="print the schema, for review").set_defaults(func=_sql)

    emit = commands.add_parser("emit", help="emit an event; prints its id")
    emit.add_argument("account")
    emit.add_argument("event", type=_event)
    emit.add_argument("json", nargs="?", help="the data object (default: read stdin)")
    emit.set_defaults(func=_emit)

    status = commands.add_parser("status", help="each webhook's delivery status")
    status.add_argument("--account")
    status.set_defaults(func=_status)

    hooks = commands.add_parser("webhooks", help="manage webhooks").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    add = hooks.add_parser("add", help="create a webhook; prints its id")
    add.add_argument("--account", required=True)
    add.add_argument("--name", required=True)
    add.add_argument("--url", required=True)
    add.add_argument("--event", required=True, type=_event)
    add.add_argument("--format", help=_FORMAT_HELP)
    add.add_argument("--secret", help=_SIGNING_HELP)
    add.add_argument("--disabled", action="store_true")
    add.add_argument("--header", action="append", type=_header, help=_HEADER_HELP)
    add.add_argument("--rate-limit", type=_rate_limit, metavar="N", help=_RATE_LIMIT_HELP)
    add.set_defaults(func=_add)

    listing = hooks.add_parser("list", help="an account's webhooks")
    listing.add_argument("--account", required=True)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_list)

    update = hooks.add_parser("update", help="change a webhook")
    update.add_argument("id", type=_webhook_id)
    update.add_argument("--name")
    update.add_argument("--url")
    update.add_argument("--event", type=_event)
    update.add_argument("--format", help=_FORMAT_HELP)
    secret = update.add_mutually_exclusive_group()
    secret.add_argument("--secret", help=_SIGNING_HELP)
    secret.add_argument("--no-secret", action="store_true")
    update.add_argument(
        "--header",
        action="append",
        type=_header,
        help=_HEADER_HELP + "; replaces a header of that name and keeps the others",
    )
    update.add_argument(
        "--no-headers", action="store_true", help="remove every header (before any --header)"
    )
    rate = update.add_mutually_exclusive_group()
    rate.add_argument("--rate-limit", type=_rate_limit, metavar="N", help=_RATE_LIMIT_HELP)
    rate.add_argument("--no-rate-limit", action="store_true", help="no rate limit")
    enabled = update.add_mutually_exclusive_group()
    enabled.add_argument("--enable", dest="enabled", action="store_true", default=None)
    enabled.add_argument("--disable", dest="enabled", action="store_false")
    update.set_defaults(func=_update)

    delete = hooks.add_parser("delete", help="delete a webhook")
    delete.add_argument("id", type=_webhook_id)
    delete.set_defaults(func=_delete)

    test = hooks.add_parser("test", help="send one sample payload now")
    test.add_argument("id", type=_webhook_id)
    test.add_argument("--event", type=_event)
    test.set_defaults(func=_test)

    recover = hooks.add_parser("recover", help="re-queue failed deliveries since a time")
    recover.add_argument("id", type=_webhook_id)
    recover.add_argument("--since", required=True, type=_since, help="e.g. 2026-11-27T10:00Z")
    recover.set_defaults(func=_recover)

    keys = commands.add_parser("tokens", help="admin API tokens").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    create = keys.add_parser("create", help="a new token; printed once")
    whom = create.add_mutually_exclusive_group(required=True)
    whom.add_argument("--account", help="the one account the token acts for")
    whom.add_argument(
        "--operator",
        action="store_true",
        help="a token for any account, named in each request's Outbox-Account header",
    )
    create.set_defaults(func=_token_create)
    key_list = keys.add_parser(
        "list", help="an account's tokens, or the operator tokens (never the tokens)"
    )
    listed = key_list.add_mutually_exclusive_group(required=True)
    listed.add_argument("--account")
    listed.add_argument("--operator", action="store_true", help="the operator tokens")
    key_list.add_argument("--json", action="store_true")
    key_list.set_defaults(func=_token_list)
    revoke = keys.add_parser("revoke", help="revoke a token")
    revoke.add_argument("id", type=_id("token"))
    revoke.set_defaults(func=_token_revoke)

    deliveries = commands.add_parser("deliveries", help="replay deliveries").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    retry = deliveries.add_parser("retry", help="re-queue one finished delivery")
    retry.add_argument("id", type=_id("delivery"))
    retry.set_defaults(func=_retry)

    link = commands.add_parser("portal-link", help="a one-time link to an account's settings page")
    link.add_argument("--account", required=True)
    link.add_argument(
        "--ttl",
        type=_ttl,
        default=portal.LINK_SECONDS,
        help="how long the link may wait to be opened: 15m (default), 1h, 90s; at most 24h",
    )
    link.add_argument(
        "--display-name",
        type=_display_name,
        help="the customer's name, shown on the page instead of the account id",
    )
    link.set_defaults(func=_portal_link)

    signout = commands.add_parser(
        "portal-signout", help="end every settings-page session of an account"
    )
    signout.add_argument("--account", required=True)
    signout.set_defaults(func=_portal_signout)

    receiver = commands.add_parser(
        "listen", help="an HTTPS receiver on this machine that prints what it gets"
    )
    receiver.add_argument("--port", type=_port, default=9443, help="default 9443")
    receiver.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    receiver.add_argument("--secret", help="check each request's signatures with this secret")
    receiver.set_defaults(func=_listen)

    prune = commands.add_parser(
        "prune", help="delete finished deliveries and their events older than the retention"
    )
    prune.add_argument(
        "--older-than",
        type=_duration,
        metavar="DURATION",
        help="90s, 15m, 12h, 30d or seconds (default: OUTBOX_RETENTION)",
    )
    prune.add_argument(
        "--wait",
        type=_duration,
        default=retention.WAIT,
        metavar="DURATION",
        help=f"how long to wait for another pruner (default {retention.WAIT:g}s)",
    )
    prune.set_defaults(func=_prune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        settings = Settings.from_env()
        configure(settings.log_format)
        func: Command = args.func
        code = asyncio.run(func(args, settings))
        # Written here, inside the try, so that a closed pipe is handled below.
        sys.stdout.flush()
        return code
    except (UsageError, ConfigError, errors.Invalid, db.SchemaMismatch) as exc:
        print(f"outbox: {exc}", file=sys.stderr)
        return 2
    except errors.NotFound as exc:
        print(f"outbox: {exc}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as exc:
        missing = db.missing_database(exc)
        if missing:
            print(f"outbox: {missing}", file=sys.stderr)
            return 2
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        print(f"outbox: cannot reach the database: {first}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader has gone (`outbox status | head -1`): stop quietly. Python flushes
        # stdout again on exit, so point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
