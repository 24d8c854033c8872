"""Add or edit a source. Every field is checked here first (empty, too long, wrong kind of
address, host that does not answer); nothing reaches ferrymand until all pass. A vSphere
endpoint whose certificate no CA vouches for asks for the thumbprint confirmation."""

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

from appliance.errors import FerrymanError
from appliance.inventory import KINDS, SCHEMES
from tui.messages import ActionDone
from tui.screens.base import FerrymanModal
from tui.screens.dialogs import ThumbprintDialog
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


class SourceForm(FerrymanModal):
    BINDINGS = [Binding("ctrl+s", "save", "Save"), Binding("escape", "dismiss_none", "Cancel")]

    @dataclass
    class Reached(Message):
        problem: str | None
        cert: dict[str, Any] | None

    @dataclass
    class Refused(Message):
        error: FerrymanError

    def __init__(self, source: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.source = source  # None: add; else edit this one
        self.kind = (source or {}).get("kind", "vsphere")
        self.thumbprint: str | None = (source or {}).get("tls_thumbprint")

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
                "Password (kept encrypted; never shown again)",
                id="password",
                password=True,
                checks=[max_len(4096)],
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
        if self.source:
            self.query_one("#name").disabled = True
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
        need_cert = (
            self.kind == "vsphere"
            and not self.thumbprint
            and not self.query_one("#insecure", Toggle).value
        )
        self.precheck(self.query_one("#field-uri", Field).value.strip(), need_cert)

    @work(
        thread=True,
        exclusive=True,
        exit_on_error=False,
        group="form",
        name="Checking the source address",
    )
    def precheck(self, uri: str, need_cert: bool) -> None:
        problem = reachability(uri)
        cert = None
        if problem is None and need_cert:
            cert = self.services.client.tls_probe(uri)
        self.post_message(self.Reached(problem, cert))

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
        try:
            if self.source:
                self.services.update_source(
                    self.source["name"],
                    uri=vals["uri"],
                    username=vals["username"] if login else None,
                    password=(vals["password"] or None) if login else None,
                    thumbprint=self.thumbprint,
                    insecure=insecure,
                )
            else:
                self.services.client.add_source(
                    vals["name"],
                    self.kind,
                    vals["uri"],
                    username=vals["username"] if login else None,
                    password=vals["password"] if login else None,
                    thumbprint=self.thumbprint,
                    insecure=insecure,
                )
        except FerrymanError as e:
            self.post_message(self.Refused(e))
            raise
        name = self.source["name"] if self.source else vals["name"]
        self.post_message(
            ActionDone(f"source {name} saved", "press d on it to discover its machines")
        )
        self.app.call_from_thread(self.dismiss, name)

    def on_source_form_refused(self, msg: Refused) -> None:
        self.status(f"✗ ferrymand refused: {msg.error.message}")
        self.query_one("#save", Button).disabled = False
