"""Idle commit -> receipt: one event at a time, the sidecar idle in between.

    .venv/bin/python -m bench.idle_wakeup [--poll 600] [--events 200]

With --poll 600 the fallback poll is out of the picture, so what is measured is the
wake-up by the committing transaction itself (the doorbell's NOTIFY).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import trustme

from bench.common import sidecar_env
from outbox import db
from tests.receiver import Receiver
from tools import localpg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--poll", default="1", help="OUTBOX_POLL_INTERVAL for the sidecar")
    parser.add_argument("--events", type=int, default=200)
    args = parser.parse_args()

    url = localpg.ensure_database(localpg.server(), "outbox_idle_wakeup")
    asyncio.run(db.migrate(url))
    ca = trustme.CA()
    with tempfile.TemporaryDirectory() as tmp:
        ca_file = str(Path(tmp) / "ca.pem")
        ca.cert_pem.write_to_path(ca_file)
        receiver = Receiver(ca).start()
        conn = psycopg.connect(url, autocommit=True)
        conn.execute("DELETE FROM outbox.webhooks WHERE account_id = 'idle'")
        conn.execute(
            "INSERT INTO outbox.webhooks (account_id, name, url, event)"
            " VALUES ('idle', 'idle', %s, 'lead.scored')",
            (receiver.url(),),
        )
        env = sidecar_env(url, ca_file, OUTBOX_POLL_INTERVAL=args.poll)
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "outbox", "run"], env=env, stderr=subprocess.DEVNULL
        )
        try:
            time.sleep(2)
            latencies = []
            for n in range(1, args.events + 1):
                start = time.time()
                conn.execute("SELECT outbox.emit('idle', 'lead.scored', '{}')")
                latencies.append((receiver.wait_for(n)[-1].at - start) * 1000)
                time.sleep(0.05)
        finally:
            sidecar.terminate()
            sidecar.wait(30)
            receiver.stop()
            conn.close()
    latencies.sort()
    print(
        f"idle commit->receipt over {len(latencies)} events (poll {args.poll} s):"
        f" median {statistics.median(latencies):.2f} ms,"
        f" p95 {latencies[int(0.95 * len(latencies))]:.2f} ms, max {latencies[-1]:.2f} ms"
    )


if __name__ == "__main__":
    main()
