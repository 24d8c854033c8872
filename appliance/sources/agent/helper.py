#!/usr/bin/env python3
# ruff: noqa: UP006, UP032, UP035, UP022, UP021, UP045
"""Ferryman linux-agent helper: runs ON THE SERVER being replicated, for one sync session.

The appliance copies this file over SSH into a private temporary directory, runs it once per
step and removes it again. It is deliberately one file with the Python 3.6 standard library
only (no f-string features newer than 3.6, no dataclasses, no ``capture_output``), because it
must run on whatever old server a migration starts from. It never opens a network port: the
NBD data travels over the SSH channel's stdin/stdout.

Type annotations use the ``typing`` module and str.format instead of newer forms, so that
Python 3.6 runs this file (hence the ruff exemptions at the top).

Commands (argv[1]); every command prints one JSON document, except ``hash`` (binary digests)
and ``serve`` (the NBD protocol):

    check                          python version, root, which tools exist
    inventory                      disks, partitions, LVM, filesystems, OS, kernel, network
    snapshot TAG SIZE LV:SNAP...   snapshot every LV (its filesystem frozen for the instant)
    status SNAP...                 size, snapshot usage, valid/invalid per snapshot
    remove SNAP...                 remove snapshots (lvremove -f)
    finish SNAP...                 remove snapshots, then the helper's own directory
    cleanup TAG                    remove every snapshot carrying LVM tag TAG (left-overs)
    prepare TAG                    check, left-over snapshots (TAG), stale helper dirs removed,
                                   inventory: one call
    size DEV                       device size in bytes
    hash DEV BLOCK [-]             8-byte big-endian size, then sha256 of every block (or of
                                   the block numbers given on stdin)
    serve DEV SERVER               NBD on stdin/stdout: nbdkit -s, qemu-nbd (relayed), builtin
    freeze-hold DEV...             final live pass: freeze the filesystems on DEV until stdin
                                   ends (one JSON line when frozen, one when thawed)
"""

import hashlib
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from typing import IO, Any, Dict, List, Optional

FREEZE_TIMEOUT_S = 60  # an lvcreate (suspend, freeze, resume) that takes longer is stuck
FREEZE_HOLD_MAX_S = 4 * 3600  # a final live pass frozen longer than this thaws anyway
# While the origin is suspended, LVM must not write its metadata backups to it (it may be /).
LVM_NO_BACKUP = "backup { backup = 0 archive = 0 }"
READ_CHUNK = 1 << 20
SNAP_NAME = re.compile(r"_fm[0-9a-f]{10}$")  # how the appliance names snapshots
HELPER_DIR = re.compile(r"^ferryman-agent\.[A-Za-z0-9]{8}$")  # how it names helper dirs


def _run(
    argv: List[str], timeout: float = 120, check: bool = True
) -> "subprocess.CompletedProcess[str]":
    p = subprocess.run(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=True,
        timeout=timeout,
    )
    if check and p.returncode != 0:
        raise HelperError("{} failed ({}): {}".format(argv[0], p.returncode, p.stderr.strip()))
    return p


class HelperError(Exception):
    pass


def _out(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc))
    sys.stdout.write("\n")
    sys.stdout.flush()


def _lvm_json(argv: List[str]) -> List[Dict[str, Any]]:
    p = _run([*argv, "--reportformat", "json", "--units", "b", "--nosuffix"], check=False)
    if p.returncode != 0:
        return []
    try:
        rep = json.loads(p.stdout)["report"][0]
    except (ValueError, KeyError, IndexError):
        return []
    for key in ("lv", "vg", "pv"):
        if key in rep:
            rows = rep[key]  # type: List[Dict[str, Any]]
            return rows
    return []


def dev_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _mounts() -> List[Dict[str, str]]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4:
                out.append(
                    {
                        "source": parts[0].replace("\\040", " "),
                        "target": parts[1].replace("\\040", " "),
                        "fstype": parts[2],
                        "options": parts[3],
                    }
                )
    return out


def _rdev(path: str) -> Optional[int]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def mountpoints_of(dev: str) -> List[str]:
    """Mount points whose source is the block device ``dev`` (any name for it)."""
    want = _rdev(dev)
    return [m["target"] for m in _mounts() if want is not None and _rdev(m["source"]) == want]


def cmd_check(_args: List[str]) -> None:
    _out(check())


def check() -> Dict[str, Any]:
    tools = {}
    for t in ("lvcreate", "lvs", "fsfreeze", "nbdkit", "qemu-nbd", "lsblk", "ip", "blkid"):
        tools[t] = shutil.which(t) or ""
    return {
        "python": list(sys.version_info[:3]),
        "uid": os.getuid(),
        "tools": tools,
        "machine_id": _read("/etc/machine-id").strip(),
        "hostname": socket.gethostname(),
    }


def _read(path: str, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return default


def _os_release() -> Dict[str, str]:
    out = {}
    for line in _read("/etc/os-release").splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k] = v.strip().strip('"')
    return out


def _meminfo_mib() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def _block_devices() -> List[Dict[str, Any]]:
    if shutil.which("lsblk"):
        p = _run(
            [
                "lsblk",
                "-J",
                "-b",
                "-o",
                "NAME,KNAME,PATH,TYPE,SIZE,FSTYPE,UUID,LABEL,MOUNTPOINT,PTTYPE,PARTTYPE,MODEL,SERIAL,RO",
            ],
            check=False,
        )
        if p.returncode == 0:
            try:
                devs = json.loads(p.stdout).get("blockdevices", [])  # type: List[Dict[str, Any]]
                return devs
            except ValueError:
                pass
    out = []  # old util-linux without JSON: /sys/block
    for name in sorted(os.listdir("/sys/block")):
        size = int(_read("/sys/block/{}/size".format(name), "0").strip() or 0) * 512
        out.append({"name": name, "kname": name, "type": "disk", "size": size})
    return out


def _network() -> Dict[str, Any]:
    if shutil.which("ip"):
        p = _run(["ip", "-j", "addr", "show"], check=False)
        if p.returncode == 0:
            try:
                links = json.loads(p.stdout)
            except ValueError:
                links = []
            out = []
            for ln in links:
                out.append(
                    {
                        "name": ln.get("ifname"),
                        "mac": ln.get("address"),
                        "state": ln.get("operstate"),
                        "mtu": ln.get("mtu"),
                        "addresses": [
                            "{}/{}".format(a.get("local"), a.get("prefixlen"))
                            for a in ln.get("addr_info", [])
                        ],
                    }
                )
            routes = _run(["ip", "-j", "route", "show", "default"], check=False)
            try:
                default = json.loads(routes.stdout) if routes.returncode == 0 else []
            except ValueError:
                default = []
            return {"interfaces": out, "default_routes": default, "config": _net_config()}
    return {"interfaces": [], "default_routes": [], "config": _net_config()}


def _net_config() -> Dict[str, Any]:
    """Which tool configures the network, and its files (for conversion's preflight)."""
    files = {}
    for path in ("/etc/network/interfaces", "/etc/resolv.conf", "/etc/hostname"):
        text = _read(path)
        if text:
            files[path] = text[:8192]
    for d in (
        "/etc/network/interfaces.d",
        "/etc/netplan",
        "/etc/sysconfig/network-scripts",
        "/etc/NetworkManager/system-connections",
        "/etc/systemd/network",
    ):
        if os.path.isdir(d):
            for name in sorted(os.listdir(d))[:50]:
                p = os.path.join(d, name)
                if os.path.isfile(p) and "system-connections" not in d:
                    files[p] = _read(p)[:8192]
                elif os.path.isfile(p):
                    files[p] = "(present; not read: may hold secrets)"
    kinds = []
    if "/etc/network/interfaces" in files:
        kinds.append("ifupdown")
    if any(k.startswith("/etc/netplan/") for k in files):
        kinds.append("netplan")
    if any(k.startswith("/etc/sysconfig/") for k in files):
        kinds.append("ifcfg")
    if any(k.startswith("/etc/NetworkManager/") for k in files):
        kinds.append("networkmanager")
    if any(k.startswith("/etc/systemd/network/") for k in files):
        kinds.append("systemd-networkd")
    return {"tools": kinds, "files": files}


def cmd_inventory(_args: List[str]) -> None:
    _out(inventory())


def inventory() -> Dict[str, Any]:
    lvs = _lvm_json(
        [
            "lvs",
            "-a",
            "-o",
            "vg_name,lv_name,lv_uuid,lv_size,lv_attr,lv_path,origin,lv_tags,lv_dm_path",
        ]
    )
    vgs = _lvm_json(["vgs", "-o", "vg_name,vg_uuid,vg_size,vg_free,vg_extent_size,pv_count"])
    pvs = _lvm_json(["pvs", "-o", "pv_name,vg_name,pv_size,pv_free"])
    uname = platform.uname()
    return {
        "hostname": socket.gethostname(),
        "machine_id": _read("/etc/machine-id").strip(),
        "os": _os_release(),
        "kernel": {
            "release": uname.release,
            "version": uname.version,
            "machine": uname.machine,
        },
        "firmware": "efi" if os.path.isdir("/sys/firmware/efi") else "bios",
        "cpus": os.cpu_count() or 0,
        "memory_mib": _meminfo_mib(),
        "block_devices": _block_devices(),
        "lvm": {"vgs": vgs, "lvs": lvs, "pvs": pvs},
        "mounts": [m for m in _mounts() if m["source"].startswith("/dev/")],
        "fstab": _read("/etc/fstab"),
        "network": _network(),
    }


def _lv_path(name: str) -> str:
    return name if name.startswith("/dev/") else "/dev/" + name


def _lvm_error(stderr: str) -> str:
    """The line of an LVM error that says what failed (not its backup warnings)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith("WARNING")]
    return "; ".join(useful[:3]) or (lines[-1] if lines else "no message")


def cmd_snapshot(args: List[str]) -> None:
    """snapshot TAG SIZE VG/LV:SNAPNAME... -> a snapshot of each LV, tagged TAG.

    The filesystem on an LV is frozen for the instant of its snapshot by device-mapper
    itself: ``lvcreate -s`` suspends the origin, and a suspend freezes the filesystem on it
    (freeze_bdev, the same freeze as fsfreeze/FIFREEZE), takes the snapshot, resumes and
    thaws. An explicit ``fsfreeze -f`` around ``lvcreate`` must NOT be added: on kernels
    before 6.8 the suspend then fails with EBUSY (the filesystem is already frozen) and
    LVM aborts with "Manual intervention required", leaving a half-made LV and an orphan
    ``-real`` device (measured on Debian 12, kernel 6.1). SIZE: bytes, an LVM size ("64M")
    or an extent spec ("20%ORIGIN").
    """
    tag, size = args[0], args[1]
    pairs = [a.split(":", 1) for a in args[2:]]
    made = []  # type: List[str]
    frozen = []  # type: List[str]
    took = []  # type: List[float]
    try:
        for lv, snap in pairs:
            for t in mountpoints_of(_lv_path(lv)):
                if t not in frozen:
                    frozen.append(t)
            size_arg = (
                ["-l", size] if "%" in size else ["-L", size + "b" if size.isdigit() else size]
            )
            t0 = time.monotonic()
            p = _run(
                [
                    "lvcreate",
                    "--config",
                    LVM_NO_BACKUP,
                    "-s",
                    "-n",
                    snap,
                    "--addtag",
                    tag,
                    *size_arg,
                    lv,
                ],
                timeout=FREEZE_TIMEOUT_S,
                check=False,
            )
            took.append(time.monotonic() - t0)
            vg = lv.split("/")[0]
            if p.returncode != 0:
                _remove_if_ours(vg + "/" + snap, tag)
                raise HelperError(
                    "lvcreate of a snapshot of {} failed: {}".format(lv, _lvm_error(p.stderr))
                )
            made.append(vg + "/" + snap)
    except BaseException as e:
        for s in made:
            _run(["lvremove", "-f", s], check=False)
        if isinstance(e, subprocess.TimeoutExpired):
            raise HelperError(
                "lvcreate did not finish within {} s".format(FREEZE_TIMEOUT_S)
            ) from None
        raise
    snaps = []
    for (lv, _snap), full in zip(pairs, made):  # noqa: B905 - 3.6 has no strict=
        rows = _lvm_json(["lvs", "-o", "lv_uuid,lv_size,lv_path", full])
        snaps.append(
            {
                "origin": lv,
                "snapshot": full,
                "path": _lv_path(full),
                "uuid": rows[0]["lv_uuid"] if rows else "",
                "size": dev_size(_lv_path(full)),
            }
        )
    _out(
        {
            "snapshots": snaps,
            "frozen": frozen,
            "frozen_by": "device-mapper suspend of each origin",
            "lvcreate_s": [round(t, 3) for t in took],
        }
    )


def _remove_if_ours(full: str, tag: str) -> None:
    rows = _lvm_json(["lvs", "-o", "lv_tags", full])
    if rows and tag in (rows[0].get("lv_tags") or "").split(","):
        _run(["lvremove", "-f", full], check=False)


def _snap_state(full: str) -> Dict[str, Any]:
    rows = _lvm_json(["lvs", "-o", "lv_attr,snap_percent,lv_size,lv_snapshot_invalid", full])
    if not rows:
        return {"snapshot": full, "exists": False}
    r = rows[0]
    attr = r.get("lv_attr", "")
    invalid = attr[4:5] == "I" or r.get("lv_snapshot_invalid") in ("1", "invalid snapshot")
    pct = r.get("snap_percent") or "0"
    try:
        used = float(pct)
    except ValueError:
        used = 100.0 if invalid else 0.0
    return {
        "snapshot": full,
        "exists": True,
        "invalid": invalid,
        "used_percent": used,
        "attr": attr,
    }


def cmd_status(args: List[str]) -> None:
    _out({"snapshots": [_snap_state(s) for s in args]})


def cmd_remove(args: List[str]) -> None:
    out = []
    for s in args:
        p = _run(["lvremove", "-f", s], check=False)
        out.append({"snapshot": s, "ok": p.returncode == 0, "error": p.stderr.strip()})
    _out({"removed": out})


def cmd_finish(args: List[str]) -> None:
    """The last call of a session: remove the snapshots, then this helper's own directory."""
    out = []
    for s in args:
        p = _run(["lvremove", "-f", s], check=False)
        out.append({"snapshot": s, "ok": p.returncode == 0, "error": p.stderr.strip()})
    d = os.path.dirname(os.path.abspath(__file__))
    purged = False
    if HELPER_DIR.match(os.path.basename(d)):
        shutil.rmtree(d, ignore_errors=True)
        purged = not os.path.exists(d)
    _out({"removed": out, "purged": purged})


def cmd_cleanup(args: List[str]) -> None:
    _out({"removed": cleanup(args[0])})


def cleanup(tag: str) -> List[Dict[str, Any]]:
    rows = _lvm_json(["lvs", "-o", "vg_name,lv_name,origin", "@" + tag])
    out = []
    for r in rows:
        if not r.get("origin") and not SNAP_NAME.search(r["lv_name"]):
            continue  # only the agent's snapshots carry the tag; never remove anything else
        full = "{}/{}".format(r["vg_name"], r["lv_name"])
        p = _run(["lvremove", "-f", full], check=False)
        out.append({"snapshot": full, "ok": p.returncode == 0, "error": p.stderr.strip()})
    return out


def leftovers(tag: str) -> List[Dict[str, Any]]:
    """Snapshots of an earlier session that could not remove them (link down, appliance
    crash): the appliance resumes from them or removes them."""
    rows = _lvm_json(["lvs", "-o", "vg_name,lv_name,origin,lv_time", "@" + tag])
    out = []
    for r in rows:
        full = "{}/{}".format(r["vg_name"], r["lv_name"])
        m = SNAP_NAME.search(r["lv_name"])
        st = _snap_state(full)
        out.append(
            {
                "snapshot": full,
                "origin": "{}/{}".format(r["vg_name"], r["origin"]) if r.get("origin") else "",
                "sid": m.group(0)[3:] if m else "",
                "path": _lv_path(full),
                "invalid": bool(st.get("invalid")),
                "used_percent": st.get("used_percent", 0.0),
                "created": r.get("lv_time", ""),
            }
        )
    return out


def _stale_helpers() -> List[str]:
    """Helper directories of earlier sessions (never this one's)."""
    mine = os.path.dirname(os.path.abspath(__file__))
    out = []
    for name in os.listdir("/tmp"):
        p = os.path.join("/tmp", name)
        if HELPER_DIR.match(name) and p != mine and os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
            out.append(p)
    return out


def cmd_prepare(args: List[str]) -> None:
    """check, left-over snapshots, stale helper files and inventory in one call: each
    python start costs seconds on a slow server."""
    _out(
        {
            "check": check(),
            "leftovers": leftovers(args[0]),
            "stale_helpers": _stale_helpers(),
            "inventory": inventory(),
        }
    )


def cmd_size(args: List[str]) -> None:
    _out({"size": dev_size(args[0])})


def cmd_hash(args: List[str]) -> None:
    """hash DEV BLOCK [-]: every block, or ("-") only the block numbers read from stdin."""
    dev, block = args[0], int(args[1])
    size = dev_size(dev)
    nblocks = (size + block - 1) // block
    if len(args) > 2 and args[2] == "-":
        todo = [int(x) for x in sys.stdin.read().split()]
    else:
        todo = list(range(nblocks))
    w = sys.stdout.buffer
    w.write(struct.pack(">Q", size))
    fd = os.open(dev, os.O_RDONLY)
    try:
        for i in todo:
            off = i * block
            n = min(block, size - off)
            h = hashlib.sha256()
            got = 0
            while got < n:
                data = os.pread(fd, min(READ_CHUNK, n - got), off + got)
                if not data:
                    raise HelperError("short read of {} at {}".format(dev, off + got))
                h.update(data)
                got += len(data)
            w.write(h.digest())
    finally:
        os.close(fd)
    w.flush()


# -- NBD on stdin/stdout ----------------------------------------------------------------------

NBD_MAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_REPLY = 0x67446698
OPT_EXPORT_NAME, OPT_ABORT, OPT_INFO, OPT_GO = 1, 2, 6, 7
REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 3, (1 << 31) + 1
FLAG_HAS_FLAGS, FLAG_READ_ONLY, FLAG_SEND_FLUSH, FLAG_CAN_MULTI_CONN = 1, 2, 4, 256
CMD_READ, CMD_DISC, CMD_FLUSH = 0, 2, 3
EIO, EINVAL, EPERM = 5, 22, 1
MAX_REQUEST = 32 << 20


def _recv(f: IO[bytes], n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def serve_builtin(dev: str, rfile: IO[bytes], wfile: IO[bytes]) -> None:
    """A read-only fixed-newstyle NBD server with simple replies: the fallback for servers
    with neither nbdkit nor qemu-nbd. Enough for libnbd: OPT_GO/INFO/EXPORT_NAME, READ,
    FLUSH, DISC."""
    fd = os.open(dev, os.O_RDONLY)
    size = os.lseek(fd, 0, os.SEEK_END)
    tflags = FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN
    wfile.write(NBD_MAGIC + struct.pack(">QH", IHAVEOPT, 3))  # FIXED_NEWSTYLE | NO_ZEROES
    wfile.flush()
    cflags = struct.unpack(">I", _recv(rfile, 4))[0]
    no_zeroes = bool(cflags & 2)

    def reply(opt: int, typ: int, data: bytes = b"") -> None:
        wfile.write(struct.pack(">QIII", REPLY_MAGIC, opt, typ, len(data)) + data)
        wfile.flush()

    while True:
        magic, opt, length = struct.unpack(">QII", _recv(rfile, 16))
        if magic != IHAVEOPT:
            return
        if length:
            _recv(rfile, length)  # export name / info requests: there is one export
        if opt == OPT_EXPORT_NAME:
            wfile.write(struct.pack(">QH", size, tflags) + (b"" if no_zeroes else bytes(124)))
            wfile.flush()
            break
        if opt in (OPT_INFO, OPT_GO):
            reply(opt, REP_INFO, struct.pack(">HQH", 0, size, tflags))
            reply(opt, REP_ACK)
            if opt == OPT_GO:
                break
            continue
        if opt == OPT_ABORT:
            reply(opt, REP_ACK)
            return
        reply(opt, REP_ERR_UNSUP)
    while True:
        try:
            hdr = _recv(rfile, 28)
        except EOFError:
            return
        magic, _flags, typ, handle, off, length = struct.unpack(">IHHQQI", hdr)
        if magic != REQ_MAGIC:
            return
        if typ == CMD_DISC:
            return
        if typ == CMD_READ:
            if off + length > size or length > MAX_REQUEST:
                wfile.write(struct.pack(">IIQ", SIMPLE_REPLY, EINVAL, handle))
            else:
                try:
                    payload = os.pread(fd, length, off)
                    err = 0 if len(payload) == length else EIO
                except OSError:
                    err = EIO
                if err:
                    wfile.write(struct.pack(">IIQ", SIMPLE_REPLY, err, handle))
                else:
                    wfile.write(struct.pack(">IIQ", SIMPLE_REPLY, 0, handle) + payload)
        elif typ == CMD_FLUSH:
            wfile.write(struct.pack(">IIQ", SIMPLE_REPLY, 0, handle))
        else:
            wfile.write(struct.pack(">IIQ", SIMPLE_REPLY, EPERM, handle))
        wfile.flush()


def _relay(sock_path: str, proc: "subprocess.Popen[bytes]") -> None:
    """Bridge stdin/stdout to a unix socket (qemu-nbd has no stdin mode)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for _ in range(200):
        try:
            s.connect(sock_path)
            break
        except OSError:
            if proc.poll() is not None:
                raise HelperError(
                    "qemu-nbd exited with status {}".format(proc.returncode)
                ) from None
            time.sleep(0.05)
    else:
        raise HelperError("qemu-nbd did not listen on its socket")
    fin, fout = sys.stdin.fileno(), sys.stdout.fileno()
    open_in = True
    while True:
        r, _, _ = select.select([fin, s] if open_in else [s], [], [])
        if fin in r:
            data = os.read(fin, 1 << 20)
            if not data:
                open_in = False
                s.shutdown(socket.SHUT_WR)
            else:
                s.sendall(data)
        if s in r:
            data = s.recv(1 << 20)
            if not data:
                return
            view = memoryview(data)
            while view:
                n = os.write(fout, view)
                view = view[n:]


def cmd_serve(args: List[str]) -> None:
    dev, server = args[0], args[1]
    if server == "auto":
        server = (
            "nbdkit"
            if shutil.which("nbdkit")
            else "qemu-nbd"
            if shutil.which("qemu-nbd")
            else "builtin"
        )
    if server == "nbdkit":
        os.execvp(
            "nbdkit",
            ["nbdkit", "-s", "--exit-with-parent", "-r", "file", "file=" + dev],
        )
    if server == "qemu-nbd":
        d = tempfile.mkdtemp(prefix="ferryman-nbd.")
        sock = os.path.join(d, "s")
        proc = subprocess.Popen(
            ["qemu-nbd", "-r", "-f", "raw", "-k", sock, "--cache=none", dev],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        try:
            _relay(sock, proc)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            shutil.rmtree(d, ignore_errors=True)
        return
    serve_builtin(dev, sys.stdin.buffer, sys.stdout.buffer)


def cmd_freeze_hold(args: List[str]) -> None:
    """freeze-hold DEV...: the final live pass at cutover (services stopped). Flush, freeze
    every filesystem mounted from DEV (fsfreeze), print one JSON line, hold the freeze
    until stdin ends (the appliance closes the channel, or the link died and sshd closed
    it) or FREEZE_HOLD_MAX_S passed, then thaw: a server is never left frozen by a lost
    appliance. ``/`` is never frozen (sshd, journald and this helper live on it): its
    device is flushed and copied live."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a write after the channel died must not kill us

    def stop(_sig: int, _frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    devices = {}  # type: Dict[str, Dict[str, Any]]
    for dev in args:
        mps = mountpoints_of(dev)
        devices[dev] = {"mounts": mps, "quiet": "/" not in mps}
    _run(["sync"], timeout=FREEZE_TIMEOUT_S * 5)
    frozen = []  # type: List[str]
    try:
        for d in devices.values():
            for mp in d["mounts"]:
                if mp == "/" or mp in frozen:
                    continue
                p = _run(["fsfreeze", "-f", mp], timeout=FREEZE_TIMEOUT_S, check=False)
                if p.returncode != 0:
                    raise HelperError("fsfreeze -f {} failed: {}".format(mp, p.stderr.strip()))
                frozen.append(mp)
        _out({"frozen": frozen, "devices": devices})
        end = time.time() + FREEZE_HOLD_MAX_S
        while time.time() < end:
            r, _, _ = select.select([sys.stdin], [], [], 5.0)
            if r and not os.read(sys.stdin.fileno(), 4096):
                break  # the appliance is done (or gone)
    finally:
        for mp in reversed(frozen):
            _run(["fsfreeze", "-u", mp], timeout=FREEZE_TIMEOUT_S, check=False)
    try:
        _out({"thawed": frozen})
    except OSError:
        pass


COMMANDS = {
    "check": cmd_check,
    "freeze-hold": cmd_freeze_hold,
    "inventory": cmd_inventory,
    "snapshot": cmd_snapshot,
    "status": cmd_status,
    "remove": cmd_remove,
    "cleanup": cmd_cleanup,
    "finish": cmd_finish,
    "prepare": cmd_prepare,
    "size": cmd_size,
    "hash": cmd_hash,
    "serve": cmd_serve,
}


def main(argv: List[str]) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        sys.stderr.write("usage: helper.py {}\n".format("|".join(sorted(COMMANDS))))
        return 2
    try:
        COMMANDS[argv[1]](argv[2:])
    except HelperError as e:
        sys.stderr.write("ferryman-agent: {}\n".format(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
