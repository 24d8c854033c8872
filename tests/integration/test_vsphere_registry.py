"""The daemon's way in: a vSphere row of the sources table, through appliance.sources.registry,
against vcsim. Guards the contract between the store's columns and the vSphere source."""

# ruff: noqa: F811  (fixtures are imported from tests/vsphere_fixtures.py)
from __future__ import annotations

from pathlib import Path

import pytest

from appliance.sources.registry import make_adapter, tls_probe
from appliance.sources.vsphere import CertificateChanged
from tests.vsphere_fixtures import (  # noqa: F401
    VsphereVm,
    vcsim,
    vcsim_binary,
    vcsim_factory,
    vsphere_certs,
    vsphere_vm,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_a_pinned_source_row_discovers_and_syncs(
    vsphere_vm: VsphereVm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FERRYMAN_RUN_DIR", str(tmp_path / "run"))
    v = vsphere_vm.vcsim
    uri = f"https://{v.host}:{v.port}"
    probed = tls_probe(uri)
    assert probed["thumbprint"] == v.sha256 and probed["verified_by_ca"] is False
    row = {
        "name": "vc01",
        "kind": "vsphere",
        "uri": uri,
        "params": {},
        "tls_thumbprint": probed["thumbprint"],  # what the operator confirmed
        "insecure": False,
    }
    adapter = make_adapter(row, lambda: v.password, v.user)
    adapter.test()
    (m,) = [m for m in adapter.discover() if m.name == "ferry01"]
    s = adapter.open_session(m.ref, None)
    try:
        assert s.full and s.disks[0].disk.size == m.disks[0].size
        assert str(tmp_path / "run" / "vsphere") in s.disks[0].nbd_uri
    finally:
        s.release()

    wrong = {**row, "tls_thumbprint": "00" * 32}
    with pytest.raises(CertificateChanged):
        make_adapter(wrong, lambda: v.password, v.user).test()
