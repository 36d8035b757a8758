"""The delivery loop: wait (NOTIFY | due time | free slots | stop) → claim → deliver → record.

One asyncio process. Claims are short transactions that lease rows; HTTP runs outside
any transaction; results are written back in batches by a separate task, so the loop
itself only ever waits on the database for a claim. Everything that should make the loop
look again sets one event, ``_wake``; a finished attempt sets it only when the loop is
waiting for that many free slots, so a busy dispatcher wakes once per batch, not once
per delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Concatenate, ParamSpec, TypeVar

import psycopg
import structlog
from psycopg.types.numeric import Int8BinaryDumper, Int8Dumper

from outbox import db, metrics, tracing, wire
from outbox.config import Settings
from outbox.db.deliveries import AttemptResult, Claimed, Job
from outbox.delivery import Attempt, Sender
from outbox.retry import SLOWDOWNS, duration_words, next_delay, slowdown_delay
from outbox.supervisor import Supervisor

__all__ = ["Dispatcher"]

log = structlog.get_logger("outbox.dispatcher")

# While another dispatcher holds rows we could take, look again this soon.
CONTENDED_RETRY = 0.02
# How soon to try the doorbell again when producers (or a peer) hold it; doubling, up
# to ARM_RETRY_MAX.
ARM_RETRY = 0.002
ARM_RETRY_MAX = 0.1
BACKOFF_MAX = 5.0
_P = ParamSpec("_P")
_T = TypeVar("_T")
Setup = Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]
# How the loop's and the recorder's connections are set up.
CLAIMS_SETUP: tuple[Setup, ...] = (db.deliveries.plan_once, db.deliveries.commit_without_waiting)
RECORDS_SETUP: tuple[Setup, ...] = (db.deliveries.plan_once,)
# How often those connections make their query plans again.
REPLAN_SECONDS = 2.0
# Under load, how long the recorder waits for half the slots' results before it writes.
RECORD_LINGER = 0.01


@dataclass(frozen=True, slots=True)
class Result:
    job: Job
    attempt: Attempt
    outcome: str
    retry_in: float | None
    # An answer of 429 that does not use up a retry (CONTRACT section 19).
    slowdown: bool = False


class Doorbell:
    """Holds the advisory lock that tells producers to NOTIFY, while we sleep.

    Runs in the background on a connection of its own, and only ever tries the lock.
    Once held, it sets ``look`` so the loop polls one more time (see outbox.fan_out()).
    A try that fails also sets ``look``: producers hold the lock shared while they
    commit events, so there is about to be something to claim.
    """

    def __init__(
        self, url: str, look: asyncio.Event, retry_in: float, beat: Callable[[], None]
    ) -> None:
        self._url = url
        self._beat = beat
        self._retry_in = retry_in
        self._look = look
        self._want = False
        self._held = False
        self._misses = 0
        self._changed = asyncio.Event()

    def want(self, armed: bool) -> None:
        if armed != self._want:
            self._want = armed
            self._changed.set()

    async def run(self) -> None:
        """Until cancelled. A failure ends it with its connection closed, and so with the
        lock let go; started again, it takes the lock anew if it is still wanted."""
        self._held = False
        self._changed.set()
        async with await db.connect(self._url) as conn:
            while True:
                await self._changed.wait()
                self._changed.clear()
                if self._want and not self._held:
                    if await db.deliveries.arm_doorbell(conn):
                        self._held = True
                        self._misses = 0
                        self._look.set()
                    else:
                        # Producers are committing (look now, try again soon), or another
                        # dispatcher sleeps on it, and producers ring for us too (no hurry:
                        # hence the doubling).
                        self._look.set()
                        delay = ARM_RETRY * 2**self._misses
                        await asyncio.sleep(min(self._retry_in, ARM_RETRY_MAX, delay))
                        self._misses += 1
                        self._changed.set()
                elif not self._want and self._held:
                    await db.deliveries.disarm_doorbell(conn)
                    self._held = False
                self._beat()


class Connection:
    """A connection of the dispatcher's own, opened again after a failure.

    The loop and the recorder each have one rather than share a pool: they run the same
    few queries thousands of times, so each connection is set up for them once (the
    ``setup`` operations of outbox.db.deliveries) and plans them once. A plan is only as
    good as the table sizes it was made for, and a plan made while a table was empty
    scans all of it once it has grown, so the plans are made again every REPLAN_SECONDS.
    Through a transaction pooler there is no setup (a session setting would stay on a
    server connection that other clients get next) and nothing is prepared, so every
    run is planned anew.
    """

    def __init__(self, url: str, *setup: Setup, options: dict[str, Any] | None = None) -> None:
        self._url = url
        self._setup = setup
        self._options = options or {}
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._planned_at = 0.0

    async def get(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            conn = await db.connect(self._url, **self._options)
            # Every Python int goes as a bigint: psycopg would otherwise pick int2, int4
            # or int8 by value, each a different prepared statement of the same query.
            conn.adapters.register_dumper(int, Int8Dumper)
            conn.adapters.register_dumper(int, Int8BinaryDumper)
            for setup in self._setup:
                await setup(conn)
            self._conn = conn
            self._planned_at = time.monotonic()
        elif self._setup and time.monotonic() - self._planned_at >= REPLAN_SECONDS:
            await db.deliveries.replan(self._conn)
            self._planned_at = time.monotonic()
        return self._conn

    async def run(
        self,
        operation: Callable[Concatenate[psycopg.AsyncConnection[Any], _P], Awaitable[_T]],
        /,
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """Run a db operation; after any failure the next one starts on a fresh connection."""
        conn = await self.get()
        try:
            return await operation(conn, *args, **kwargs)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


class Dispatcher:
    """Delivers due deliveries until the sidecar stops, then finishes what is in flight.

    Its four parts (loop, recorder, listener, doorbell) run under the sidecar's
    supervisor, which starts each again after a failure; behind a transaction pooler
    with no direct connection, only the first two.
    """

    def __init__(self, settings: Settings, sender: Sender, parts: Supervisor):
        self._settings = settings
        self._sender = sender
        self._parts = parts
        self._tasks: set[asyncio.Task[None]] = set()
        # Attempts in flight by webhook, and by account: each has a share of the slots.
        self._in_flight: Counter[int] = Counter()
        self._in_flight_accounts: Counter[str] = Counter()
        self._results: list[Result] = []
        self._results_ready = asyncio.Event()
        # What a claim under a backlog waits for, and a write under load gathers.
        self._half_slots = max(1, settings.concurrency // 2)
        self._wake = asyncio.Event()
        # How many free slots a finished attempt waits for before it wakes the loop
        # (0: the loop is not waiting for slots).
        self._wake_at_free = 0
        # LISTEN and the doorbell's lock need a session of their own: behind a transaction
        # pooler with no direct connection given, the dispatcher only polls.
        self._listen_url = settings.listen_url
        self._doorbell = Doorbell(
            self._listen_url or "",
            self._wake,
            settings.poll_interval,
            functools.partial(parts.beat, "doorbell"),
        )
        self._last_help = 0.0
        pooled = settings.pooled
        options = settings.connect_options
        url = settings.database_url
        self._claims = Connection(url, *(() if pooled else CLAIMS_SETUP), options=options)
        self._records = Connection(url, *(() if pooled else RECORDS_SETUP), options=options)

    async def run(self) -> None:
        """Until the sidecar stops; its parts run under the supervisor, which ends them."""
        stop = self._parts.stopping
        if self._listen_url is not None:
            self._parts.start("listen", self._listen)
            self._parts.start("doorbell", self._doorbell.run)
        else:
            log.warning(
                "poll-only: OUTBOX_DATABASE_POOLER is set and no OUTBOX_LISTEN_DATABASE_URL,"
                " so nothing wakes the dispatcher between polls",
                poll_interval=self._settings.poll_interval,
            )
        recorder = self._parts.start("record", lambda: self._record(stop))
        stopper = asyncio.create_task(self._wake_on(stop), name="stop")
        log.info("dispatcher started", concurrency=self._settings.concurrency)
        # Every wait of the loop is bounded: by the poll interval, the attempts' timeout
        # (waiting for free slots) or the pause after a database error.
        bound = self._settings.lease_seconds + self._settings.poll_interval
        try:
            await self._parts.start("loop", lambda: self._loop(stop), beat_within=bound)
        finally:
            stopper.cancel()
            log.info("stopping: finishing attempts in flight", in_flight=len(self._tasks))
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            self._results_ready.set()
            # The recorder may have been given up on, or may not manage within a lease.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(recorder, self._settings.lease_seconds)
            if self._results:
                log.error(
                    "results not recorded; those deliveries are retried when their lease ends",
                    unrecorded=len(self._results),
                )
            await self._claims.close()
            await self._records.close()
            log.info("dispatcher stopped")

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _sleep(self, within: float | None, *, free: int = 0) -> None:
        """Until something sets ``_wake`` (with ``free`` slots free, if given), or ``within``."""
        self._wake_at_free = free
        try:
            async with asyncio.timeout(within):
                await self._wake.wait()
        except TimeoutError:
            pass
        finally:
            self._wake_at_free = 0

    async def _loop(self, stop: asyncio.Event) -> None:
        concurrency = self._settings.concurrency
        # Under a backlog, wait for half the slots rather than claim a few at a time: each
        # claim is a round trip and a query plan, whatever its size.
        batch_min = self._half_slots
        backoff = 0.0
        while not stop.is_set():
            self._parts.beat("loop")
            # Cleared before looking, so whatever happens from here on wakes the sleep below.
            self._wake.clear()
            free = concurrency - len(self._tasks)
            if free < batch_min and self._tasks:
                await self._sleep(None, free=batch_min)
                continue
            try:
                jobs, claimed = await self._claim(free)
                if claimed == free:
                    # Busy: more is probably due. Producers need not ring; peers may help.
                    self._doorbell.want(False)
                    await self._ask_for_help()
                    self._start(jobs)
                    backoff = 0.0
                    continue
                self._start(jobs)
                due_in = await self._next_due()
                backoff = 0.0
            except psycopg.OperationalError as exc:
                backoff = min(BACKOFF_MAX, backoff * 2 or 0.1)
                log.warning("database unavailable, retrying", error=str(exc), retry_in=backoff)
                metrics.dispatcher_up(False)
                await self._sleep(backoff)
                continue
            if due_in is not None and due_in <= 0:
                # Due rows we could not take: held by a peer's claim, or for webhooks at
                # their share. A finished attempt or a moment's wait changes that.
                await self._sleep(CONTENDED_RETRY, free=1)
                continue
            self._doorbell.want(True)
            # NOTIFY only speeds things up: a notification sent while the listener was
            # reconnecting is lost, so look again now and then anyway.
            poll = self._settings.poll_interval
            await self._sleep(poll if due_in is None else min(poll, due_in))

    async def _claim(self, limit: int) -> Claimed:
        started = tracing.hooks.clock()
        claimed = await self._claims.run(
            db.deliveries.claim,
            limit=limit,
            lease_seconds=self._settings.lease_seconds,
            per_webhook=self._settings.per_webhook_limit,
            webhooks_in_flight=self._in_flight,
            per_account=self._settings.per_account_limit,
            accounts_in_flight=self._in_flight_accounts,
        )
        metrics.claimed(claimed.rows)
        tracing.hooks.claimed(started, limit, claimed)
        return claimed

    async def _next_due(self) -> float | None:
        return await self._claims.run(db.deliveries.next_due)

    async def _ask_for_help(self) -> None:
        now = time.monotonic()
        if now - self._last_help >= self._settings.poll_interval:
            self._last_help = now
            await self._claims.run(db.deliveries.wake_peers)

    def _start(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._in_flight[job.webhook_id] += 1
            self._in_flight_accounts[job.account_id] += 1
            task = asyncio.create_task(self._deliver(job))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._finished, job))

    def _finished(self, job: Job, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._in_flight[job.webhook_id] -= 1
        if not self._in_flight[job.webhook_id]:
            del self._in_flight[job.webhook_id]
        self._in_flight_accounts[job.account_id] -= 1
        if not self._in_flight_accounts[job.account_id]:
            del self._in_flight_accounts[job.account_id]
        if self._wake_at_free and (
            self._settings.concurrency - len(self._tasks) >= self._wake_at_free
        ):
            self._wake.set()

    async def _deliver(self, job: Job) -> None:
        if job.delay > 0:
            # Its turn under its webhook's rate limit (outbox.claim_v3()).
            await asyncio.sleep(job.delay)
        payload = wire.payload(job.format, job.event, job.timestamp, job.data)
        # One clock reading for the header and the record: the delivery log rebuilds
        # webhook-timestamp from started_at.
        sent_at = datetime.now(UTC)
        headers = wire.headers(
            message_id=str(job.id),
            event=job.event,
            attempt=job.attempt,
            payload=payload,
            secret=job.secret,
            now=int(sent_at.timestamp()),
            previous_secret=job.previous_secret,
            extra=job.headers,
        )
        attempt = await self._sender.post(job.url, payload, headers, started_at=sent_at)
        retry_in = None
        slowdown = False
        if attempt.ok:
            outcome = "succeeded"
        else:
            delays = self._settings.retry_delays
            counted = job.attempt - job.retry_base
            if attempt.status == 429 and job.slowdowns < SLOWDOWNS:
                # "Slow down" is not a failure: the same attempt again, later.
                retry_in = slowdown_delay(counted, delays, retry_after=attempt.retry_after)
                slowdown = retry_in is not None
            if not slowdown:
                retry_in = next_delay(counted, delays, retry_after=attempt.retry_after)
            outcome = "failed" if retry_in is None else "pending"
        metrics.attempt(outcome, attempt.duration_ms / 1000)
        tracing.hooks.attempted(job, attempt, outcome)
        log.info(
            "attempt",
            delivery_id=job.id,
            webhook_id=job.webhook_id,
            attempt=job.attempt,
            status=attempt.status,
            duration_ms=attempt.duration_ms,
            outcome=outcome,
            error=attempt.error,
            slowdown=slowdown,
        )
        self._results.append(Result(job, attempt, outcome, retry_in, slowdown))
        self._results_ready.set()

    async def _record(self, stop: asyncio.Event) -> None:
        """Write results back in batches: whatever finished while the last write ran,
        or, when that is little, what finishes within RECORD_LINGER (see _gather).

        A batch that cannot be written is put back before the failure goes up to the
        supervisor, so the part started again writes it: the leases outlast a short
        outage, and nothing already sent waits for its lease to be sent again.
        """
        while True:
            await self._results_ready.wait()
            self._results_ready.clear()
            if not self._results:
                if stop.is_set() and not self._tasks:
                    return
                continue
            await self._gather(stop)
            batch, self._results = self._results, []
            try:
                await self._write(batch)
            except BaseException:
                self._results[:0] = batch
                self._results_ready.set()
                raise
            self._parts.beat("record")
            if any(r.outcome == "pending" for r in batch):
                # A retry may now fall due before the loop's next look: let it look.
                self._wake.set()
            self._results_ready.set()

    async def _gather(self, stop: asyncio.Event) -> None:
        """Wait a moment for more results, up to half the slots' worth: a write costs
        the database about as much for one result as for ten, and nothing waits on it
        (the receiver has its delivery already; a retry falls due seconds later)."""
        if len(self._results) < 2:
            # A result at a time is a light load: lingering then made deliveries later, not
            # cheaper (make bench's latency section; figures in bench/README.md).
            return
        want = self._half_slots
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECORD_LINGER
        while len(self._results) < want and not stop.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._results_ready.wait()
            self._results_ready.clear()

    async def _write(self, batch: list[Result]) -> None:
        results: list[AttemptResult] = [
            {
                "id": r.job.id,
                "lease": r.job.lease,
                "attempt": r.job.attempt,
                "started_at": r.attempt.started_at.isoformat(),
                "duration_ms": r.attempt.duration_ms,
                "response_status": r.attempt.status,
                "error": r.attempt.error,
                "outcome": r.outcome,
                "retry_in": r.retry_in,
                "response_body": r.attempt.response_body,
                "slowdown": r.slowdown,
            }
            for r in batch
        ]
        started = tracing.hooks.clock()
        failed_for_good = await self._records.run(db.deliveries.record, results)
        tracing.hooks.recorded(started, (r.job for r in batch))
        after = self._settings.auto_disable_after
        if failed_for_good and after is not None:
            await self._auto_disable(failed_for_good, after)

    async def _auto_disable(self, webhook_ids: list[int], after: float) -> None:
        """Disable those of the webhooks that have not succeeded for ``after`` seconds."""
        try:
            disabled = await self._records.run(
                db.deliveries.auto_disable,
                webhook_ids,
                after_seconds=after,
                after_text=duration_words(after),
            )
        except psycopg.Error as exc:
            # The results are recorded; the next delivery that fails for good asks again.
            log.warning("cannot disable failing webhooks now", error=str(exc))
            return
        for webhook_id, account_id, reason in disabled:
            metrics.auto_disabled()
            log.warning(
                "webhook disabled: it kept failing",
                webhook_id=webhook_id,
                account_id=account_id,
                reason=reason,
            )

    async def _listen(self) -> None:
        """Turn NOTIFYs into wake-ups, on a connection of its own: waiting for
        notifications holds a psycopg connection's lock, so no query could share it."""
        assert self._listen_url is not None
        async with await db.connect(self._listen_url) as conn:
            await db.deliveries.listen(conn)
            # Anything committed while we were not listening is found by this poll.
            self._wake.set()
            while True:
                self._parts.beat("listen")
                async for _ in conn.notifies(timeout=30.0):
                    self._wake.set()
                # Now and then, make sure the connection is still alive.
                await db.deliveries.ping(conn)
