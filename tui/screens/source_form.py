"""Add or edit a source. Every field is checked here first (empty, too long, wrong kind of
address, wrong type, host that does not answer); nothing reaches ferrymand until all pass.
A vSphere endpoint whose certificate no CA vouches for asks for the thumbprint confirmation;
an agent moved to another host asks to confirm that host's SSH key. Editing sends only to
PATCH /v1/sources/NAME, which checks everything again and tests the source before saving."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Select, Static

from appliance.daemon.source_edit import endpoint
from appliance.errors import FerrymanError
from appliance.inventory import KINDS, SCHEMES
from tui.messages import ActionDone
from tui.screens.base import FerrymanModal
from tui.screens.dialogs import ConfirmDialog, ThumbprintDialog
from tui.screens.protect import check_with, parse_throttle
from tui.services import reachability
from tui.widgets.common.fields import Check, Field, check_all, max_len, name_rule, required
from tui.widgets.common.toggle import Toggle

LABELS = {
    "vsphere": "vCenter / ESXi",
    "libvirt": "libvirt / KVM",
    "nbd": "NBD export",
    "linux-agent": "Linux agent (SSH)",
}
EXAMPLES = {
    "vsphere": "https://vcenter.example.com",
    "libvirt": "qemu+ssh://root@kvm01/system",
    "nbd": "nbd://10.0.0.5:10809/disk0",
    "linux-agent": "ssh://root@10.0.0.7",
}
NEEDS_LOGIN = ("vsphere", "linux-agent")


def scheme_rule(kind: str) -> Check:
    def check(v: str) -> str | None:
        if not v.strip():
            return None
        scheme = urlsplit(v.strip()).scheme
        if scheme not in SCHEMES[kind]:
            starts = " or ".join(s + "://" for s in SCHEMES[kind])
            return f"not a {LABELS[kind]} address: it must start with {starts}"
        return None

    return check


def throttle_text(bps: int | None) -> str:
    if not bps:
        return ""
    return f"{bps // 1024**2}M" if bps % 1024**2 == 0 else f"{bps // 1024}K"


class SourceForm(FerrymanModal):
    BINDINGS = [Binding("ctrl+s", "save", "Save"), Binding("escape", "dismiss_none", "Cancel")]

    @dataclass
    class Reached(Message):
        problem: str | None
        cert: dict[str, Any] | None
        host_key: dict[str, Any] | None = None

    @dataclass
    class Refused(Message):
        error: FerrymanError

    def __init__(self, source: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.source = source  # None: add; else edit this one
        self.kind = (source or {}).get("kind", "vsphere")
        self.thumbprint: str | None = (source or {}).get("tls_thumbprint")
        self.host_key: str | None = None  # an agent's new host's key, once confirmed

    def compose_dialog(self) -> ComposeResult:
        s = self.source or {}
        with VerticalScroll(classes="dialog wide"):
            yield Static(
                f"Edit source {s['name']}" if s else "Add a source", classes="dialog-title"
            )
            yield Select(
                [(LABELS[k], k) for k in KINDS],
                value=self.kind,
                allow_blank=False,
                id="kind",
                compact=True,
                disabled=bool(s),  # a source keeps its kind; add another one instead
            )
            yield Field(
                "Name (how Ferryman calls it)",
                id="name",
                value=s.get("name", ""),
                checks=[required("the name"), max_len(63), name_rule],
            )
            yield Field(
                "Address",
                id="uri",
                value=s.get("uri", ""),
                placeholder=f"e.g. {EXAMPLES[self.kind]}",
                checks=[required("the address"), max_len(1024)],
            )
            yield Field(
                "User name", id="username", checks=[max_len(256)], value=s.get("username", "")
            )
            yield Field(
                "Password (empty: keep the stored one)"
                if s
                else "Password (kept encrypted; never shown again)",
                id="password",
                password=True,
                checks=[max_len(4096)],
            )
            yield Field(
                "Throttle of every sync from it (bytes/s, e.g. 50M; empty = no limit)",
                id="throttle",
                value=throttle_text((s.get("params") or {}).get("throttle_bps")),
                checks=[max_len(12), check_with(parse_throttle)],
            )
            yield Toggle(
                "insecure: skip the certificate check (not recommended)",
                id="insecure",
                value=bool(s.get("insecure")),
                compact=True,
            )
            yield Static("", id="form-status")
            with Horizontal(classes="buttons"):
                yield Button("Test and save  ^s", variant="primary", id="save", compact=True)
                yield Button("Cancel  esc", id="cancel", compact=True)

    def on_mount(self) -> None:
        self._kind_changed()
        self.query_one("#name" if not self.source else "#uri").focus()

    @on(Select.Changed, "#kind")
    def _kind_select(self, event: Select.Changed) -> None:
        self.kind = str(event.value)
        self._kind_changed()

    def _kind_changed(self) -> None:
        login = self.kind in NEEDS_LOGIN
        for fid in ("#field-username", "#field-password"):
            self.query_one(fid).display = login
        self.query_one("#insecure").display = self.kind == "vsphere"
        self.query_one("#field-uri", Field).input.placeholder = f"e.g. {EXAMPLES[self.kind]}"

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.dismiss(None)

    def status(self, text: str) -> None:
        self.query_one("#form-status", Static).update(text)

    # -- checks, then the network pre-check in a worker, then the daemon -------------------

    def local_checks(self) -> bool:
        extra: dict[str, list[Check]] = {"uri": [scheme_rule(self.kind)]}
        if self.kind == "vsphere":
            extra["username"] = [required("the user name")]
            if not self.source:
                extra["password"] = [required("the password")]
        fields = [f for f in self.query(Field) if f.display]
        return check_all(fields, extra)

    def action_save(self) -> None:
        if not self.local_checks():
            self.status("✗ fix the fields marked ✗; nothing was sent")
            return
        self.status("… checking that the host answers")
        self.query_one("#save", Button).disabled = True
        uri = self.query_one("#field-uri", Field).value.strip()
        moved = self.source is not None and endpoint(uri) != endpoint(self.source["uri"])
        if moved:
            self.thumbprint = None  # pinned for the old endpoint only
        need_cert = (
            self.kind == "vsphere"
            and not self.thumbprint
            and not self.query_one("#insecure", Toggle).value
        )
        need_key = moved and self.kind == "linux-agent" and not self.host_key
        self.precheck(uri, need_cert, need_key)

    @work(
        thread=True,
        exclusive=True,
        exit_on_error=False,
        group="form",
        name="Checking the source address",
    )
    def precheck(self, uri: str, need_cert: bool, need_key: bool = False) -> None:
        problem = reachability(uri)
        cert = key = None
        if problem is None and need_cert:
            cert = self.services.client.tls_probe(uri)
        if problem is None and need_key:
            key = self.services.client.ssh_host_key(uri)
        self.post_message(self.Reached(problem, cert, key))

    def on_source_form_reached(self, msg: Reached) -> None:
        if msg.problem:
            self.query_one("#field-uri", Field).set_error(msg.problem)
            self.status("✗ the host does not answer; nothing was sent")
            self.query_one("#save", Button).disabled = False
            self.query_one("#field-uri", Field).input.focus()
            return
        if msg.cert is not None and not msg.cert.get("verified_by_ca"):
            uri = self.query_one("#field-uri", Field).value.strip()
            self.app.push_screen(ThumbprintDialog(uri, msg.cert), self._trusted)
            return
        if msg.host_key is not None:
            k = msg.host_key
            body = (
                f"The source now points at {k['host']}:{k['port']}, which presents the SSH "
                f"host key\n  {k['fingerprint']}\n\nCompare it with the server's (ssh-keygen "
                "-lf /etc/ssh/ssh_host_ed25519_key.pub on it). Trusting pins this key; a "
                "different one later is refused."
            )
            self.app.push_screen(
                ConfirmDialog("! New SSH host key", body, "Trust this host key"),
                lambda yes: self._key_trusted(k["host_key"] if yes else None),
            )
            return
        self.send()

    def _key_trusted(self, line: str | None) -> None:
        if not line:
            self.status("host key not trusted: nothing was sent")
            self.query_one("#save", Button).disabled = False
            return
        self.host_key = line
        self.send()

    def _trusted(self, thumbprint: str | None) -> None:
        if not thumbprint:
            self.status("certificate not trusted: nothing was sent")
            self.query_one("#save", Button).disabled = False
            return
        self.thumbprint = thumbprint
        self.send()

    def send(self) -> None:
        self.status("… ferrymand is testing the source")
        vals = {f.input_id: f.value.strip() for f in self.query(Field)}
        self.submit(vals, self.query_one("#insecure", Toggle).value)

    @work(thread=True, exclusive=True, exit_on_error=False, group="form", name="Saving the source")
    def submit(self, vals: dict[str, str], insecure: bool) -> None:
        login = self.kind in NEEDS_LOGIN
        throttle = parse_throttle(vals["throttle"])
        try:
            if self.source:
                src = self.services.client.update_source(
                    self.source["name"],
                    new_name=vals["name"],
                    uri=vals["uri"],
                    username=vals["username"] if login else None,
                    password=(vals["password"] or None) if login else None,
                    params={"host_key": self.host_key} if self.host_key else None,
                    throttle_bps=throttle,
                    clear_throttle=throttle is None,
                    thumbprint=self.thumbprint,
                    insecure=insecure if self.kind in ("vsphere", "nbd") else None,
                )
                detail = f"changed: {', '.join(src['changed']) or 'nothing'}"
            else:
                src = self.services.client.add_source(
                    vals["name"],
                    self.kind,
                    vals["uri"],
                    username=vals["username"] if login else None,
                    password=vals["password"] if login else None,
                    params={"throttle_bps": throttle} if throttle else None,
                    thumbprint=self.thumbprint,
                    insecure=insecure,
                )
                detail = "press d on it to discover its machines"
        except FerrymanError as e:
            self.post_message(self.Refused(e))
            raise
        self.post_message(ActionDone(f"source {src['name']} saved", detail))
        self.app.call_from_thread(self.dismiss, src["name"])

    def on_source_form_refused(self, msg: Refused) -> None:
        self.status(f"✗ ferrymand refused: {msg.error.message}")
        self.query_one("#save", Button).disabled = False
