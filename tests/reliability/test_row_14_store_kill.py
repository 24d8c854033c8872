"""Row 14: the state store's writer is killed during commits, many times.

A child process appends audit entries (each in its own BEGIN IMMEDIATE transaction, WAL,
synchronous=FULL) and prints the id after each commit returns. It is SIGKILLed at random
moments; every id it acknowledged must be in the store, the store must pass
integrity_check and the audit hash chain must still verify."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from store.db import integrity, open_store
from store.records import audit_verify

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

WRITER = """
import sys
from pathlib import Path
from store.db import open_store
from store.records import audit
db = open_store(Path(sys.argv[1]))
while True:
    i = audit(db, "op", "console", "action", {"payload": "x" * 200}, "ok")
    sys.stdout.write(f"{i}\\n")
    sys.stdout.flush()
"""


def test_row_14_store_writer_killed_during_commit(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    open_store(path).close()
    acked: list[int] = []
    rnd = random.Random(14)
    for _ in range(25):
        p = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        time.sleep(rnd.uniform(0.3, 0.9))
        os.kill(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        acked += [int(x) for x in out.split()]
    assert len(acked) > 100
    db = open_store(path)  # start-up checks pass: not damaged
    assert integrity(db) == ["ok"]
    present = {r[0] for r in db.execute("SELECT id FROM audit")}
    missing = sorted(set(acked) - present)
    assert missing == [], f"acknowledged commits lost: {missing[:10]}"
    ok, detail = audit_verify(db)
    assert ok, detail
