"""One row per protected machine: state, restore point age against the RPO target, the
running sync (bar, rate, ETA) and a throughput sparkline.

Rows are formatted by a pure function (tested without a screen); the table updates only the
cells that changed, so a refresh of 500 machines costs little on the event loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rich.text import Text
from textual.cache import LRUCache
from textual.message import Message
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey, RowKey

from appliance.inventory import FAILED_SYNC_ALERT, rpo_status
from tui import format as fmt

WIDE = 120  # from this width on: source, guest OS, a longer bar and an alerts column
REPAINT_ROWS_MAX = 24  # more changed rows than this: one table-wide repaint (see _repaint)


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    width: int


NARROW_COLS = (
    Column("name", "MACHINE", 12),
    Column("state", "STATE", 11),
    Column("rpo", "NEWEST/RPO", 16),
    Column("sync", "SYNC  %  RATE ETA", 20),
    Column("trend", "TREND", 8),
)
WIDE_COLS = (
    Column("name", "MACHINE", 16),
    Column("source", "SOURCE", 10),
    Column("os", "GUEST", 14),
    Column("state", "STATE", 12),
    Column("rpo", "NEWEST/RPO", 17),
    Column("sync", "SYNC                 %    RATE   ETA", 36),
    Column("trend", "THROUGHPUT", 12),
    Column("alerts", "ALERTS", 26),
)


def machine_state(m: dict[str, Any]) -> str:
    """Word + symbol: what an operator needs to know first about this machine."""
    job = m.get("active_job")
    if m.get("cutover_done"):
        return "✓ cut over"
    if job:
        if job["state"] == "queued":
            return "… queued"
        verb = {"sync": "syncing", "verify": "verifying"}.get(job["kind"], job["kind"])
        return f"▶ {verb}"
    if m.get("failed_syncs", 0) >= FAILED_SYNC_ALERT:
        return f"✗ {m['failed_syncs']} failed"
    if m.get("power_state") == "missing":
        return "? missing"
    if not m.get("protected"):
        return "- unprotected"
    return "· idle"


def alerts(m: dict[str, Any], status: str) -> list[str]:
    out = []
    n = m.get("failed_syncs", 0)
    if n >= FAILED_SYNC_ALERT:
        out.append(f"{n} failed syncs in a row")
    elif n:
        out.append(f"last sync failed ({n})")
    if status == "over":
        out.append("over RPO")
    if m.get("power_state") == "missing":
        out.append("gone from source")
    return out


def sync_cell(job: dict[str, Any] | None, bar_width: int, wide: bool) -> str:
    if not job:
        return ""
    p = job.get("progress") or {}
    total, done = p.get("total") or 0, p.get("done") or 0
    if job["state"] == "queued":
        return "… queued"
    if not total:
        return (p.get("phase") or "starting")[: bar_width + 14]
    frac = done / total
    eta = fmt.duration(p.get("eta_s")) if p.get("eta_s") is not None else "-"
    if wide:
        return f"{fmt.bar(frac, bar_width)} {frac:4.0%} {fmt.rate(p.get('rate')):>7} {eta:>5}"
    return f"{fmt.bar(frac, bar_width)}{frac:4.0%} {fmt.rate(p.get('rate')):>6} {eta}"


def row_cells(
    m: dict[str, Any], now: datetime, trend: Sequence[float], wide: bool
) -> tuple[str, ...]:
    """The cells of one machine's row, in the column order of WIDE_COLS or NARROW_COLS."""
    newest = m.get("newest_rp") or {}
    age = fmt.age_s(newest.get("source_time"), now) if newest else None
    status = rpo_status(age, m.get("rpo_seconds")) if m.get("protected") else "none"
    rpo = fmt.rpo_words(status, age, m.get("rpo_seconds"))
    job = m.get("active_job")
    if wide:
        return (
            m["name"],
            m.get("source", ""),
            (m.get("guest_os") or "-")[:14],
            machine_state(m),
            rpo,
            sync_cell(job, 16, True),
            fmt.sparkline(trend, 12),
            "; ".join(alerts(m, status)) or "-",
        )
    return (m["name"], machine_state(m), rpo, sync_cell(job, 5, False), fmt.sparkline(trend, 8))


def styled(cell: str) -> Text:
    """Colour only adds to the symbol that already says it."""
    style = ""
    if cell.startswith("✗"):
        style = "bold red"
    elif cell.startswith("!"):
        style = "bold yellow"
    elif cell.startswith("✓"):
        style = "green"
    elif cell.startswith("▶"):
        style = "bold"
    return Text(cell, style=style, no_wrap=True, overflow="ellipsis")


class MachineTable(DataTable[Text]):
    """The dashboard's table. Posts Opened when the operator presses Enter on a row."""

    @dataclass
    class Opened(Message):
        name: str

    def __init__(self, **kw: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=False, **kw)
        self.wide: bool | None = None
        self._rendered: dict[str, tuple[str, ...]] = {}

    def _update_dimensions(self, new_rows: Iterable[RowKey]) -> None:
        """Every column has a fixed width and every row one line: measuring each new cell
        (4,000 for 500 machines, ~0.1 s at start-up) could change nothing."""
        fixed = all(not c.auto_width for c in self.columns.values())
        super()._update_dimensions(() if fixed else new_rows)

    def set_layout(self, wide: bool) -> bool:
        """(Re)build the columns when the width class changes; True if it did."""
        if wide == self.wide:
            return False
        self.wide = wide
        self.clear(columns=True)
        self._rendered.clear()
        for c in WIDE_COLS if wide else NARROW_COLS:
            self.add_column(c.label, key=c.key, width=c.width)
        return True

    def show(self, rows: list[tuple[str, tuple[str, ...]]]) -> None:
        """rows: (machine name, cells). Adds, removes and updates only what changed."""
        cols = [c.key for c in (WIDE_COLS if self.wide else NARROW_COLS)]
        wanted = {name for name, _ in rows}
        for name in list(self._rendered):
            if name not in wanted:
                self.remove_row(name)
                del self._rendered[name]
        have = len(self._rendered)
        if [n for n, _ in rows[:have]] != list(self._rendered):
            # A machine appeared among the others: rebuild so that the order stays (rare).
            self.clear()
            self._rendered.clear()
            have = 0
        for name, cells in rows[have:]:  # new rows at the end (the first paint's remainder)
            self.add_row(*(styled(c) for c in cells), key=name)
            self._rendered[name] = cells
        changed = []
        for name, cells in rows[:have]:
            old = self._rendered[name]
            if old == cells:
                continue
            data = self._data[RowKey(name)]
            for key, before, after in zip(cols, old, cells, strict=True):
                if before != after:
                    data[ColumnKey(key)] = styled(after)
            self._rendered[name] = cells
            changed.append(name)
        if changed:
            self._repaint(changed)

    def _repaint(self, names: list[str]) -> None:
        """Repaint the rows whose cells were replaced, and only those.

        DataTable.update_cell bumps one table-wide counter that is part of every render cache
        key: one progress cell that moves re-renders every visible cell (~200 at 160x48, most
        of the TUI's CPU while a sync runs). Here the caches lose only the changed rows'
        entries and only their regions are refreshed. Many rows at once (ages passing a
        minute): the table-wide way is cheaper than sifting the caches for each."""
        if len(names) > REPAINT_ROWS_MAX:
            self._update_count += 1
            self.refresh()
            return
        keys = {RowKey(n) for n in names}
        indexes = [self._row_locations.get(k) for k in keys]
        caches: tuple[LRUCache[Any, Any], ...] = (self._row_render_cache, self._cell_render_cache)
        for cache in caches:
            stale = [ck for ck in cache.keys() if ck[0] in keys]  # noqa: SIM118 (no __iter__)
            for ck in stale:
                cache.discard(ck)
        for i in indexes:
            if i is not None:
                self._row_renderable_cache.discard((self._update_count, i))
        self._line_cache.clear()  # keyed by screen line; rebuilt from the row caches
        for i in indexes:
            if i is not None:
                self.refresh_row(i)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value:
            self.post_message(self.Opened(str(event.row_key.value)))

    def selected_name(self) -> str | None:
        if not self.row_count:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        except Exception:
            return None
        return str(key.value) if key.value is not None else None
