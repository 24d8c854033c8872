"""CLI surface: one-line errors and exit codes, --json everywhere, API schema."""

from __future__ import annotations

import json

import pytest

from appliance.cli import build_parser, main
from appliance.daemon.api import JobRequest, create_app


def test_unknown_verb_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "ferryman: unknown verb 'frobnicate'; run: ferryman --help\n"


def test_every_verb_takes_json() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    seen = 0
    for name, p in sub.choices.items():  # type: ignore[union-attr]
        stack = [(name, p)]
        while stack:
            n, sp = stack.pop()
            nested = [a for a in sp._actions if a.choices and a.dest.endswith("_verb")]
            if nested:
                stack.extend((f"{n} {k}", v) for k, v in nested[0].choices.items())
                continue
            assert any("--json" in a.option_strings for a in sp._actions), n
            seen += 1
    assert seen >= 10


def test_daemon_down_is_one_line(fm_env: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ferrymand is not answering" in err[0] and "start it" in err[0]
    assert main(["jobs", "--json"]) == 1
    body = json.loads(capsys.readouterr().out)
    assert body["error"]["code"] == "daemon"


def test_openapi_schema_lists_the_api() -> None:
    app = create_app(state=None)  # type: ignore[arg-type]
    schema = app.openapi()
    for path in (
        "/v1/health",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/events",
        "/v1/probe",
    ):
        assert path in schema["paths"], path
    assert JobRequest(kind="sync", machine="web01").params == {}
    with pytest.raises(ValueError):
        JobRequest(kind=3)  # type: ignore[arg-type]
