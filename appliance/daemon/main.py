"""ferrymand: start-up checks, the API server, the job runner.

Start-up refuses, with one line and a non-zero exit, when: the store directory is unusable,
the store is damaged or newer than this code, another ferrymand holds the store, or another
process answers on the socket. Nothing on disk is changed before those checks pass.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import grp
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import IO

from appliance import __version__, probe
from appliance.config import paths
from appliance.daemon import auth
from appliance.daemon.jobs import JobRunner
from appliance.daemon.kinds import all_specs
from appliance.daemon.scheduler import Scheduler
from appliance.daemon.state import DaemonState
from appliance.errors import DaemonError, FerrymanError
from store.db import open_store
from store.records import add_event, get_setting

log = logging.getLogger("ferrymand")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ferrymand", description="Ferryman engine daemon")
    p.add_argument("--state-dir", help="store directory (default /var/lib/ferryman)")
    p.add_argument("--socket", help="API socket (default /run/ferryman/ferrymand.sock)")
    p.add_argument("--log-file", help="log here instead of stderr")
    p.add_argument(
        "--no-probe",
        action="store_true",
        help="do not run the KVM probe at start (assume TCG until one runs)",
    )
    p.add_argument(
        "--scheduler-tick",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how often continuous protection checks RPO targets",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"ferrymand {__version__}")
    return p.parse_args(argv)


def _lock(lock_path: Path) -> IO[str]:
    """Hold an exclusive flock for the daemon's life: a second daemon on this store refuses."""
    f = open(lock_path, "a+")  # noqa: SIM115 - held open until exit
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise DaemonError(
            f"another ferrymand (pid {pid}) already runs on the store {lock_path.parent}",
            hint="stop it first, or use another --state-dir",
        ) from e
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def _claim_socket(path: Path) -> None:
    """Refuse a live socket; remove a stale one left by a crashed daemon."""
    if not path.exists() and not path.is_symlink():
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            path.unlink(missing_ok=True)
            return
        raise DaemonError(
            f"cannot use the socket {path}: {e.strerror}", hint="remove it or pass --socket"
        ) from e
    finally:
        s.close()
    raise DaemonError(
        f"the socket {path} is already in use by another process",
        hint="stop that process or pass --socket with another path",
    )


def _restrict_socket(server: object, sock: Path) -> None:
    """uvicorn makes its socket 0666; the API is for root and the ferryman group only."""
    for _ in range(600):
        if getattr(server, "started", False) and sock.exists():
            os.chmod(sock, 0o660)
            try:
                os.chown(sock, 0, grp.getgrnam("ferryman").gr_gid)
            except (KeyError, PermissionError):
                pass
            return
        time.sleep(0.05)


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.INFO
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if args.log_file:
        Path(args.log_file).parent.mkdir(parents=True, exist_ok=True)
        logging.basicConfig(filename=args.log_file, level=level, format=fmt)
    else:
        logging.basicConfig(stream=sys.stderr, level=level, format=fmt)
    # Native libraries must never write to the terminal.
    try:
        import libvirt

        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    except ImportError:
        pass


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from appliance.daemon.api import create_app

    os.umask(0o077)  # store, keys, logs: root only; the socket is opened to the group below
    if args.state_dir:
        os.environ["FERRYMAN_STATE_DIR"] = args.state_dir
    if args.socket:
        os.environ["FERRYMAN_SOCKET"] = args.socket
    p = paths()
    db_path, sock = p.db, p.socket

    from store.db import check_dir

    check_dir(db_path)
    # libvirt's qemu user creates backup sockets below the run directory: it must be able
    # to traverse it (the API socket itself is 0660 root:ferryman).
    p.run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(p.run_dir, 0o755)
    lock = _lock(p.lock)
    db = open_store(db_path)  # refuses damaged / newer stores before any write
    _claim_socket(sock)

    def factory() -> object:
        return open_store(db_path, migrate=False)

    runner = JobRunner(factory, all_specs())  # type: ignore[arg-type]
    state = DaemonState(db_path, factory, runner)  # type: ignore[arg-type]

    verdict = get_setting(db, "probe")
    if verdict:
        probe.apply_to_environment(
            probe.ProbeResult(
                **{
                    k: verdict[k]
                    for k in (
                        "accel",
                        "kvm_ok",
                        "kvm_detail",
                        "tcg_ok",
                        "tcg_detail",
                        "kernel",
                        "seconds",
                    )
                }
            )
        )
    else:
        # Until a probe says otherwise, assume no usable KVM: TCG is slow but never hangs.
        os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
        os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")

    add_event(db, f"ferrymand {__version__} started (pid {os.getpid()})")
    for r in runner.recover():
        log.info("job %s %s after restart", r["id"], r["action"])
    from appliance.plans.jobs import recover_interrupted

    for r in recover_interrupted(db):
        log.info("plan run after restart: %s", r)
    if not verdict and not args.no_probe:
        runner.submit("probe", who="ferrymand", origin="startup")
    scheduler = Scheduler(factory, runner, tick_s=args.scheduler_tick)  # type: ignore[arg-type]
    scheduler.start()

    auth.install_peer_credentials()
    config = uvicorn.Config(
        create_app(state),
        uds=str(sock),
        http="h11",
        log_level="warning",
        log_config=None,
        access_log=False,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises SIGTERM/SIGINT after its graceful stop, restoring the handlers it
    # found; with these no-op handlers the re-raise returns and our clean-up below runs.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _s, _f: None)
    threading.Thread(target=_restrict_socket, args=(server, sock), daemon=True).start()
    log.info("listening on %s, store %s", sock, db_path)
    try:
        server.run()
    finally:
        scheduler.stop()
        runner.shutdown()
        add_event(db, f"ferrymand stopped (pid {os.getpid()})")
        sock.unlink(missing_ok=True)
        lock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _setup_logging(args)
    try:
        return serve(args)
    except FerrymanError as e:
        print(f"ferrymand: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
