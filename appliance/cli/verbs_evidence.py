"""Verbs for evidence packs (signed records of test runs and cutovers).

ferryman evidence list
ferryman evidence export RUN --to FILE      the pack's bytes, exactly as signed
ferryman evidence verify FILE [--key-fingerprint FP]
                                            exit 0: intact and signed by the trusted key
                                            (FP, else this appliance's); exit 1: the one
                                            line that says what failed

``verify`` runs offline (no daemon needed); it asks the daemon for this appliance's key
only when the state directory is not readable to the caller.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

from appliance import evidence
from appliance.cli import EXIT_ERROR, Output, table, verb_adder
from appliance.client import Client
from appliance.errors import FerrymanError


def evidence_list(args: argparse.Namespace) -> Output:
    with Client() as c:
        packs = c.evidence_packs()
    if not packs:
        return Output(packs, "no evidence packs yet: one is written when a run ends")
    rows = [
        (
            p.get("run_id"),
            p.get("run_kind"),
            f"{p.get('plan')} v{p.get('plan_version')}",
            p.get("outcome") or p.get("problem"),
            str(p.get("written_at") or "")[:19],
            p["file"],
        )
        for p in packs
    ]
    return Output(packs, table(rows, ["RUN", "KIND", "PLAN", "OUTCOME", "WRITTEN", "FILE"]))


def evidence_export(args: argparse.Namespace) -> Output:
    with Client() as c:
        data = c.evidence_pack(args.run)
    to = Path(args.to)
    try:
        to.write_bytes(data)
    except OSError as e:
        raise FerrymanError(
            f"cannot write {to}: {e.strerror}", hint="choose a writable path with --to"
        ) from e
    out = {
        "run": args.run,
        "file": str(to),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return Output(
        out,
        f"evidence pack of plan run {args.run} written to {to} ({len(data)} bytes, "
        f"sha256 {out['sha256']}); check it with: ferryman evidence verify {to}",
    )


def _this_appliance() -> str | None:
    """This appliance's key fingerprint: from the state directory, else from the daemon."""
    k = evidence.appliance_key()
    if k is not None:
        return k["fingerprint"]
    try:
        with Client() as c:
            return str(c.evidence_key()["fingerprint"])
    except FerrymanError:
        return None  # offline (an auditor's machine): only --key-fingerprint can vouch


def evidence_verify(args: argparse.Namespace) -> Output:
    path = Path(args.file)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FerrymanError(f"cannot read {path}: {e.strerror}", hint="check the path") from e
    mine = _this_appliance()
    v = evidence.verify(
        data, name=str(path), key_fingerprint=args.key_fingerprint, appliance_fingerprint=mine
    )
    out: dict[str, Any] = {**v.to_dict(), "this_appliance_key": mine}
    lines = [v.line()]
    if v.intact:
        lines.append(
            "signer: "
            + (
                f"{v.signer} = this appliance's key"
                if v.signer_is_this_appliance
                else f"{v.signer}, NOT this appliance's key ({mine})"
                if mine
                else f"{v.signer} (this appliance's key is unknown here)"
            )
        )
    return Output(out, "\n".join(lines), exit_code=0 if v.valid else EXIT_ERROR)


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("evidence", help="signed evidence packs of test runs and cutovers")
    verb = verb_adder(p.add_subparsers(dest="evidence_verb", metavar="VERB"), common)
    verb("list", evidence_list, "every evidence pack on this appliance")
    e = verb("export", evidence_export, "copy a run's pack to a file (bytes as signed)")
    e.add_argument("run", type=int, help="plan run id (test run or cutover)")
    e.add_argument("--to", required=True, help="file to write")
    v = verb("verify", evidence_verify, "check a pack's signature and who signed it")
    v.add_argument("file", help="the pack (.json)")
    v.add_argument(
        "--key-fingerprint",
        help="the signer you trust (SHA256:hex, as `ferryman evidence list` or the pack "
        "shows); default: this appliance's key",
    )
