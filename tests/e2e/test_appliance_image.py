"""The appliance image, booted for real under TCG: consoles and SSH land in the TUI, the operator
cannot escape it (reliability row 25), first boot configures it, ferrymand runs under systemd,
doctor passes, and an offline update bundle applies and rolls back.

One VM for the module (boot ~60-120 s under TCG). The image is built by the fixture when its
inputs changed (images/appliance/build; cold ~15-20 min, then cached).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.appliance_vm import HOSTNAME, Appliance, build_image, make_bundle, plain, running

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.timeout(3600),  # includes a cold image build on the first run
    pytest.mark.row(25),
    # Builds and boots the whole appliance under TCG: 40-50 min on 2 cores, so it runs with
    # `scripts/test --appliance`, not in the default suite (see docs/appliance.md).
    pytest.mark.appliance_vm,
]

TUI_START = b"\x1b[?1049h"  # Textual switches to the alternate screen
# What the dashboard draws: the navigation bar ("FM  1 Dash 2 Sources ...") and the key footer.
TUI_MARKERS = ("1 Dash", "2 Sources", "Quit")


@pytest.fixture(scope="module")
def image() -> Path:
    """Built once for the module: others edit the checkout meanwhile, and every edit to an
    input is a new image key."""
    return build_image()


@pytest.fixture(scope="module")
def appliance(image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    with running(image, tmp_path_factory.mktemp("appliance")) as vm:
        vm.boot_s = vm.wait_ssh(420)  # type: ignore[attr-defined]
        yield vm


def _tui_seen(data: bytes) -> bool:
    at = data.find(TUI_START)
    if at < 0:
        return False
    text = plain(data[at:])
    return all(m in text for m in TUI_MARKERS)


def _read_for(proc: subprocess.Popen[bytes], seconds: float, until: bytes = b"") -> bytes:
    """Read a process's stdout for up to ``seconds`` (or until ``until`` shows), then stop it."""
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    out = b""
    end = time.monotonic() + seconds
    while time.monotonic() < end and proc.poll() is None:
        chunk = proc.stdout.read(65536)
        if chunk:
            out += chunk
            if until and until in out and _tui_seen(out):
                break
        else:
            time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    rest = proc.stdout.read()
    return out + (rest or b"")


def test_first_boot_configured_hostname_keys_and_the_data_disk(appliance: Appliance) -> None:
    r = appliance.admin(
        "hostname; findmnt -no SOURCE,FSTYPE /var/lib/ferryman/volumes; "
        "sudo cat /var/lib/ferryman/firstboot.done; ls /etc/issue.d"
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == HOSTNAME
    assert lines[1].split() == ["/dev/vdb", "ext4"], r.stdout  # the empty data disk was chosen
    assert "volume_disk=/dev/vdb" in r.stdout
    assert "ferryman-volumes.issue" not in r.stdout  # no fallback warning with a data disk
    image = json.loads(appliance.admin("cat /etc/ferryman/image.json").stdout)
    assert image["ferryman"]["version"] and image["kernel"] and image["debian"].startswith("12")


def test_services_run_and_ferrymand_restarts_on_failure(appliance: Appliance) -> None:
    # libvirtd is socket-activated (and exits when idle): the socket must be up and answer.
    r = appliance.admin("systemctl is-active ferrymand libvirtd.socket virtlogd.socket ssh")
    assert r.stdout.split() == ["active"] * 4, r.stdout + r.stderr
    r = appliance.admin("virsh -c qemu:///system version")
    assert r.returncode == 0 and "QEMU" in r.stdout, r.stdout + r.stderr
    show = appliance.admin("systemctl show ferrymand -p Restart -p MainPID --value").stdout.split()
    assert show[0] == "on-failure"
    old_pid = show[1]
    assert appliance.admin(f"sudo kill -9 {old_pid}").returncode == 0
    deadline = time.monotonic() + 120
    new_pid = old_pid
    while time.monotonic() < deadline:
        new_pid = appliance.admin("systemctl show ferrymand -p MainPID --value").stdout.strip()
        if (
            new_pid not in ("0", old_pid)
            and appliance.admin("ferryman status --json").returncode == 0
        ):
            break
        time.sleep(3)
    assert new_pid not in ("0", old_pid), "ferrymand was not restarted after kill -9"
    st = json.loads(appliance.admin("ferryman status --json").stdout)
    assert st["health"]["pid"] == int(new_pid)


def test_serial_console_autologs_the_operator_into_the_tui(appliance: Appliance) -> None:
    data = appliance.wait_serial(TUI_START, 240)
    text = plain(data)
    assert f"{HOSTNAME} login: op (automatic login)" in text or "op (automatic login)" in text
    deadline = time.monotonic() + 120
    while not _tui_seen(data) and time.monotonic() < deadline:
        time.sleep(3)
        data = appliance.serial.read_bytes()
    assert _tui_seen(data), "the serial console never showed the Ferryman TUI's dashboard"


def test_ssh_login_of_the_operator_lands_in_the_tui(appliance: Appliance) -> None:
    proc = subprocess.Popen(
        appliance.ssh_argv("op", "-tt"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out = _read_for(proc, 150, until=b"Sources")
    assert _tui_seen(out), plain(out)[-2000:]


def test_operator_command_over_a_tty_still_gets_the_tui(appliance: Appliance) -> None:
    proc = subprocess.Popen(
        [*appliance.ssh_argv("op", "-tt"), "echo ESCAPED-$((6*7))"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out = _read_for(proc, 150, until=b"Sources")
    assert b"ESCAPED-42" not in out
    assert _tui_seen(out), plain(out)[-2000:]


def test_operator_gets_no_shell(appliance: Appliance) -> None:
    r = appliance.ssh("op", "bash", stdin=b"echo ESCAPED-$((6*7))\nexit 0\n", timeout=60)
    assert r.returncode != 0 and b"ESCAPED-42" not in r.stdout + r.stderr
    assert b"opens the Ferryman text UI only" in r.stderr
    r = appliance.ssh("op", "echo ESCAPED-$((6*7))", timeout=60)
    assert r.returncode != 0 and b"ESCAPED-42" not in r.stdout + r.stderr


def test_operator_gets_no_sftp_or_scp(appliance: Appliance, tmp_path: Path) -> None:
    def sftp(user: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["sftp", *appliance.copy_opts(), "-b", "-", f"{user}@127.0.0.1"],
            input=b"get /etc/passwd " + str(tmp_path / user).encode() + b"\n",
            capture_output=True,
            timeout=120,
        )

    # Control: the same sftp call works for admin, so a refusal for op is the policy at work.
    assert sftp("admin").returncode == 0 and (tmp_path / "admin").exists()
    r = sftp("op")
    assert r.returncode != 0 and not (tmp_path / "op").exists()
    assert b"Connection closed" in r.stderr, r.stderr
    # scp over the sftp protocol (default) and the legacy protocol (-O): the TUI wrapper refuses.
    for legacy in ([], ["-O"]):
        target = tmp_path / f"scp{len(legacy)}"
        r = subprocess.run(
            ["scp", *legacy, *appliance.copy_opts(), "op@127.0.0.1:/etc/passwd", str(target)],
            capture_output=True,
            timeout=120,
        )
        assert r.returncode != 0 and not target.exists(), r.stderr
    assert b"opens the Ferryman text UI only" in r.stderr, r.stderr


def _forward_is_refused(appliance: Appliance, flag: str, spec: str, socks: bool) -> None:
    """A client-side forward (-L or -D): the client binds the port, the server must refuse
    every channel opened through it (sshd logs it as prohibited; nothing reaches port 22)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        lport = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            "ssh",
            "-o",
            "LogLevel=INFO",
            *appliance.ssh_argv("op", "-N", flag, spec.format(port=lport))[1:],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        got = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", lport), timeout=10) as c:
                    c.settimeout(15)
                    try:
                        if socks:  # SOCKS5: no auth, then CONNECT 127.0.0.1:22 (inside the VM)
                            c.sendall(b"\x05\x01\x00")
                            assert c.recv(2) == b"\x05\x00"
                            c.sendall(
                                b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + b"\x00\x16"
                            )
                        got = b""
                        while chunk := c.recv(100):  # ssh's SOCKS reply, then EOF on refusal
                            got += chunk
                    except (TimeoutError, ConnectionResetError):
                        pass
                    break
            except ConnectionRefusedError:  # the client has not bound the port yet
                time.sleep(1)
        else:
            pytest.fail(f"the ssh client never bound the {flag} forward port")
        assert b"SSH-" not in got, f"a {flag} forward reached the appliance's sshd"
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert b"prohibited" in err, err


def test_operator_gets_no_port_forwarding(appliance: Appliance) -> None:
    # -R needs the server's consent: refused at once.
    r = subprocess.run(
        [
            *appliance.ssh_argv(
                "op", "-N", "-o", "ExitOnForwardFailure=yes", "-R", "127.0.0.1:2222:127.0.0.1:22"
            )
        ],
        capture_output=True,
        timeout=60,
    )
    assert r.returncode != 0 and b"forwarding failed" in r.stderr.lower(), r.stderr
    # -L and -D (SOCKS) are set up by the client; the server refuses every channel.
    _forward_is_refused(appliance, "-L", "127.0.0.1:{port}:127.0.0.1:22", socks=False)
    _forward_is_refused(appliance, "-D", "127.0.0.1:{port}", socks=True)


class _TuiSession:
    """An interactive `ssh -tt op@appliance` with a token in its environment (LC_FMTEST, which
    Debian's sshd accepts) so the admin account can find its processes inside the VM."""

    def __init__(self, appliance: Appliance, *extra: str, env: dict[str, str] | None = None):
        self.appliance = appliance
        self.token = f"fm{os.getpid()}x{time.monotonic_ns()}"
        self.proc = subprocess.Popen(
            appliance.ssh_argv("op", "-tt", "-o", f"SetEnv=LC_FMTEST={self.token}", *extra),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.out = b""

    def read_until(self, seconds: float, done: Callable[[bytes], bool]) -> bool:
        assert self.proc.stdout is not None
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            chunk = self.proc.stdout.read(65536)
            if chunk:
                self.out += chunk
                if done(self.out):
                    return True
            elif self.proc.poll() is not None:
                return done(self.out)
            else:
                time.sleep(0.5)
        return done(self.out)

    def send(self, keys: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(keys)
        self.proc.stdin.flush()

    def remote_processes(self) -> dict[int, tuple[str, dict[str, str]]]:
        """PID -> (state, environment) of this session's processes inside the appliance."""
        r = self.appliance.admin(
            "for p in $(pgrep -u op); do "
            "e=$(sudo cat /proc/$p/environ 2>/dev/null | tr '\\0' '\\037'); "
            f'case "$e" in *LC_FMTEST={self.token}*) '
            'echo "$p|$(ps -o stat= -p $p)|$e";; esac; done'
        )
        found = {}
        for line in r.stdout.splitlines():
            pid, state, env = line.split("|", 2)
            pairs = (kv.split("=", 1) for kv in env.split("\x1f") if "=" in kv)
            found[int(pid)] = (state.strip(), {k: v for k, v in pairs})
        return found

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def test_operator_gets_no_agent_forwarding(appliance: Appliance, tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(appliance.key)], env=env, check=True, timeout=30)
        session = _TuiSession(appliance, "-A", env=env)
        try:
            assert session.read_until(150, _tui_seen), plain(session.out)[-2000:]
            procs = session.remote_processes()
            assert procs, "the TUI session's processes were not found inside the appliance"
            for pid, (_, penv) in procs.items():
                assert "SSH_CONNECTION" in penv, (pid, penv)  # it is the SSH session
                assert "SSH_AUTH_SOCK" not in penv, f"agent forwarded to pid {pid}: {penv}"
            r = appliance.admin("sudo find /tmp -maxdepth 2 -user op -name 'agent.*'")
            assert r.stdout.strip() == "", r.stdout
        finally:
            session.close()
    finally:
        agent.kill()
        agent.wait()


def test_ctrl_z_keeps_the_tui_and_killing_it_ends_the_session(appliance: Appliance) -> None:
    session = _TuiSession(appliance)
    try:
        assert session.read_until(150, _tui_seen), plain(session.out)[-2000:]
        session.send(b"\x1a")  # Ctrl-Z: a key in the TUI's raw terminal, no job control
        time.sleep(5)
        states = {pid: st for pid, (st, _) in session.remote_processes().items()}
        assert states and not any(st.startswith("T") for st in states.values()), states
        mark = len(session.out)
        session.send(b"2")  # the TUI still answers: switch to the Sources screen
        assert session.read_until(90, lambda out: "▸2" in plain(out[mark:])), plain(
            session.out[mark:]
        )[-2000:]
        assert session.proc.poll() is None
        # Crash the TUI: the session ends, no shell takes over.
        tui = [p for p, (_, e) in session.remote_processes().items() if "SSH_CONNECTION" in e]
        assert appliance.admin(f"sudo kill -9 {' '.join(map(str, tui))}").returncode == 0
        mark = len(session.out)
        session.read_until(60, lambda _: session.proc.poll() is not None)
        assert session.proc.poll() is not None, "the SSH session outlived its TUI"
        tail = plain(session.out[mark:])
        assert "op@" not in tail and "bash" not in tail, tail  # no shell prompt, no shell
    finally:
        session.close()


def test_doctor_as_admin_reports_no_failing_part(appliance: Appliance) -> None:
    # --quick: a libguestfs launch and the KVM probe inside this TCG guest would be TCG inside
    # TCG (many minutes); both run for real on the build machine in tests/integration/test_doctor.
    r = appliance.admin("sudo ferryman doctor --quick --json", timeout=600)
    body = json.loads(r.stdout)
    failing = [c for c in body["checks"] if c["verdict"] == "fail"]
    assert failing == [] and body["ok"] is True and r.returncode == 0, failing
    checks = {c["part"]: c for c in body["checks"]}
    skipped = {p for p, c in checks.items() if c["verdict"] == "skip"}
    assert skipped == {"libguestfs launch", "accelerator"}
    for part in ("ferrymand", "libvirtd", "virtlogd", "state store", "python: guestfs", "nbdkit"):
        assert checks[part]["verdict"] == "ok", checks[part]
    # 16 GiB system disk, 4 GiB data disk: below the 20 GiB comfort line, a warning with a fix.
    assert checks["volume store space"]["verdict"] in ("ok", "warn")


def test_support_bundle_on_the_appliance(appliance: Appliance) -> None:
    r = appliance.admin("cd /tmp && sudo ferryman support-bundle --json", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(r.stdout)
    names = {m.split("/", 1)[1] for m in data["members"]}
    assert {"doctor.json", "store/summary.json", "store/state-sanitized.db"} <= names
    assert "logs/journal/ferrymand.log" in names and "logs/ferryman/ferrymand.log" in names


def test_update_bundle_applies_and_rolls_back(appliance: Appliance, tmp_path: Path) -> None:
    tar = make_bundle(tmp_path, version="0.1.0.post999")
    sidecar = Path(f"{tar}.sha256")
    before = json.loads(appliance.admin("sudo ferryman-update status --json").stdout)
    old_version = appliance.admin("ferryman --version").stdout.split()[-1]

    # A damaged copy is refused before anything changes.
    bad = tmp_path / "bad" / tar.name
    bad.parent.mkdir()
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    appliance.admin("mkdir -p /tmp/bad")
    appliance.scp_to(bad, f"/tmp/bad/{tar.name}")
    appliance.scp_to(sidecar, f"/tmp/bad/{sidecar.name}")
    r = appliance.admin(f"sudo ferryman-update apply --json /tmp/bad/{tar.name}")
    assert r.returncode == 1 and "sha256" in json.loads(r.stdout)["error"]["message"]
    assert json.loads(appliance.admin("sudo ferryman-update status --json").stdout) == before

    appliance.scp_to(tar, f"/tmp/{tar.name}")
    appliance.scp_to(sidecar, f"/tmp/{sidecar.name}")
    # A new venv of 42 wheels under TCG: ~10 min on an idle machine, 26 min seen at load 16.
    r = appliance.admin(f"sudo ferryman-update apply --json /tmp/{tar.name}", timeout=2700)
    assert r.returncode == 0, r.stdout + r.stderr
    applied = json.loads(r.stdout)
    assert applied["previous"] == before["current"] and applied["applied"].startswith(
        "0.1.0.post999"
    )
    assert appliance.admin("ferryman --version").stdout.split()[-1] == "0.1.0.post999"
    st = json.loads(appliance.admin("ferryman status --json").stdout)
    assert st["health"]["version"] == "0.1.0.post999"  # the daemon runs the new release

    r = appliance.admin("sudo ferryman-update rollback --json", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    back = json.loads(r.stdout)
    assert back["current"] == before["current"] and back["daemon_answers"] is True
    assert back["store_restored_from"] is None  # same schema: the store stays as it is
    assert appliance.admin("ferryman --version").stdout.split()[-1] == old_version
    st = json.loads(appliance.admin("ferryman status --json").stdout)
    assert st["health"]["version"] == old_version


def test_ova_for_vsphere_is_well_formed(image: Path, tmp_path: Path) -> None:
    """The OVA: descriptor first, a SHA-256 manifest that matches, a streamOptimized VMDK."""
    import hashlib
    import tarfile
    import xml.etree.ElementTree as ET

    from tests.e2e.appliance_vm import make_ova

    ova = make_ova(image, tmp_path)
    with tarfile.open(ova) as tar:
        names = tar.getnames()
        assert names[0].endswith(".ovf") and names[1].endswith(".mf") and names[2].endswith(".vmdk")
        files = {n: tar.extractfile(n).read() for n in names}  # type: ignore[union-attr]
    for line in files[names[1]].decode().splitlines():
        algo_name, digest = line.split("= ")
        assert algo_name.startswith("SHA256(")
        assert hashlib.sha256(files[algo_name[7:-1]]).hexdigest() == digest
    ns = {"ovf": "http://schemas.dmtf.org/ovf/envelope/1"}
    root = ET.fromstring(files[names[0]])
    ref = root.find("ovf:References/ovf:File", ns)
    assert ref is not None and ref.get(f"{{{ns['ovf']}}}href") == names[2]
    assert int(ref.get(f"{{{ns['ovf']}}}size", "0")) == len(files[names[2]])
    vmdk = tmp_path / "disk.vmdk"
    vmdk.write_bytes(files[names[2]])
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(vmdk)], capture_output=True, check=True
        ).stdout
    )
    assert info["format"] == "vmdk" and info["format-specific"]["data"]["create-type"] == (
        "streamOptimized"
    )
    assert info["virtual-size"] == 16 * 1024**3
