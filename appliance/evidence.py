"""Evidence packs: one signed file per test run and cutover that an auditor reads offline.

A pack is a JSON object whose top-level keys are its sections, summary first (plan, run,
measured RTO per machine and phase, achieved RPO, block hashes of every disk that booted,
preflight verdicts, operator actions from the audit trail, jobs), followed by ``signature``:

    signature.sections   the SHA-256 of each section's canonical JSON
    signature.value      Ed25519 over the canonical JSON of the signature block without
                         "value" (so over the section digests, the public key, the time)

Canonical JSON is ``json.dumps(x, sort_keys=True, separators=(",", ":"),
ensure_ascii=False)`` in UTF-8; a few lines of Python (docs/evidence.md) check a pack with
nothing but the ``cryptography`` package. Digests per section let ``verify`` name the
section that was edited instead of only saying "bad signature". The file itself is the
indented rendering of the same object; a file whose bytes differ from that rendering (an edit
in whitespace) is reported too: it is not the file this appliance wrote.

The signing key is the appliance's own Ed25519 key, created on first use in the state
directory (``evidence.key``, PKCS#8 PEM, root-only 0600) with its public half beside it
(``evidence.pub``, 0644). The private key never leaves the state directory; each pack
carries the public key and its fingerprint: SHA-256 of the key's DER SubjectPublicKeyInfo,
which ``openssl pkey -pubin -outform DER | sha256sum`` computes too.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlite_utils import Database

from appliance import __version__
from appliance.config import paths
from appliance.errors import FerrymanError, NotFound
from store.db import loads, now

log = logging.getLogger(__name__)

FORMAT = "ferryman-evidence/1"
KEY_NAME = "evidence.key"  # Ed25519 private key, PKCS#8 PEM, 0600
PUB_NAME = "evidence.pub"  # its public key, SubjectPublicKeyInfo PEM, 0644
DIR_NAME = "evidence"
CANONICAL = (
    "UTF-8 JSON, keys sorted, no whitespace: Python "
    "json.dumps(x, sort_keys=True, separators=(',', ':'), ensure_ascii=False)"
)
# Run states after which a pack is written (a failed cutover step can be repeated or rolled
# back: each such end writes a new pack that names the one it supersedes).
REQUEST_AUDIT_WAIT_S = 10.0  # see await_request_audit
TEST_END = ("succeeded", "failed", "cancelled", "interrupted")
CUTOVER_END = ("committed", "rolled-back", "failed", "interrupted")


class EvidenceError(FerrymanError):
    code = "evidence"


# -- canonical form, signing, verification (pure: no store, no daemon) ------------------------


def canonical(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def render(pack: dict[str, Any]) -> bytes:
    """The file's bytes: indented, in the pack's own key order (summary first)."""
    return (json.dumps(pack, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def digest(obj: Any) -> str:
    return hashlib.sha256(canonical(obj)).hexdigest()


def fingerprint(pub: Ed25519PublicKey) -> str:
    der = pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "SHA256:" + hashlib.sha256(der).hexdigest()


def normalise_fingerprint(fp: str) -> str:
    """'SHA256:ab:CD..', 'abcd..' and 'sha256:ABCD' compare equal."""
    s = fp.strip().lower()
    s = s.removeprefix("sha256:")
    return "SHA256:" + s.replace(":", "").replace(" ", "")


def public_pem(pub: Ed25519PublicKey) -> str:
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def sign(
    body: dict[str, Any], key: Ed25519PrivateKey, signed_at: str | None = None
) -> dict[str, Any]:
    """``body`` (sections in reading order) with its signature block appended."""
    if "signature" in body:
        body = {k: v for k, v in body.items() if k != "signature"}
    pub = key.public_key()
    sig: dict[str, Any] = {
        "algorithm": "Ed25519",
        "key_fingerprint": fingerprint(pub),
        "public_key_pem": public_pem(pub),
        "signed_at": signed_at or now(),
        "canonical_json": CANONICAL,
        "signed_message": "the canonical JSON of this signature block without 'value'",
        "sections": {name: digest(value) for name, value in body.items()},
    }
    sig["value"] = base64.b64encode(key.sign(canonical(sig))).decode()
    return {**body, "signature": sig}


@dataclass
class Verdict:
    """What ``verify`` found. ``valid``: intact AND signed by the trusted key."""

    file: str
    intact: bool = False
    valid: bool = False
    problem: str | None = None
    signer: str | None = None
    signed_at: str | None = None
    trusted_key: str | None = None
    trusted_by: str | None = None  # "--key-fingerprint" | "this appliance" | None
    signer_is_this_appliance: bool | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        if self.problem:
            return f"{self.file}: INVALID: {self.problem}"
        s = self.summary
        what = (
            f"{'test run' if s.get('run_kind') == 'test' else 'cutover'} {s.get('run_id')} of "
            f"plan {s.get('plan')} v{s.get('plan_version')} ({s.get('outcome')})"
        )
        who = (
            "this appliance's key"
            if self.signer_is_this_appliance
            else "the key given with --key-fingerprint"
            if self.trusted_by == "--key-fingerprint"
            else "a key not checked against any trusted key (give --key-fingerprint)"
        )
        return f"{self.file}: VALID: {what}, signed {self.signed_at} by {who} {self.signer}"


def _first_difference(a: bytes, b: bytes) -> tuple[int, int]:
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return n, a[:n].count(b"\n") + 1


def verify(
    data: bytes,
    *,
    name: str = "pack",
    key_fingerprint: str | None = None,
    appliance_fingerprint: str | None = None,
) -> Verdict:
    """Check a pack's bytes. The first problem found is named in one line."""
    v = Verdict(file=name)
    try:
        pack = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        v.problem = f"not UTF-8 at byte {e.start}: the file was damaged"
        return v
    except json.JSONDecodeError as e:
        v.problem = f"not valid JSON at line {e.lineno} column {e.colno} ({e.msg}): damaged or cut"
        return v
    if not isinstance(pack, dict) or not isinstance(pack.get("signature"), dict):
        v.problem = "no signature block: not a Ferryman evidence pack, or the signature was removed"
        return v
    sig = dict(pack["signature"])
    body = {k: val for k, val in pack.items() if k != "signature"}
    summary = body.get("summary")
    v.summary = summary if isinstance(summary, dict) else {}
    try:
        value = base64.b64decode(str(sig.pop("value")), validate=True)
        pub = serialization.load_pem_public_key(str(sig["public_key_pem"]).encode())
    except (KeyError, ValueError, TypeError) as e:
        v.problem = f"the signature block is damaged ({type(e).__name__}: {e})"
        return v
    if not isinstance(pub, Ed25519PublicKey):
        v.problem = "the embedded public key is not an Ed25519 key"
        return v
    v.signer = fingerprint(pub)
    v.signed_at = str(sig.get("signed_at"))
    if normalise_fingerprint(str(sig.get("key_fingerprint", ""))) != v.signer:
        v.problem = (
            f"the fingerprint in the signature block ({sig.get('key_fingerprint')}) is not the "
            f"embedded public key's ({v.signer}): the signature block was edited"
        )
        return v
    try:
        pub.verify(value, canonical(sig))
    except InvalidSignature:
        v.problem = (
            "the signature does not match the signature block: its section digests, key or "
            "time were edited"
        )
        return v
    signed = sig.get("sections") or {}
    for s in signed:
        if s not in body:
            v.problem = f"section '{s}' was removed after signing"
            return v
    for s, val in body.items():
        if s not in signed:
            v.problem = f"section '{s}' was added after signing"
            return v
        got = digest(val)
        if got != signed[s]:
            v.problem = (
                f"section '{s}' was changed after signing: its SHA-256 is {got[:16]}..., "
                f"the signed one {str(signed[s])[:16]}..."
            )
            return v
    again = render(pack)
    if again != data:
        off, line = _first_difference(data, again)
        v.problem = (
            f"byte {off} (line {line}) differs from the rendering that was signed: whitespace "
            "or key order was edited (the signed content itself is intact)"
        )
        return v
    v.intact = True
    if appliance_fingerprint:
        v.signer_is_this_appliance = v.signer == normalise_fingerprint(appliance_fingerprint)
    if key_fingerprint:
        v.trusted_key, v.trusted_by = normalise_fingerprint(key_fingerprint), "--key-fingerprint"
    elif appliance_fingerprint:
        v.trusted_key, v.trusted_by = normalise_fingerprint(appliance_fingerprint), "this appliance"
    if v.trusted_key and v.signer != v.trusted_key:
        whose = "the one given with --key-fingerprint" if key_fingerprint else "this appliance's"
        v.problem = f"intact, but signed by a FOREIGN key {v.signer}, not {whose} {v.trusted_key}"
        return v
    v.valid = True
    return v


# -- the appliance's key ---------------------------------------------------------------------


def key_path() -> Path:
    return paths().state_dir / KEY_NAME


def pub_path() -> Path:
    return paths().state_dir / PUB_NAME


def evidence_dir() -> Path:
    return paths().state_dir / DIR_NAME


def _write_file(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def signing_key() -> Ed25519PrivateKey:
    """The appliance's key: created on first use (0600, O_EXCL), refused if others can read it."""
    p = key_path()
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        with contextlib.suppress(FileExistsError):
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            log.info("created the evidence signing key %s", p)
    if p.stat().st_mode & 0o077:
        raise EvidenceError(
            f"the evidence signing key {p} is readable by others", hint=f"chmod 600 {p}"
        )
    key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise EvidenceError(
            f"{p} is not an Ed25519 private key",
            hint="move it away; a new key is made at the next pack (older packs keep theirs)",
        )
    pub = public_pem(key.public_key()).encode()
    pp = pub_path()
    if not pp.exists() or pp.read_bytes() != pub:
        _write_file(pp, pub, 0o644)
    return key


def appliance_key() -> dict[str, str] | None:
    """This appliance's public key and fingerprint from the state directory, if readable."""
    for p in (pub_path(), key_path()):
        try:
            raw = p.read_bytes()
        except OSError:
            continue
        try:
            if p.name == PUB_NAME:
                pub = serialization.load_pem_public_key(raw)
            else:
                k = serialization.load_pem_private_key(raw, password=None)
                pub = k.public_key()  # type: ignore[assignment]
        except ValueError:
            continue
        if isinstance(pub, Ed25519PublicKey):
            return {"fingerprint": fingerprint(pub), "public_key_pem": public_pem(pub)}
    return None


# -- what goes into a pack -----------------------------------------------------------------------


def _iso(epoch: float | None) -> str | None:
    return datetime.fromtimestamp(float(epoch), UTC).isoformat() if epoch else None


def _age(later: str | None, earlier: str | None) -> float | None:
    if not later or not earlier:
        return None
    return round(
        (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds(), 2
    )


MANIFEST_HOW = (
    "reused: the block-hash manifest ferrymand recorded for this restore point when it was "
    "made or verified: SHA-256 of each block of the point's whole virtual disk (its qcow2 "
    "backing chain included), read over NBD through qemu-nbd; blocks that NBD block status "
    "reports as zero are hashed as zeroes without being read"
)
HASHED_HOW = (
    "hashed for this pack: qemu-nbd --read-only served the point's qcow2 (backing chain "
    "included) and ferrymand read it over NBD (libnbd): SHA-256 of each block of the whole "
    "virtual disk; blocks that block status reports as zero are hashed as zeroes unread"
)
HASHES_FORMAT = (
    "hashes_b64: base64 of the concatenated 32-byte SHA-256 digests, block 0 first; "
    "digest: SHA-256 of that concatenation"
)


def disk_evidence(db: Database, rp_id: int, holder: str) -> list[dict[str, Any]]:
    """Block hashes of each disk of a restore point: the engine's manifest where it has one,
    otherwise read now (the point held by a reader so retention cannot merge it meanwhile)."""
    from appliance.datapath.chain import DiskChain
    from appliance.datapath.hashing import HashManifest, hash_export
    from appliance.datapath.writer import QemuNbd
    from appliance.replication import point_name, writer_dir

    rows = db.execute(
        "SELECT rp.session_id, rp.state, d.disk_key, d.path, d.size, d.manifest "
        "FROM restore_points rp JOIN restore_point_disks d ON d.restore_point_id = rp.id "
        "WHERE rp.id=? ORDER BY d.disk_key",
        [rp_id],
    ).fetchall()
    if not rows:
        return [{"restore_point": rp_id, "hashed": False, "why": "no such restore point"}]
    out: list[dict[str, Any]] = []
    for session_id, state, key, path, size, manifest in rows:
        base: dict[str, Any] = {"disk": key, "restore_point": rp_id, "size": size, "image": path}
        try:
            if manifest and Path(manifest).exists():
                man = HashManifest.load(Path(manifest))
                how = {"method": MANIFEST_HOW, "manifest": manifest}
            elif state != "sealed" or not Path(path).exists():
                out.append(
                    {
                        **base,
                        "hashed": False,
                        "why": f"restore point {rp_id} was {state} before the pack was "
                        "written and had no hash manifest",
                    }
                )
                continue
            else:
                chain = DiskChain(Path(path).parent)
                with (
                    chain.reading(point_name(int(session_id)), holder) as p,
                    QemuNbd(p, writer_dir(), read_only=True) as reader,
                ):
                    man = hash_export(reader.uri, disk=str(key))
                how = {"method": HASHED_HOW}
        except (FerrymanError, OSError, ValueError) as e:
            out.append({**base, "hashed": False, "why": f"could not be hashed: {e}"})
            continue
        zero_full = hashlib.sha256(bytes(man.block_size)).digest()
        out.append(
            {
                **base,
                "hashed": True,
                **how,
                "algo": man.algo,
                "block_size": man.block_size,
                "blocks": man.blocks,
                "zero_blocks": sum(1 for h in man.hashes if h == zero_full),
                "digest": man.digest(),
                "format": HASHES_FORMAT,
                "hashes_b64": base64.b64encode(b"".join(man.hashes)).decode(),
            }
        )
    return out


def collect_disks(db: Database, report: dict[str, Any], holder: str) -> dict[str, Any]:
    """Disk evidence of every machine a run resolved (call while the run still reads them)."""
    out: dict[str, Any] = {}
    for name, m in sorted((report.get("machines") or {}).items()):
        rp = (m.get("restore_point") or {}).get("id")
        out[name] = disk_evidence(db, int(rp), holder) if rp is not None else []
    return out


def _audit(
    db: Database, start: str, end: str, run: dict[str, Any], machines: list[str], jobs: list[int]
) -> dict[str, Any]:
    from store.records import audit_verify

    rp_ids = {
        (m.get("restore_point") or {}).get("id")
        for m in (run["report"].get("machines") or {}).values()
    }
    picked = []
    for rid, ts, who, origin, action, params, result, h in db.execute(
        "SELECT id, ts, who, origin, action, params, result, hash FROM audit "
        "WHERE ts >= ? AND ts <= ? ORDER BY id",
        [start, end],
    ):
        p = loads(params) or {}
        path = str(p.get("path", ""))
        mine = (
            p.get("run") == run["id"]
            or p.get("plan") == run["plan"]
            or p.get("machine") in machines
            or (action == "job.cancel" and p.get("job") in jobs)
            or (action == "restore_point.delete" and p.get("id") in rp_ids)
            or any(f"/{w}/{run['id']}/" in f"{path}/" for w in ("testruns", "cutovers"))
            or f"/plans/{run['plan']}/" in f"{path}/"
        )
        if mine:
            picked.append(
                {
                    "ts": ts,
                    "who": who,
                    "origin": origin,
                    "action": action,
                    "params": p,
                    "result": result,
                    "audit_id": rid,
                    "audit_hash": h,
                }
            )
    ok, detail = audit_verify(db)
    head = db.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    return {
        "selection": (
            f"audit entries from the run's start ({start}) until this pack was written ({end}) "
            "that name this run, its plan, its machines, its jobs or its restore points"
        ),
        "actions": picked,
        "audit_chain": {
            "intact": ok,
            "detail": detail,
            "head": {"id": head[0], "hash": head[1]} if head else None,
        },
    }


def _jobs(db: Database, run_id: int) -> list[dict[str, Any]]:
    cols = [
        "id",
        "kind",
        "state",
        "requested_by",
        "origin",
        "created_at",
        "started_at",
        "ended_at",
        "error",
        "params",
    ]
    rows = db.execute(
        f"SELECT {', '.join(cols)} FROM jobs WHERE kind IN ('testrun','cutover') "
        "AND json_extract(params, '$.run') = ? ORDER BY id",
        [run_id],
    ).fetchall()
    out = [dict(zip(cols, r, strict=True)) for r in rows]
    for j in out:
        j["params"] = loads(j["params"]) or {}
    return out


def _outcome(run: dict[str, Any]) -> str:
    rep, state = run["report"], run["state"]
    t = rep.get("totals") or {}
    ready = f"{t.get('ready', 0)}/{t.get('machines', 0)} machines ready"
    if run["kind"] == "test":
        if state == "succeeded":
            return f"test run succeeded: {ready}, RTO {t.get('rto_s')} s"
        return f"test run {state}: {ready}" + (f": {rep['error']}" if rep.get("error") else "")
    if state == "committed":
        return f"cutover committed: {ready}, downtime {rep.get('downtime_s')} s"
    if state == "rolled-back":
        return "cutover rolled back: targets discarded, sources restarted where it stopped them"
    return (
        f"cutover {state} at step {run['step']}: {rep.get('error') or 'see steps'}; "
        "it can be repeated or rolled back (a new pack is written then)"
    )


def _preflight(db: Database, rep: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    """The plan's preflight (cutover) and each machine's conversion preflight verdict."""
    planned = {m.get("machine"): m for m in doc.get("machines") or []}
    conv: dict[str, Any] = {}
    for n, m in sorted((rep.get("machines") or {}).items()):
        c = m.get("conversion") or {}
        row = db.execute(
            "SELECT inspection FROM restore_points WHERE id=?",
            [(m.get("restore_point") or {}).get("id")],
        ).fetchone()
        insp = (loads(row[0]) if row else None) or {}
        if c.get("preflight"):
            conv[n] = {"source": "the conversion of this run", **c["preflight"]}
        elif insp.get("preflight"):
            conv[n] = {"source": "stored with the restore point (inspect)", **insp["preflight"]}
        elif c.get("backend"):
            conv[n] = {
                "source": "implied",
                "ok": True,
                "detail": f"the {c['backend']} conversion ran: it refuses a guest its "
                "preflight blocks",
            }
        else:
            conv[n] = {
                "source": "none",
                "detail": "no conversion preflight ran (plan conversion: "
                f"{(planned.get(n) or {}).get('conversion', 'auto')})",
            }
    plan = rep.get("preflight") or [
        {
            "check": "plan valid against the inventory",
            "ok": True,
            "detail": "a test run starts only when its plan validates; nothing else is checked "
            "before it",
            "fix": "",
        }
    ]
    return {"plan": plan, "conversion": conv}


def build(db: Database, run_id: int, disks: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pack's sections (unsigned) for a plan run as the store has it now."""
    from appliance.plans import records

    run = records.run(db, run_id)
    plan = records.by_id(db, run["plan_id"])
    rep: dict[str, Any] = run["report"] or {}
    kind = run["kind"]
    machines: dict[str, Any] = rep.get("machines") or {}
    steps = rep.get("steps") or []
    jobs = _jobs(db, run_id)
    totals = rep.get("totals") or {}
    written = now()

    rto_machines = {}
    for n, m in sorted(machines.items()):
        ph = m.get("phases") or {}
        rto_machines[n] = {
            "state": m.get("state"),
            "rank": m.get("rank"),
            "domain": m.get("domain"),
            "convert_s": ph.get("convert_s"),
            "wait_s": ph.get("wait_s"),
            "boot_s": ph.get("boot_s"),
            "ready_s": ph.get("ready_s"),
            "rto_s": m.get("rto_s"),
            "checks": m.get("checks") or [],
            "conversion": m.get("conversion"),
            "error": m.get("error"),
        }

    if kind == "cutover":
        ref_time = _iso(rep.get("stopped_wall"))
        ref_what = "source stop (changes after it cannot be lost: the source was down)"
    else:
        ref_time = run["started_at"]
        ref_what = "test run start (the age of the point the run booted)"
    rpo_machines = {}
    for n, m in sorted(machines.items()):
        rp = m.get("restore_point") or {}
        row = db.execute(
            "SELECT source_time, sealed_at, consistency, full, verified, verified_at, state "
            "FROM restore_points WHERE id=?",
            [rp.get("id")],
        ).fetchone()
        src_time = row[0] if row else rp.get("source_time")
        age = _age(ref_time, src_time)
        rpo_machines[n] = {
            "restore_point": rp.get("id"),
            "source_time": src_time,
            "reference_time": ref_time,
            "rpo_s": max(0.0, age) if age is not None else None,
            "sealed_at": row[1] if row else None,
            "consistency": row[2] if row else rp.get("consistency"),
            "full_copy": bool(row[3]) if row else None,
            "verified": row[4] if row else rp.get("verified"),
            "verified_at": row[5] if row else None,
            "point_state_now": row[6] if row else "gone",
        }
        if age is not None and age < 0:
            rpo_machines[n]["note"] = "taken after the source stopped: no data lost"
    rpos = [r["rpo_s"] for r in rpo_machines.values() if r["rpo_s"] is not None]

    if disks is None:
        disks = collect_disks(db, rep, f"evidence pack of run {run_id}")

    preflight = _preflight(db, rep, plan["document"])

    summary = {
        "title": f"{'Test run' if kind == 'test' else 'Cutover'} {run_id} of plan "
        f"{run['plan']} v{run['version']}: {run['state'].upper()}",
        "outcome": run["state"],
        "result": _outcome(run),
        "plan": run["plan"],
        "plan_version": run["version"],
        "run_kind": kind,
        "run_id": run_id,
        "started_at": run["started_at"],
        "ended_at": run["ended_at"],
        "rto_s": totals.get("rto_s"),
        "downtime_s": rep.get("downtime_s") if kind == "cutover" else None,
        "machines_ready": f"{totals.get('ready', 0)}/{totals.get('machines', len(machines))}",
        "worst_rpo_s": max(rpos) if rpos else None,
        "error": rep.get("error"),
        "appliance": {
            "hostname": socket.gethostname(),
            "ferryman": __version__,
            "instance": _setting(db, "plans.instance"),
        },
        "written_at": written,
        "verify_with": "ferryman evidence verify FILE --key-fingerprint FP (or docs/evidence.md)",
    }
    run_section = {
        "id": run_id,
        "kind": kind,
        "state": run["state"],
        "step": run["step"],
        "started_at": run["started_at"],
        "ended_at": run["ended_at"],
        "mode": rep.get("mode"),
        "t0": rep.get("t0"),
        "steps": steps,
        "sources": rep.get("sources"),
        "hooks": rep.get("hooks") or [],
        "cleanup": rep.get("cleanup"),
        "resources": rep.get("resources"),
        "error": rep.get("error"),
        "next": rep.get("next"),
        "supersedes": None,
    }
    return {
        "summary": summary,
        "plan": {
            "name": plan["name"],
            "version": plan["version"],
            "created_at": plan["created_at"],
            "created_by": plan["created_by"],
            "document_sha256": digest(plan["document"]),
            "document": plan["document"],
        },
        "run": run_section,
        "rto": {
            "clock": "seconds on one monotonic clock from the run's start (restore points "
            "resolved); convert = conversion or overlay, wait = for rank/dependencies, boot = "
            "domain start to the first passing check, ready = first to last check",
            "total_s": totals.get("rto_s"),
            "ideal_s": totals.get("ideal_s"),
            "overhead_ratio": totals.get("overhead_ratio"),
            "downtime_s": rep.get("downtime_s"),
            "downtime_from": _iso(rep.get("stopped_wall")),
            "downtime_to": _iso(rep.get("all_ready_wall")),
            "machines": rto_machines,
        },
        "rpo": {
            "reference": ref_what,
            "rpo_s": "reference_time - source_time (when the source snapshot was taken), >= 0",
            "worst_s": max(rpos) if rpos else None,
            "machines": rpo_machines,
            # A cutover from pre-converted points: the RPO the operator accepted at the stop.
            "accepted_by_operator": rep.get("rpo_accepted"),
        },
        "disks": disks,
        "preflight": preflight,
        "operator_actions": _audit(
            db,
            run["started_at"],
            written,
            run,
            list(machines) or list(rep.get("machines_planned") or []),
            [j["id"] for j in jobs],
        ),
        "jobs": jobs,
    }


def _setting(db: Database, key: str) -> Any:
    from store.records import get_setting

    return get_setting(db, key)


# -- writing, listing ---------------------------------------------------------------------------


def pack_path(run_id: int) -> Path:
    return evidence_dir() / f"plan-run-{run_id}.evidence.json"


def await_request_audit(
    db: Database, run_id: int, job_id: int, timeout: float = REQUEST_AUDIT_WAIT_S
) -> bool:
    """Wait until the audit trail holds the request that started job ``job_id``.

    The API audits a request just after it submitted the job, so a quick job (a commit, a
    rollback, a test run refused at once) can end first; the pack must hold the action that
    ended the run. False after ``timeout`` (the job's own row still names who and where)."""
    row = db.execute(
        "SELECT j.created_at, p.name FROM jobs j, plan_runs r JOIN plans p ON p.id = r.plan_id "
        "WHERE j.id=? AND r.id=?",
        [job_id, run_id],
    ).fetchone()
    if row is None:
        return False
    created, plan = row
    end = time.monotonic() + timeout
    while True:
        for action, params in db.execute(
            "SELECT action, params FROM audit WHERE ts >= ? AND action IN "
            "('testrun.start', 'cutover.confirm', 'cutover.rollback')",
            [created],
        ):
            p = loads(params) or {}
            if p.get("run") == run_id or (action == "testrun.start" and p.get("plan") == plan):
                return True
        if time.monotonic() > end:
            return False
        time.sleep(0.1)


def write(
    db: Database, run_id: int, disks: dict[str, Any] | None = None, job_id: int | None = None
) -> dict[str, Any]:
    """Build, sign and store the pack of a run; the run's report points at it. ``job_id``:
    the job that ended the run, whose request must be in the pack's operator actions."""
    from appliance.plans import records

    if job_id is not None:
        await_request_audit(db, run_id, job_id)
    body = build(db, run_id, disks)
    key = signing_key()
    f = pack_path(run_id)
    if f.exists():
        old = f.read_bytes()
        try:
            prev = json.loads(old).get("summary") or {}
        except ValueError:
            prev = {}
        body["run"]["supersedes"] = {
            "sha256": hashlib.sha256(old).hexdigest(),
            "outcome": prev.get("outcome"),
            "written_at": prev.get("written_at"),
        }
    data = render(sign(body, key))
    d = evidence_dir()
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    _write_file(f, data, 0o600)
    pointer = {
        "file": str(f),
        "sha256": hashlib.sha256(data).hexdigest(),
        "key_fingerprint": fingerprint(key.public_key()),
        "written_at": body["summary"]["written_at"],
        "outcome": body["summary"]["outcome"],
    }
    rep = records.run(db, run_id)["report"] or {}
    rep["evidence"] = pointer
    records.update_run(db, run_id, report=rep)
    return pointer


def write_logged(
    db: Database,
    run_id: int,
    disks: dict[str, Any] | None = None,
    event: Callable[..., None] | None = None,
    job_id: int | None = None,
) -> dict[str, Any] | None:
    """``write`` for the end of a job: a failure to write evidence never fails the run."""
    try:
        p = write(db, run_id, disks, job_id)
    except Exception as e:  # reported as an event: the run's outcome stands
        log.exception("evidence pack of run %s", run_id)
        if event is not None:
            event(f"evidence pack of plan run {run_id} could not be written: {e}", level="error")
        return None
    if event is not None:
        event(f"evidence pack of plan run {run_id} written: {p['file']}")
    return p


def after_cutover_job(
    db: Database, run_id: int, job_id: int, event: Callable[..., None] | None = None
) -> None:
    """A cutover job ended: write the pack when the run reached an end (or a failure)."""
    row = db.execute("SELECT state FROM plan_runs WHERE id=?", [run_id]).fetchone()
    if row and row[0] in CUTOVER_END:
        write_logged(db, run_id, event=event, job_id=job_id)


def list_packs() -> list[dict[str, Any]]:
    out = []
    d = evidence_dir()
    for f in d.glob("plan-run-*.evidence.json") if d.exists() else []:
        entry: dict[str, Any] = {"file": str(f), "bytes": f.stat().st_size}
        try:
            pack = json.loads(f.read_bytes())
            s = pack.get("summary") or {}
            entry.update(
                {
                    k: s.get(k)
                    for k in ("run_id", "run_kind", "plan", "plan_version", "outcome", "written_at")
                }
            )
            entry["key_fingerprint"] = (pack.get("signature") or {}).get("key_fingerprint")
        except (ValueError, AttributeError) as e:
            entry["problem"] = f"unreadable: {e}"
        out.append(entry)
    return sorted(out, key=lambda e: -int(e.get("run_id") or 0))


def read_pack(run_id: int) -> bytes:
    f = pack_path(run_id)
    if not f.exists():
        raise NotFound(
            f"no evidence pack for plan run {run_id}",
            hint="packs are written when a test run or cutover ends; list them: "
            "ferryman evidence list",
        )
    return f.read_bytes()
