"""The cache map in the Context panel and the gauges' timelines: snapshots after a read under
`full`, `locret`, `auto` and after a live switch (the fake runtime's map, fake_map.py), a click
on a cell, and the pure drawing functions. The policy panel is hidden in these snapshots: its
option list follows the registry, which changes as policies land."""
from __future__ import annotations


import numpy as np
import pytest
from rich.text import Text

from app.runtime.cache_map import CacheMap, Segment
from app.runtime.memory import Sample
from app.ui import cache_map as strip_map
from app.ui.chat_input import ChatInput
from app.ui.context import ContextMeter
from app.ui.panels import Gauge, PolicyPanel
from app.ui.timeline import DOCUMENT, POLICY, columns, sparkline
from tests.ui.conftest import make_app, run, settle, submit, wait_for
from tests.ui.fake import FakeRuntime

SIZE = (130, 50)


@pytest.fixture
def long_doc(tmp_path):
    """~3,000 fake tokens: past locret's default budget (1,024) and auto's `full` (2,048)."""
    path = tmp_path / "report.md"
    para = ("The KV cache grows with the context; a policy decides which tokens stay on the device, "
            "which are quantized and which go to host memory. ")
    path.write_text("# Report\n\n" + para * 90, encoding="utf-8")
    return path


def _ready(app, *, policy_panel=False):
    async def before(pilot):
        app.query_one(ChatInput).cursor_blink = False
        app.query_one(PolicyPanel).display = policy_panel
        await wait_for(pilot, lambda: app.runtime is not None)  # the model loaded (its job may not be queued yet)
        await settle(pilot, app)
    return before


async def _drawn(pilot, app):
    """Until the panel draws the newest published map and the gauges its last sample."""
    meter = app.query_one(ContextMeter)
    await settle(pilot, app)
    await wait_for(pilot, lambda: not meter.pending)
    app.poll_memory()
    for gauge in app.query(Gauge):  # NOTE: the fake's last report may equal the one a timer poll set
        gauge.refresh(layout=True)  # mid-read (one Timeline object, grown since): draw the samples of now
    await pilot.pause()


def _cell(meter, row: int, cell: int) -> tuple[int, int]:
    """The click offset (from the widget's corner) of a strip cell."""
    x = meter.content_region.x - meter.region.x + strip_map.LABEL + 1 + cell
    return x, meter.content_region.y - meter.region.y + meter._strip_top + row


def _read_and_ask(app, doc, *, then=()):
    async def before(pilot):
        await _ready(app)(pilot)
        await submit(pilot, app, f"/load {doc}")
        await settle(pilot, app)
        await submit(pilot, app, "What goes to host memory?")
        for command in then:
            await settle(pilot, app)
            await submit(pilot, app, command)
        await _drawn(pilot, app)
    return before


def test_map_after_a_read_under_full(snap_compare, tmp_path, long_doc):
    app = make_app(tmp_path, FakeRuntime())
    assert snap_compare(app, terminal_size=SIZE, run_before=_read_and_ask(app, long_doc))


def test_map_after_a_read_under_locret(snap_compare, tmp_path, long_doc):
    app = make_app(tmp_path, FakeRuntime(policy="locret"))
    assert snap_compare(app, terminal_size=SIZE, run_before=_read_and_ask(app, long_doc))


def test_map_after_a_read_under_auto(snap_compare, tmp_path, long_doc):
    """auto begins with `full`, then switches before the long read: a policy marker and a
    document marker on the timelines, evicted tokens on the host, and the stretch the question
    recalled selected (README's screenshot, docs/screens/cache-map.svg)."""
    app = make_app(tmp_path, FakeRuntime(), policy="auto")

    async def before(pilot):
        await _read_and_ask(app, long_doc)(pilot)
        meter = app.query_one(ContextMeter)
        a, b = app.fake.cache.recalled
        row, cells = meter._rows[0]
        at = next(i for i, c in enumerate(cells) if c.start <= a < c.end)
        await pilot.click(ContextMeter, offset=_cell(meter, 0, at))
        assert cells[at].shares["recalled"] > 0
        app.query_one(ChatInput).focus()
        await pilot.pause()
    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_map_after_a_live_switch_with_a_cell_selected(snap_compare, tmp_path, long_doc):
    """full -> kivi after the answer: the map turns quantized, the device KV steps down; a
    click on the document's row shows that stretch and its tier."""
    app = make_app(tmp_path, FakeRuntime())

    async def before(pilot):
        await _read_and_ask(app, long_doc, then=["/policy kivi"])(pilot)
        await pilot.click(ContextMeter, offset=_cell(app.query_one(ContextMeter), 0, 5))
        await pilot.pause()
        app.query_one(ChatInput).focus()
        await pilot.pause()
    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_click_and_arrows_select_a_cell_and_show_its_text(tmp_path, long_doc):
    async def main():
        app = make_app(tmp_path, FakeRuntime(policy="locret"))
        async with app.run_test(size=SIZE) as pilot:
            await _ready(app)(pilot)
            await submit(pilot, app, f"/load {long_doc}")
            await _drawn(pilot, app)
            meter = app.query_one(ContextMeter)
            rows = [row.label for row, _ in meter._rows]
            assert rows == ["report.md"]
            await pilot.click(ContextMeter, offset=_cell(meter, 0, 0))
            assert meter.selected == (0, 0) and meter.has_focus
            shown = str(meter.render())
            assert "report.md tok 0–" in shown and "“# Report The KV cache" in shown
            await pilot.press("right", "right")
            assert meter.selected == (0, 2)
            cell = meter._rows[0][1][2]
            assert f"tok {cell.start:,}–{cell.end - 1:,}" in str(meter.render())
    run(main())


def test_the_panel_draws_a_map_being_read_at_most_a_few_times_a_second(monkeypatch):
    """Mid-read the runtime publishes a map per chunk; the panel takes one per DRAW_S (a
    clock of our own: no sleeping), and the read's end at once."""
    from types import SimpleNamespace
    from app.ui import context
    clock, state = [100.0], [None]
    monkeypatch.setattr(context.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(context, "published", lambda widget: state[0])
    meter = ContextMeter()
    monkeypatch.setattr(meter, "refresh", lambda **kw: None)

    def publish(kind: str, at: float):
        clock[0] = at
        state[0] = SimpleNamespace(cache_map=SimpleNamespace(rows=[SimpleNamespace(kind=kind)]))
        meter.pull()
        return meter.cache_map is state[0].cache_map
    step = ContextMeter.DRAW_S
    assert publish("reading", 100.0)  # the first map of a read is drawn
    assert not publish("reading", 100.0 + step * 0.4)  # too soon: waits for a tick
    assert not publish("reading", 100.0 + step * 0.9)
    assert publish("reading", 100.0 + step)  # a tick later: drawn
    assert publish("document", 100.0 + step * 1.1)  # the read's end: at once


# ---- the pure parts --------------------------------------------------------------------------
def _map(counts, segs, pairs=2) -> CacheMap:
    return CacheMap(segs, np.array(counts, np.int32), pairs, lambda a, b: "x" * (b - a), 10**6)


def test_cells_shade_by_share_and_pick_the_device_first():
    # 4 tokens: on the device in both pairs; in one pair (the other evicted); on the host; recalled in one
    counts = [[2, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 2, 1]]
    cmap = _map(counts, [Segment("d", "document", 0, 4)])
    cells = cmap.cells(cmap.rows[0], 4)
    assert [(c.tier, c.kept_share) for c in cells] == [("device", 1.0), ("device", 0.5), ("host", 1.0),
                                                        ("recalled", 0.5)]
    assert cells[1].shares["evicted"] == 0.5
    looks = [strip_map.cell_look(c) for c in cells]
    assert [char for char, _ in looks] == ["█", "▅", "█", "▅"]  # bar heights: the kept share
    assert looks[1][1].bgcolor is None  # the rest of that stretch is evicted: no colour under it
    assert looks[3][1].bgcolor is not None and looks[3][1].color != looks[2][1].color  # recalled, over host
    line = strip_map.strip(strip_map.layout(cmap, strip_map.LABEL + 1 + 4), None)[0]
    assert line.plain == "d" + " " * strip_map.LABEL + "█▅█▅"
    assert len(strip_map.legend().plain) <= 40  # one line of the side panel


def test_timeline_columns_step_at_a_switch_and_mark_it():
    s = [Sample(0, 100, 0, "full", 0), Sample(1, 400, 0, "full", 1), Sample(2, 400, 0, "full", 1),
         Sample(3, 50, 0, "kivi", 1), Sample(4, 50, 0, "kivi", 1)]
    vals, marks = columns(s, "gpu", 4)
    assert vals == [100, 400, 400, 50]  # each column's value at its end: the last one is now
    assert marks == ["", DOCUMENT, "", POLICY]
    line, row, peak = sparkline(s, "gpu", 4, "red")
    assert isinstance(line, Text) and peak == 400 and line.plain == "▃██▂"
    assert row.plain == f" {DOCUMENT} {POLICY}"
