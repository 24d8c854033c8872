"""Seeding benchmarks (issue 12): what encryption, hashing and per-chunk durability cost.

A 1 GiB raw disk holding 512 MiB of random data (8 runs of 64 MiB) is synced in full by
appliance A (a real ferrymand). Then, alternating in the same run:

- seed_export_vs_qemu_img: ``ferryman seed export`` of that restore point (64 MiB chunks,
  AES-256-GCM, sha256 per block and per chunk, fsync per chunk) into an empty directory,
  timed by the job's own start and end; reference: ``qemu-img convert -O raw`` of the same
  point (the flattened copy without encryption or hashes) into the same filesystem, then
  fsync. ratio = ours / reference (time).
- seed_import_vs_qemu_img: ``ferryman seed import`` of that seed on appliance B (checks every
  chunk three ways, writes a chain base through qemu-nbd, reads it back); reference:
  ``qemu-img convert -O qcow2`` of the raw copy into a new qcow2, then fsync.
  ratio = ours / reference.

Medians of FERRYMAN_BENCH_RUNS runs (default 3). The daemons' peak RSS is in ``detail``.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
IDS = ["seed_export_vs_qemu_img", "seed_import_vs_qemu_img"]
MiB = 1024 * 1024
RUNS = int(os.environ.get("FERRYMAN_BENCH_RUNS", "3"))
GOAL = 2.0  # encryption + hashes + fsync per chunk may at most double a plain copy


def _job_s(job: dict[str, Any]) -> float:
    t0 = datetime.fromisoformat(job["started_at"])
    t1 = datetime.fromisoformat(job["ended_at"])
    return (t1 - t0).total_seconds()


def _timed(*cmd: str, out: Path) -> float:
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True)
    with open(out, "rb+") as f:
        os.fsync(f.fileno())
    return time.monotonic() - t0


def _hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(ids: list[str]) -> list[dict[str, Any]]:
    if not set(ids) & set(IDS):
        return []
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.helpers.daemon import Env, running_daemon
    from tests.helpers.nbdsrc import Export, cli, point_path, register

    base = Path(os.environ.get("FERRYMAN_TEST_SCRATCH", "/var/tmp"))
    with tempfile.TemporaryDirectory(prefix="ferryman-bench-seed-", dir=base) as tmp:
        t = Path(tmp)
        img = t / "disk.raw"
        rnd = random.Random(12)
        with open(img, "wb") as f:
            f.truncate(1024 * MiB)
            for i in range(8):
                f.seek(i * 128 * MiB)
                f.write(rnd.randbytes(64 * MiB))
        src = Export(img, t / "src.sock")
        src.start()
        key = t / "seed.key"
        a, b = Env(t / "a"), Env(t / "b")
        exp_ours: list[float] = []
        exp_ref: list[float] = []
        imp_ours: list[float] = []
        imp_ref: list[float] = []
        try:
            with running_daemon(a, "--no-probe") as da, running_daemon(b, "--no-probe") as db:
                cli(a, "seed", "keygen", str(key))
                register(a, src)
                register(b, src)
                cli(a, "sync", "web01", "--wait")
                point, _rp = point_path(a, "web01")
                for i in range(RUNS):
                    seed = t / "media" / f"seed{i}"
                    job = cli(
                        a,
                        "seed",
                        "export",
                        "web01",
                        "--to",
                        str(seed),
                        "--key-file",
                        str(key),
                        "--wait",
                    )
                    assert job["state"] == "succeeded", job
                    exp_ours.append(_job_s(job))
                    raw = t / "media" / f"ref{i}.raw"
                    exp_ref.append(
                        _timed(
                            "qemu-img",
                            "convert",
                            "-U",
                            "-f",
                            "qcow2",
                            "-O",
                            "raw",
                            str(point),
                            str(raw),
                            out=raw,
                        )
                    )
                    job = cli(b, "seed", "import", str(seed), "--key-file", str(key), "--wait")
                    assert job["state"] == "succeeded", job
                    imp_ours.append(_job_s(job))
                    cli(b, "point", "delete", str(job["result"]["restore_point"]))
                    q = t / f"ref{i}.qcow2"
                    imp_ref.append(
                        _timed(
                            "qemu-img",
                            "convert",
                            "-f",
                            "raw",
                            "-O",
                            "qcow2",
                            "-o",
                            "cluster_size=65536",
                            str(raw),
                            str(q),
                            out=q,
                        )
                    )
                    raw.unlink()
                    q.unlink()
                ra, rb = _hwm_mib(da.proc.pid), _hwm_mib(db.proc.pid)
                rss = f"peak RSS of ferrymand A {ra:.0f} MiB, B {rb:.0f} MiB"
        finally:
            src.stop()
    load = os.getloadavg()[0]
    out = []
    for id_, ours, ref, what in (
        ("seed_export_vs_qemu_img", exp_ours, exp_ref, "export"),
        ("seed_import_vs_qemu_img", imp_ours, imp_ref, "import"),
    ):
        if id_ not in ids:
            continue
        mo, mr = statistics.median(ours), statistics.median(ref)
        out.append(
            {
                "id": id_,
                "ours": round(mo, 2),
                "reference": round(mr, 2),
                "ratio": round(mo / mr, 2),
                "goal": GOAL,
                "unit": "s",
                "detail": f"1 GiB disk, 512 MiB data; {what} runs {[round(x, 1) for x in ours]} s "
                f"vs qemu-img {[round(x, 1) for x in ref]} s; {512 / mo:.0f} MiB/s of data; "
                f"{rss}; load average {load:.1f}",
            }
        )
    return out
