"""Plan documents without a daemon: the published schema, validation rules, defaults, diffs,
libvirt XML, report totals and text, the CLI surface."""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from appliance.plans import records, report, schema, virt
from appliance.plans.errors import PlanInvalid
from appliance.plans.model import (
    Inventory,
    KnownMachine,
    check_document,
    generated_mac,
    parse,
    validate,
)

INV = Inventory(
    {
        n: KnownMachine(i, n, True, False, [{"mac": f"00:50:56:aa:bb:0{i}"}], {i * 10: True})
        for i, n in enumerate(("db", "app", "web"), start=1)
    }
)
GOOD = {
    "format": 1,
    "name": "shop",
    "networks": [
        {"name": "lan", "mode": "isolated", "subnet": "10.10.0.0/24", "gateway": "10.10.0.1"},
        {"name": "prod", "mode": "bridged", "bridge": "br0"},
    ],
    "machines": [
        {
            "machine": "db",
            "rank": 1,
            "restore_point": 10,
            "nics": [{"network": "lan", "address": "10.10.0.5/24", "gateway": "10.10.0.1"}],
            "checks": [{"type": "tcp", "address": "10.10.0.5", "port": 5432}],
        },
        {"machine": "app", "rank": 2, "depends_on": ["db"], "nics": [{"network": "prod"}]},
        {"machine": "web", "rank": 2, "depends_on": ["app"], "checks": [{"type": "agent"}]},
    ],
    "hooks": [{"when": "after", "rank": 1, "command": "true"}],
}


def paths(doc: object) -> list[str]:
    return [p.path for p in validate(doc, INV)]


def test_published_schema_file_is_current() -> None:
    assert json.loads(schema.SCHEMA_FILE.read_text()) == schema.SCHEMA


def test_good_plan_parses_with_defaults() -> None:
    assert validate(GOOD, INV) == []
    plan = check_document(GOOD, INV)
    db, app, web = plan.machines
    assert db.restore_point == 10 and db.checks[0].timeout_s == 180
    assert app.restore_point == "latest" and app.disk_bus == "virtio" and app.conversion == "auto"
    assert app.nics[0].mac == "keep"
    assert plan.ranks() == [1, 2] and [m.machine for m in plan.in_rank(2)] == ["app", "web"]
    assert plan.hooks_for("after", 1, "test")[0].timeout_s == 300
    assert web.checks[0].label == "guest agent ping"


def test_same_rank_dependency_is_allowed_but_not_a_later_one() -> None:
    assert paths(GOOD) == []  # web depends on app, both rank 2
    doc = copy.deepcopy(GOOD)
    doc["machines"][0]["depends_on"] = ["web"]
    probs = validate(doc, INV)
    assert [p.path for p in probs] == ["$.machines[0].depends_on[0]", "$.machines[0].depends_on"]
    assert "boots later (rank 2)" in probs[0].message
    assert "dependency cycle: db -> web -> app -> db" in probs[1].message


def test_every_problem_at_once_and_error_is_one_line() -> None:
    doc = copy.deepcopy(GOOD)
    doc["machines"].append({"machine": "mail", "rank": 1})
    doc["machines"][1]["nics"] = [{"network": "lan", "address": "10.10.0.5/24"}]
    doc["hooks"][0]["rank"] = 7
    with pytest.raises(PlanInvalid) as e:
        check_document(doc, INV)
    got = [p.path for p in e.value.problems]
    assert got == ["$.machines[3].machine", "$.machines[1].nics[0].address", "$.hooks[0].rank"]
    assert "\n" not in str(e.value) and "(+2 more)" in e.value.message
    assert e.value.to_dict()["problems"][0]["fix"].startswith("use a name from: ferryman machines")


def test_schema_messages_say_what_to_write() -> None:
    doc = copy.deepcopy(GOOD)
    doc["machines"][0]["cpus"] = "2"
    doc["machines"][0]["firmware"] = "efi"
    probs = {p.path: p for p in validate(doc, INV)}
    assert probs["$.machines[0].cpus"].fix == "write a whole number, e.g. 2"
    assert probs["$.machines[0].firmware"].fix == "use one of: bios, uefi"


def test_addresses_gateways_macs() -> None:
    doc = copy.deepcopy(GOOD)
    doc["machines"][0]["nics"][0]["address"] = "10.10.0.1/24"  # the network's gateway
    assert paths(doc) == ["$.machines[0].nics[0].address"]
    doc["machines"][0]["nics"][0]["address"] = "10.10.0.7"  # no prefix
    assert paths(doc) == ["$.machines[0].nics[0].address"]
    doc = copy.deepcopy(GOOD)
    doc["machines"][0]["nics"].append({"network": "lan", "mac": "52:54:00:00:00:01"})
    doc["machines"][1]["nics"] = [{"network": "prod", "mac": "52:54:00:00:00:01"}]
    assert paths(doc) == ["$.machines[1].nics[0].mac"]
    doc = copy.deepcopy(GOOD)
    doc["machines"][0]["checks"] = [{"type": "delay", "seconds": 5, "port": 22}]
    assert paths(doc) == ["$.machines[0].checks[0].port"]


def test_without_inventory_machines_are_not_checked() -> None:
    doc = copy.deepcopy(GOOD)
    doc["machines"][0]["machine"] = "elsewhere"
    doc["machines"][1]["depends_on"] = ["elsewhere"]
    assert validate(doc, None) == []
    assert [p.path for p in validate(doc, INV)] == ["$.machines[0].machine"]


def test_generated_macs_are_stable_and_local() -> None:
    a = generated_mac("shop", "db", 0)
    assert a == generated_mac("shop", "db", 0) != generated_mac("shop", "db", 1)
    assert a.startswith("52:54:00:")


def test_structural_diff() -> None:
    new = copy.deepcopy(GOOD)
    new["machines"][0]["cpus"] = 4
    del new["machines"][2]
    new["networks"].append({"name": "dmz", "mode": "isolated"})
    assert records.structural_changes(GOOD, new) == [
        "machines: removed web",
        "machines: db.cpus: null -> 4",
        "networks: added dmz",
    ]


def test_domain_and_network_xml(tmp_path: Path) -> None:
    spec = virt.DomainSpec(
        name="fm-ab12-t3-db",
        title="t",
        memory_mib=1024,
        cpus=2,
        disks=[tmp_path / "a.qcow2", tmp_path / "b.qcow2"],
        console_log=tmp_path / "c.log",
        nics=[
            virt.NicSpec(mac="52:54:00:00:00:01", network="fm-ab12-t3-lan"),
            virt.NicSpec(mac="52:54:00:00:00:02", bridge="br0"),
        ],
        metadata={"run": "3"},
    )
    root = ET.fromstring(virt.domain_xml(spec))
    assert root.get("type") == "qemu"
    assert [t.get("dev") for t in root.findall("./devices/disk/target")] == ["vda", "vdb"]
    assert root.find("./devices/disk/boot").get("order") == "1"  # type: ignore[union-attr]
    assert root.find("./devices/interface[@type='bridge']/source").get("bridge") == "br0"  # type: ignore[union-attr]
    assert root.find("./devices/serial/source").get("path") == str(tmp_path / "c.log")  # type: ignore[union-attr]
    assert root.find("./seclabel/label").text == "+0:+0"  # type: ignore[union-attr]
    assert virt.domain_macs(virt.domain_xml(spec)) == ["52:54:00:00:00:01", "52:54:00:00:00:02"]
    net = ET.fromstring(virt.network_xml("n", "fmab12t3n0", "10.9.0.0/24", None, False))
    assert net.find("forward") is None  # isolated: no route out
    assert net.find("ip").get("address") == "10.9.0.254"  # type: ignore[union-attr]
    assert net.find("dns").get("enable") == "no"  # type: ignore[union-attr]
    dhcp = ET.fromstring(virt.network_xml("n", "b", "10.9.0.0/24", "10.9.0.1", True))
    assert dhcp.find("ip/dhcp/range").get("start") == "10.9.0.128"  # type: ignore[union-attr]
    assert len(virt.bridge_name("ffff", "test", 99999, 9)) <= 15


def test_totals_and_text() -> None:
    rep = {
        "machines": {
            "db": {
                "machine": "db",
                "rank": 1,
                "state": "ready",
                "rto_s": 100.0,
                "restore_point": {"id": 1},
                "phases": {"convert_s": 40.0, "wait_s": 0.5, "boot_s": 50.0, "ready_s": 1.0},
                "checks": [
                    {"check": "console /x/", "passed": True, "seconds": 50.0, "detail": "x"}
                ],
            },
            "app": {
                "machine": "app",
                "rank": 2,
                "state": "ready",
                "rto_s": 160.0,
                "restore_point": {"id": 2},
                "phases": {"convert_s": 45.0, "wait_s": 56.0, "boot_s": 55.0, "ready_s": 1.0},
                "checks": [],
            },
        }
    }
    t = report.totals(rep)
    assert t["rto_s"] == 160.0 and t["ideal_s"] == 45 + 51 + 56
    assert t["overhead_ratio"] == round(160 / 152, 3)
    rep["totals"] = t
    text = report.text(
        {
            "id": 7,
            "kind": "test",
            "plan": "shop",
            "version": 2,
            "state": "succeeded",
            "started_at": "2026-01-01T00:00:00",
            "report": rep,
        }
    )
    assert "Test run 7 of plan shop v2: SUCCEEDED" in text
    assert "RTO 160.0s for 2/2 machines" in text
    assert "ok   console /x/" in text
    rep["machines"]["app"]["state"] = "failed"
    assert report.totals(rep)["rto_s"] is None


def test_plan_verbs_take_json() -> None:
    import argparse

    from appliance.cli import verbs_plans

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="verb")
    verbs_plans.register(sub, common)
    seen = []
    for name, p in sub.choices.items():
        nested = next(a for a in p._actions if a.dest == f"{name}_verb")
        for vname, vp in nested.choices.items():
            assert any("--json" in a.option_strings for a in vp._actions), (name, vname)
            seen.append(f"{name} {vname}")
    assert {
        "plan new",
        "plan validate",
        "plan save",
        "plan show",
        "plan list",
        "plan diff",
        "testrun start",
        "testrun show",
        "testrun report",
        "cutover start",
        "cutover confirm",
        "cutover rollback",
        "cutover status",
    } <= set(seen)
    args = parser.parse_args(["cutover", "confirm", "3", "stop-source", "--wait", "--json"])
    assert args.run == 3 and args.step == "stop-source" and args.json
    assert parse(GOOD).name == "shop"
