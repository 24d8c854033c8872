"""Run reports: totals (RTO and the overhead against the ideal), and the readable text.

The JSON report is what plan_runs.report stores and ``--json`` prints; the text is for a field
engineer's change record. ``ideal_s`` is the slowest conversion plus, for each rank, the
slowest boot-to-ready of that rank: what the run would take if no time were lost between
steps. ``overhead_ratio`` = rto / ideal (the plan_rto_overhead benchmark).
"""

from __future__ import annotations

from typing import Any

from appliance.plans.model import Plan


def totals(report: dict[str, Any], plan: Plan | None = None) -> dict[str, Any]:
    ms = report.get("machines", {})
    rtos = [m.get("rto_s") for m in ms.values()]
    all_ready = bool(ms) and all(m.get("state") == "ready" for m in ms.values())
    conv = [(m.get("phases") or {}).get("convert_s") or 0.0 for m in ms.values() if m.get("phases")]
    ranks: dict[int, float] = {}
    for m in ms.values():
        ph = m.get("phases") or {}
        if ph.get("boot_s") is None:
            continue
        up = (ph.get("boot_s") or 0.0) + (ph.get("ready_s") or 0.0)
        ranks[m["rank"]] = max(ranks.get(m["rank"], 0.0), up)
    ideal = (max(conv) if conv else 0.0) + sum(ranks.values())
    rto = max((r for r in rtos if r is not None), default=None) if all_ready else None
    return {
        "machines": len(ms),
        "ready": sum(1 for m in ms.values() if m.get("state") == "ready"),
        "rto_s": rto,
        "slowest_convert_s": round(max(conv), 2) if conv else None,
        "slowest_boot_by_rank_s": {str(k): round(v, 2) for k, v in sorted(ranks.items())},
        "ideal_s": round(ideal, 2) if ideal else None,
        "overhead_ratio": round(rto / ideal, 3) if rto and ideal else None,
    }


def _s(v: Any) -> str:
    return "-" if v is None else f"{float(v):.1f}s"


def text(run: dict[str, Any]) -> str:
    """The report of a plan run as a field engineer reads it."""
    r = run.get("report") or {}
    kind = "Test run" if run.get("kind") == "test" else "Cutover"
    lines = [
        f"{kind} {run.get('id')} of plan {run.get('plan')} v{run.get('version')}: "
        f"{str(run.get('state', '')).upper()}",
        f"started {run.get('started_at', '')[:19]} UTC, ended "
        f"{(run.get('ended_at') or 'not yet')[:19]}",
    ]
    if r.get("error"):
        lines.append(f"error: {r['error']}")
    t = r.get("totals") or {}
    if t:
        lines.append(
            f"RTO {_s(t.get('rto_s'))} for {t.get('ready', 0)}/{t.get('machines', 0)} machines "
            f"(ideal {_s(t.get('ideal_s'))}, overhead ratio {t.get('overhead_ratio') or '-'})"
        )
    if r.get("downtime_s") is not None:
        lines.append(f"downtime {_s(r['downtime_s'])} (source stop -> all ready)")
    lines.append("")
    lines.append(
        f"{'MACHINE':<14}{'RANK':>5} {'POINT':>6} {'CONVERT':>8} {'WAIT':>7} {'BOOT':>7} "
        f"{'READY':>7} {'RTO':>7}  STATE"
    )
    ms = sorted((r.get("machines") or {}).values(), key=lambda m: (m["rank"], m["machine"]))
    for m in ms:
        ph = m.get("phases") or {}
        lines.append(
            f"{m['machine']:<14}{m['rank']:>5} {m['restore_point']['id']:>6} "
            f"{_s(ph.get('convert_s')):>8} {_s(ph.get('wait_s')):>7} {_s(ph.get('boot_s')):>7} "
            f"{_s(ph.get('ready_s')):>7} {_s(m.get('rto_s')):>7}  {m.get('state')}"
        )
    for m in ms:
        for c in m.get("checks") or []:
            mark = "ok  " if c["passed"] else "FAIL"
            lines.append(
                f"  {m['machine']}: {mark} {c['check']} ({c['seconds']:.1f}s) {c['detail']}"
            )
        if m.get("error"):
            lines.append(f"  {m['machine']}: {m['error']}")
    for h in r.get("hooks") or []:
        lines.append(
            f"hook {h['when']} rank {h['rank']}: {h['command']!r} exit {h['exit']} "
            f"({h['seconds']:.1f}s)"
        )
    for s in r.get("steps") or []:
        detail = s.get("detail", "")
        lines.append(f"step {s['step']}: {s.get('state')} {_s(s.get('seconds'))} {detail}".rstrip())
    c = r.get("cleanup")
    if c:
        lines.append(
            f"clean-up: {'complete' if c.get('ok') else 'INCOMPLETE'} in {_s(c.get('seconds'))}: "
            f"{len(c.get('domains', []))} domains, {len(c.get('networks', []))} networks, "
            f"{c.get('overlays', 0)} overlays, {c.get('readers', 0)} readers removed"
            + (f"; problems: {'; '.join(c['problems'])}" if c.get("problems") else "")
        )
    if r.get("export_dir"):
        lines.append(f"console logs and this report: {r['export_dir']}")
    return "\n".join(lines)
