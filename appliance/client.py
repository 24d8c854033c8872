"""The one client library of ferrymand, used by the CLI and the TUI.

Blocking (httpx over the unix socket); the TUI calls it from thread workers only.
"""

from __future__ import annotations

import getpass
import os
import time
from pathlib import Path
from typing import Any

import httpx

from appliance.config import paths
from appliance.errors import Conflict, DaemonError, FerrymanError, NotFound

CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 30.0  # API calls answer from SQLite; jobs run in the background

_BY_CODE: dict[str, type[FerrymanError]] = {"not_found": NotFound, "conflict": Conflict}
# "forbidden" (403) arrives as a FerrymanError with code "forbidden".


def origin() -> str:
    """Where this client runs: the SSH client address, else the console."""
    ssh = os.environ.get("SSH_CONNECTION") or os.environ.get("SSH_CLIENT")
    return f"ssh:{ssh.split()[0]}" if ssh else "console"


class Client:
    def __init__(self, socket_path: Path | None = None, *, user: str | None = None) -> None:
        self.socket_path = socket_path or paths().socket
        try:
            who = user or getpass.getuser()
        except Exception:
            who = str(os.getuid())
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket_path)),
            base_url="http://ferrymand",
            timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            headers={"x-ferryman-user": who, "x-ferryman-origin": origin()},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, url: str, **kw: Any) -> Any:
        try:
            r = self._http.request(method, url, **kw)
        except (httpx.ConnectError, FileNotFoundError, ConnectionRefusedError) as e:
            raise DaemonError(
                f"ferrymand is not answering on {self.socket_path}",
                hint="start it (ferrymand --log-file /var/log/ferryman/ferrymand.log &) or "
                "check FERRYMAN_SOCKET",
            ) from e
        except httpx.TimeoutException as e:
            raise DaemonError(
                f"ferrymand did not answer within {READ_TIMEOUT_S:.0f} s",
                hint="it may be overloaded; check its log",
            ) from e
        if r.status_code >= 400:
            try:
                body = r.json()
                cls = _BY_CODE.get(body.get("code", ""), FerrymanError)
                err = cls(body.get("message") or r.text, hint=body.get("hint"))
                err.code = body.get("code", err.code)
            except ValueError:
                err = FerrymanError(f"ferrymand answered {r.status_code}: {r.text[:200]}")
            raise err
        return r.json()

    # -- verbs ------------------------------------------------------------------------------

    def login(self) -> dict[str, Any]:
        """Record the start of an interactive session (audit trail); returns user and role."""
        return dict(self._call("POST", "/v1/login"))

    def whoami(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/whoami"))

    def health(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/health"))

    def jobs(self, *, active: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/jobs", params={"active": active, "limit": limit}))

    def job(self, job_id: int) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/jobs/{job_id}"))

    def submit(
        self, kind: str, machine: str | None = None, params: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        body = {"kind": kind, "machine": machine, "params": params or {}}
        return dict(self._call("POST", "/v1/jobs", json=body))

    def cancel(self, job_id: int) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/jobs/{job_id}/cancel"))

    def events(
        self, since: int = 0, machine: str | None = None, limit: int = 200
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"since": since, "limit": limit}
        if machine:
            params["machine"] = machine
        return list(self._call("GET", "/v1/events", params=params))

    # -- sources --------------------------------------------------------------------------

    def sources(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/sources"))

    def add_source(
        self,
        name: str,
        kind: str,
        uri: str,
        *,
        username: str | None = None,
        password: str | None = None,
        params: dict[str, Any] | None = None,
        thumbprint: str | None = None,
        insecure: bool = False,
        test: bool = True,
    ) -> dict[str, Any]:
        body = {
            "name": name,
            "kind": kind,
            "uri": uri,
            "username": username,
            "password": password,
            "params": params or {},
            "thumbprint": thumbprint,
            "insecure": insecure,
            "test": test,
        }
        return dict(self._call("POST", "/v1/sources", json=body))

    def update_source(
        self,
        name: str,
        *,
        new_name: str | None = None,
        uri: str | None = None,
        username: str | None = None,
        password: str | None = None,
        params: dict[str, Any] | None = None,
        throttle_bps: int | None = None,
        clear_throttle: bool = False,
        thumbprint: str | None = None,
        insecure: bool | None = None,
        test: bool = True,
    ) -> dict[str, Any]:
        """Change only what is given (None keeps it); returns the source and 'changed'."""
        body = {
            "name": new_name,
            "uri": uri,
            "username": username,
            "password": password,
            "params": params,
            "throttle_bps": throttle_bps,
            "clear_throttle": clear_throttle,
            "thumbprint": thumbprint,
            "insecure": insecure,
            "test": test,
        }
        return dict(self._call("PATCH", f"/v1/sources/{name}", json=body))

    def ssh_host_key(self, uri: str) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/ssh-probe", params={"uri": uri}))

    def tls_probe(self, uri: str) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/tls-probe", params={"uri": uri}))

    def test_source(self, name: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/sources/{name}/test"))

    def remove_source(self, name: str, *, purge: bool = False) -> dict[str, Any]:
        """purge: also delete the restore points of its machines from the volume store."""
        return dict(self._call("DELETE", f"/v1/sources/{name}", params={"purge": purge}))

    def discover(self, source: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/sources/{source}/discover"))

    # -- machines -------------------------------------------------------------------------

    def machines(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/machines"))

    def machine(self, name: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/machines/{name}"))

    def protect(
        self,
        name: str,
        *,
        rpo_seconds: int | None = None,
        throttle_bps: int | None = None,
        verify_every_sync: bool | None = None,
    ) -> dict[str, Any]:
        body = {
            "rpo_seconds": rpo_seconds,
            "throttle_bps": throttle_bps,
            "verify_every_sync": verify_every_sync,
        }
        return dict(self._call("POST", f"/v1/machines/{name}/protect", json=body))

    def unprotect(self, name: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/machines/{name}/unprotect"))

    def set_machine(
        self,
        name: str,
        *,
        rpo_seconds: int | None = None,
        throttle_bps: int | None = None,
        verify_every_sync: bool | None = None,
        clear_throttle: bool = False,
    ) -> dict[str, Any]:
        body = {
            "rpo_seconds": rpo_seconds,
            "throttle_bps": throttle_bps,
            "verify_every_sync": verify_every_sync,
            "clear_throttle": clear_throttle,
        }
        return dict(self._call("PATCH", f"/v1/machines/{name}", json=body))

    def sync(self, name: str, *, full: bool = False) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/machines/{name}/sync", json={"full": full}))

    def restore_points(self, name: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/v1/machines/{name}/restore-points"))

    def delete_restore_point(self, rp_id: int) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/v1/restore-points/{rp_id}"))

    def verify(self, rp_id: int) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/restore-points/{rp_id}/verify"))

    def verify_boot(
        self, name: str, *, restore_point: int | None = None, plan: str | None = None
    ) -> dict[str, Any]:
        """Convert, boot with no network, check: job 'bootverify' (see appliance/bootverify)."""
        body = {"restore_point": restore_point, "plan": plan}
        return dict(self._call("POST", f"/v1/machines/{name}/verify-boot", json=body))

    def set_boot_verify(self, name: str, policy: str, every_s: int | None = None) -> dict[str, Any]:
        body = {"policy": policy, "every_s": every_s}
        return dict(self._call("PUT", f"/v1/machines/{name}/boot-verify", json=body))

    def preconverted(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/preconverted"))

    def drop_preconverted(self, name: str) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/v1/machines/{name}/preconverted"))

    def inspect(self, rp_id: int) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/restore-points/{rp_id}/inspect"))

    def convert(self, rp_id: int, overlay: str, backend: str | None = None) -> dict[str, Any]:
        body = {"overlay": overlay, "backend": backend}
        return dict(self._call("POST", f"/v1/restore-points/{rp_id}/convert", json=body))

    # -- seeds (removable media) -------------------------------------------------------------

    def seed_export(
        self,
        machine: str,
        to: str,
        *,
        point: int | None = None,
        key_file: str | None = None,
        passphrase_file: str | None = None,
        chunk_size: int | None = None,
    ) -> dict[str, Any]:
        """Start a seed-export job. Key and passphrase travel as file paths, never values."""
        body: dict[str, Any] = {
            "machine": machine,
            "to": to,
            "point": point,
            "key_file": key_file,
            "passphrase_file": passphrase_file,
        }
        if chunk_size:
            body["chunk_size"] = chunk_size
        return dict(self._call("POST", "/v1/seeds/export", json=body))

    def seed_import(
        self,
        directory: str,
        *,
        machine: str | None = None,
        key_file: str | None = None,
        passphrase_file: str | None = None,
    ) -> dict[str, Any]:
        body = {
            "dir": directory,
            "machine": machine,
            "key_file": key_file,
            "passphrase_file": passphrase_file,
        }
        return dict(self._call("POST", "/v1/seeds/import", json=body))

    def seed_verify(
        self, directory: str, *, key_file: str | None = None, passphrase_file: str | None = None
    ) -> dict[str, Any]:
        body = {"dir": directory, "key_file": key_file, "passphrase_file": passphrase_file}
        return dict(self._call("POST", "/v1/seeds/verify", json=body))

    def seed_show(self, directory: str) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/seeds", params={"dir": directory}))

    def convert_preview(self, rp_id: int, backend: str | None = None) -> dict[str, Any]:
        """Convert onto a throw-away overlay the daemon deletes at the end: does it convert?"""
        body = {"preview": True, "backend": backend}
        return dict(self._call("POST", f"/v1/restore-points/{rp_id}/convert", json=body))

    def audit(self, limit: int = 200) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/audit", params={"limit": limit}))

    def audit_export(self, since: str | None = None) -> dict[str, Any]:
        """Every audit entry (at or after ``since``) with its chain hashes."""
        return dict(self._call("POST", "/v1/audit/export", json={"since": since}))

    def probe(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/probe"))

    def openapi(self) -> dict[str, Any]:
        return dict(self._call("GET", "/openapi.json"))

    def wait(self, job_id: int, timeout: float | None = None, poll: float = 0.5) -> dict[str, Any]:
        """Block until the job ends; returns its final row."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["state"] not in ("queued", "running"):
                return job
            if end is not None and time.monotonic() > end:
                raise DaemonError(
                    f"job {job_id} still {job['state']} after {timeout:.0f} s",
                    hint=f"follow it with: ferryman job show {job_id}",
                )
            time.sleep(poll)

    # -- plans, test runs, cutover (issue 6) ------------------------------------------------

    def plans(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/plans"))

    def plan(self, name: str, version: int | None = None) -> dict[str, Any]:
        params = {"version": version} if version is not None else {}
        return dict(self._call("GET", f"/v1/plans/{name}", params=params))

    def plan_schema(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/plans/schema"))

    def validate_plan(self, document: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("POST", "/v1/plans/validate", json={"document": document}))

    def new_plan(self, name: str, machines: list[str] | None = None) -> dict[str, Any]:
        body = {"name": name, "machines": machines}
        return dict(self._call("POST", "/v1/plans/new", json=body))

    def save_plan(self, name: str, document: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("PUT", f"/v1/plans/{name}", json={"document": document}))

    def plan_diff(self, name: str, a: int | None = None, b: int | None = None) -> dict[str, Any]:
        params = {k: v for k, v in (("a", a), ("b", b)) if v is not None}
        return dict(self._call("GET", f"/v1/plans/{name}/diff", params=params))

    def test_run(
        self, plan: str, version: int | None = None, *, preconverted: bool = True
    ) -> dict[str, Any]:
        """preconverted False: convert every machine even where a pre-converted point fits."""
        body = {"version": version, "preconverted": preconverted}
        return dict(self._call("POST", f"/v1/plans/{plan}/testruns", json=body))

    def test_runs(self, plan: str | None = None) -> list[dict[str, Any]]:
        params = {"plan": plan} if plan else {}
        return list(self._call("GET", "/v1/testruns", params=params))

    def test_run_show(self, run_id: int) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/testruns/{run_id}"))

    def test_run_report_text(self, run_id: int) -> str:
        r = self._http.get(f"/v1/testruns/{run_id}/report", params={"format": "text"})
        if r.status_code >= 400:
            self._call("GET", f"/v1/testruns/{run_id}")  # raises the API's error
        return r.text

    def test_run_cancel(self, run_id: int) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/testruns/{run_id}/cancel"))

    def cutover_start(
        self,
        plan: str,
        *,
        version: int | None = None,
        mode: str = "guided",
        shutdown_timeout_s: float = 300.0,
        use_preconverted: bool = False,
    ) -> dict[str, Any]:
        body = {
            "version": version,
            "mode": mode,
            "shutdown_timeout_s": shutdown_timeout_s,
            "use_preconverted": use_preconverted,
        }
        return dict(self._call("POST", f"/v1/plans/{plan}/cutovers", json=body))

    def cutover_status(self, run_id: int) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/cutovers/{run_id}"))

    def cutovers(self, plan: str | None = None) -> list[dict[str, Any]]:
        params = {"plan": plan} if plan else {}
        return list(self._call("GET", "/v1/cutovers", params=params))

    def cutover_confirm(self, run_id: int, step: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/cutovers/{run_id}/confirm", json={"step": step}))

    def cutover_approve(self, run_id: int, confirm: str) -> dict[str, Any]:
        """A second operator approves a cutover; ``confirm`` is the plan's name as typed."""
        body = {"confirm": confirm}
        return dict(self._call("POST", f"/v1/cutovers/{run_id}/approve", json=body))

    def cutover_policy(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/cutover-policy"))

    def set_cutover_policy(self, *, two_operators: bool) -> dict[str, Any]:
        body = {"two_operators": two_operators}
        return dict(self._call("PUT", "/v1/cutover-policy", json=body))

    def cutover_rollback_run(self, run_id: int) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/cutovers/{run_id}/rollback"))

    def cutover_report_text(self, run_id: int) -> str:
        r = self._http.get(f"/v1/cutovers/{run_id}/report", params={"format": "text"})
        if r.status_code >= 400:
            self._call("GET", f"/v1/cutovers/{run_id}")
        return r.text

    def wait_run(
        self, run_id: int, *, until: tuple[str, ...], timeout: float | None = None
    ) -> dict[str, Any]:
        """Poll a plan run (test run or cutover) until its state is one of ``until``."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            run = self.test_run_show(run_id)
            if run["state"] in until:
                return run
            if end is not None and time.monotonic() > end:
                raise DaemonError(
                    f"plan run {run_id} still {run['state']} ({run['step']}) after {timeout:.0f} s",
                    hint=f"follow it with: ferryman testrun show {run_id}",
                )
            time.sleep(1.0)

    def cutover(self, plan: str, *, step: str, confirm: str) -> dict[str, Any]:
        """The TUI's entry: run ``step`` of the open cutover of ``plan`` ("start" opens one).
        ``confirm`` is what the operator typed: it must be the plan's name."""
        if confirm != plan:
            raise FerrymanError(
                f"the confirmation '{confirm}' does not match plan '{plan}'",
                hint="type the plan's name to confirm a cutover step",
            )
        if step in ("start", "preflight"):
            return self.cutover_start(plan)
        return self.cutover_confirm(self._open_cutover(plan), step)

    def cutover_rollback(self, plan: str, step: str | None = None) -> dict[str, Any]:
        """Roll back the open cutover of ``plan`` (``step``: the step the operator saw)."""
        run_id = self._open_cutover(plan)
        if step is not None:
            now_at = self.cutover_status(run_id)["step"]
            if now_at != step:
                raise Conflict(
                    f"cutover {run_id} of plan '{plan}' is at '{now_at}', not '{step}'",
                    hint="refresh the screen and decide again",
                )
        return self.cutover_rollback_run(run_id)

    def _open_cutover(self, plan: str) -> int:
        for r in self.cutovers(plan):
            if r["state"] not in ("committed", "rolled-back"):
                return int(r["id"])
        raise NotFound(
            f"no open cutover of plan '{plan}'", hint=f"start one: ferryman cutover start {plan}"
        )

    # -- evidence packs ------------------------------------------------------------------------

    def evidence_packs(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/evidence"))

    def evidence_key(self) -> dict[str, Any]:
        """This appliance's public signing key and its SHA-256 fingerprint."""
        return dict(self._call("GET", "/v1/evidence/key"))

    def evidence_pack(self, run_id: int) -> bytes:
        """The pack's bytes exactly as the daemon wrote and signed them."""
        url = f"/v1/evidence/{run_id}"
        try:
            r = self._http.get(url)
        except httpx.HTTPError:
            self._call("GET", url)  # raises the error that names the socket
            raise
        if r.status_code >= 400:
            self._call("GET", url)  # raises the API's error
        return r.content
