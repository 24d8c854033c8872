"""``ferryman seed``: the first full copy on removable media, deltas over the thin link.

ferryman seed keygen /root/web01.key
ferryman seed export web01 --to /mnt/usb/web01 --key-file /root/web01.key --wait
ferryman seed verify /mnt/usb/web01 --key-file /root/web01.key --wait
ferryman seed import /mnt/usb/web01 --key-file /root/web01.key --wait
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.cli import Output, verb_adder
from appliance.cli.verbs_machines import _maybe_wait, parse_rate
from appliance.client import Client
from appliance.units import human_bytes


def _abs(p: str | None) -> str | None:
    return str(Path(p).resolve()) if p else None


def _keys(args: argparse.Namespace) -> dict[str, Any]:
    return {"key_file": _abs(args.key_file), "passphrase_file": _abs(args.passphrase_file)}


def _job(what: str, submit: Callable[[Client], dict[str, Any]], wait: bool) -> Output:
    """Start the job; with --wait, its outcome. On failure the job's error is the one line
    the engineer needs (it names the chunk, the disk and the offset)."""
    with Client() as c:
        out = _maybe_wait(c, submit(c), wait, what)
    job = out.data
    if out.exit_code and isinstance(job, dict) and job.get("error"):
        return Output(job, f"{what} failed: {job['error']}", out.exit_code)
    return out


def seed_export(args: argparse.Namespace) -> Output:
    to = str(Path(args.to).resolve())
    return _job(
        f"seed export of {args.machine}",
        lambda c: c.seed_export(
            args.machine, to, point=args.point, chunk_size=args.chunk_size, **_keys(args)
        ),
        args.wait,
    )


def seed_import(args: argparse.Namespace) -> Output:
    d = str(Path(args.dir).resolve())
    return _job(
        f"seed import from {d}",
        lambda c: c.seed_import(d, machine=args.machine, **_keys(args)),
        args.wait,
    )


def seed_verify(args: argparse.Namespace) -> Output:
    d = str(Path(args.dir).resolve())
    return _job(f"seed verify of {d}", lambda c: c.seed_verify(d, **_keys(args)), args.wait)


def seed_show(args: argparse.Namespace) -> Output:
    from appliance.seeding import describe

    s = describe(Path(args.dir).resolve())
    disks = ", ".join(f"{d['key']} {human_bytes(d['size'])}" for d in s["disks"])
    lines = [
        f"seed {s['seed_id']} of {s['machine']['name']}: {s['state']}",
        f"  restore point {s['point']['id']}, source time {s['point']['source_time'][:19]} UTC",
        f"  disks {disks}; chunks of {human_bytes(s['chunk_size'])}, {s['chunk_files']} "
        f"stored, key from a {s['kdf']}",
    ]
    if s["state"] == "complete":
        lines.append(
            f"  {human_bytes(s['data_bytes'] or 0)} of data, {s['zero_chunks']} zero chunks"
        )
    return Output(s, "\n".join(lines))


def seed_keygen(args: argparse.Namespace) -> Output:
    from appliance.seeding import keygen

    p = keygen(Path(args.file))
    return Output(
        {"key_file": str(p)},
        f"new seed key in {p} (mode 0600). Carry it apart from the media: by hand, or read "
        "it out over a separate channel.",
    )


def _key_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--key-file", help="file with the 32-byte key (ferryman seed keygen)")
    g.add_argument("--passphrase-file", help="file whose first line is the passphrase")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    verb = verb_adder(sub, common)
    seed = sub.add_parser(
        "seed", help="carry a first full copy on removable media", parents=[common]
    )
    ssub = seed.add_subparsers(dest="seed_verb", metavar="ACTION")
    p = verb("export", seed_export, "write a restore point to a directory or disk, encrypted", ssub)
    p.add_argument("machine")
    p.add_argument("--point", type=int, help="restore point id (default: the newest)")
    p.add_argument("--to", required=True, help="directory on the media; re-run to resume")
    p.add_argument("--chunk-size", type=parse_rate, help="default 64MiB")
    _key_args(p)
    p.add_argument("--wait", action="store_true")
    p = verb("import", seed_import, "make a seed the first restore point of a machine", ssub)
    p.add_argument("dir")
    p.add_argument("--machine", help="machine here (default: the seed's machine name)")
    _key_args(p)
    p.add_argument("--wait", action="store_true")
    p = verb("verify", seed_verify, "read and check every chunk of a seed", ssub)
    p.add_argument("dir")
    _key_args(p)
    p.add_argument("--wait", action="store_true")
    p = verb("show", seed_show, "what a seed holds (no key needed)", ssub)
    p.add_argument("dir")
    p = verb("keygen", seed_keygen, "write a new random seed key to a new file", ssub)
    p.add_argument("file")
