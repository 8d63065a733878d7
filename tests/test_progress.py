"""The progress bar commands show on a terminal."""

from __future__ import annotations

import io

from chunkstore.progress import BarProgress


def test_a_bar_past_an_estimated_total_stops_at_100_percent():
    out = io.StringIO()
    bar = BarProgress(out, new_label=None)
    bar.REDRAW_SECONDS = 0.0  # draw on every advance
    bar.start(1000, "gc: scanning")
    bar.advance(400)
    assert " 40% 400 B/1.0 KB" in out.getvalue()
    bar.advance(1100)  # the total was an estimate, short of the work
    last = out.getvalue().rsplit("\r\x1b[2K", 1)[1]
    assert last.startswith("gc: scanning 100% 1.5 KB/1.0 KB") and "-" not in last
    bar.finish()
    assert out.getvalue().endswith("\r\x1b[2K")  # erased
