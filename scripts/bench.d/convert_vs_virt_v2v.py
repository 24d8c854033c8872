"""Benchmark convert_vs_virt_v2v: built-in Linux converter vs virt-v2v-in-place.

Both convert the same vmware-like Debian 12 image (images/guests) on their own overlay, in one
run, under the same conditions (TCG libguestfs appliance); each result is then booted on
virtio to prove it. The reference is `virt-v2v-in-place` alone (Ferryman's virt-v2v backend
adds fix-ups after it, not counted here). ``ours`` and ``reference`` are wall-clock seconds
of the conversion alone (overlay creation, inspection, conversion, verification); the boot
is not counted, but ``detail`` says whether each result booted and how long the boot took.

Goal: ours / reference <= 0.5 (conversion sits on the RTO path of every cutover).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
GOAL = 0.5


def _image() -> Path:
    sys.path.insert(0, str(ROOT / "images" / "guests"))  # as images/README.md says
    import builder

    return Path(builder.build("vmware-like"))


def run() -> list[dict[str, Any]]:
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from appliance.convert.api import convert, create_overlay
    from appliance.convert.boot import boot
    from appliance.convert.v2v import run_virt_v2v_in_place

    image = _image()
    times: dict[str, float] = {}
    boots: dict[str, str] = {}
    steps: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="ferryman-bench-convert-") as tmp:
        work = Path(tmp)
        for backend in ("builtin", "virt-v2v"):
            overlay = work / f"{backend}.qcow2"
            t0 = time.monotonic()
            if backend == "builtin":
                steps[backend] = convert(image, overlay, backend="builtin").steps
            else:
                # The reference is the tool alone, without Ferryman's fix-ups around it.
                create_overlay(image, overlay)
                run_virt_v2v_in_place(overlay, log_path=work / "virt-v2v.log")
            times[backend] = time.monotonic() - t0
            b = boot(overlay, console=work / f"{backend}.console", disk_bus="virtio", timeout=300)
            root = b.fields.get("root", "?")
            boots[backend] = (
                f"booted on virtio in {b.seconds:.0f} s (root={root})"
                if b.booted
                else f"did NOT boot: {b.reason}"
            )
            overlay.unlink(missing_ok=True)
    ours, ref = times["builtin"], times["virt-v2v"]
    ratio = ours / ref
    detail = (
        f"vmware-like Debian 12, TCG, {os.cpu_count()} cores. built-in {ours:.1f} s "
        f"(steps {steps['builtin']}): {boots['builtin']}. virt-v2v-in-place alone {ref:.1f} s: "
        f"{boots['virt-v2v']}. ratio {ratio:.2f} {'meets' if ratio <= GOAL else 'misses'} "
        f"the goal <= {GOAL}."
    )
    return [
        {
            "id": "convert_vs_virt_v2v",
            "ours": round(ours, 1),
            "reference": round(ref, 1),
            "ratio": round(ratio, 3),
            "goal": f"<= {GOAL}",
            "unit": "s",
            "detail": detail,
        }
    ]


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
