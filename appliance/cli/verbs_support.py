"""``ferryman support-bundle``: logs, doctor output and a store summary as one tar.gz."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from appliance.cli import Output
from appliance.units import human_bytes


def support_bundle(args: argparse.Namespace) -> Output:
    from appliance.support import collect

    b = collect(
        Path(args.output) if args.output else None,
        full_doctor=args.full_doctor,
        store_copy=not args.no_store_copy,
    )
    lines = [f"support bundle {b.file} ({human_bytes(b.bytes)}, {len(b.members)} files)"]
    lines += [f"  not collected: {n}" for n in b.notes]
    return Output(b.to_dict(), "\n".join(lines))


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "support-bundle",
        help="logs, doctor output and a store summary as a tar.gz (never secrets)",
        parents=[common],
    )
    p.set_defaults(handler=support_bundle)
    p.add_argument("-o", "--output", help="file or directory (default: the current directory)")
    p.add_argument(
        "--full-doctor",
        action="store_true",
        help="run the slow doctor checks too (libguestfs launch, KVM probe)",
    )
    p.add_argument(
        "--no-store-copy",
        action="store_true",
        help="only the store summary, no sanitized copy of the store",
    )
