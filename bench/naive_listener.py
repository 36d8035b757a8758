"""The listener of the naive design: LISTENs on a channel and drains every notification.

    python -m bench.naive_listener --dsn DSN --channel bench_naive

Attached during the naive-NOTIFY producer case so that the notification queue is read
as it would be in production. Prints ``ready`` once listening; on SIGTERM prints the
number of notifications received and exits.
"""

from __future__ import annotations

import argparse
import signal
import sys

import psycopg
from psycopg import sql


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_listener")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--channel", default="bench_naive")
    args = parser.parse_args()
    received = 0

    def stop(*_: object) -> None:
        print(received, flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(args.channel)))
        print("ready", flush=True)
        while True:
            for _ in conn.notifies(timeout=1.0):
                received += 1


if __name__ == "__main__":
    main()
