"""The progress helper of long commands (``dicom_node.progress``): a bar on a terminal, plain lines in a log."""

from __future__ import annotations

import io

import pytest

from dicom_node.progress import LineProgress, progress


def test_progress_prints_plain_lines_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOM_NODE_PROGRESS", raising=False)
    out = io.StringIO()
    items = list(progress(range(5), desc="analysing", unit="study", file=out, log_every_s=0.0))
    assert items == [0, 1, 2, 3, 4]
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("analysing: 5/5 study (100 %) done in")
    assert any(line.startswith("analysing: 2/5 study (40 %) after") for line in lines)
    # A long manual bar: lines with the postfix; a job shorter than the interval prints nothing at all.
    out = io.StringIO()
    with progress(total=3, desc="training", unit="epoch", file=out, log_every_s=0.0) as bar:
        assert isinstance(bar, LineProgress)
        bar.set_postfix(loss="0.123")
        bar.update(3)
    assert "training: 3/3 epoch (100 %) done in" in out.getvalue() and "loss=0.123" in out.getvalue()
    out = io.StringIO()
    with progress(total=3, desc="quick", file=out, log_every_s=3600) as bar:
        bar.update(3)
    assert out.getvalue() == ""
    # A failure leaves the last line to the error message.
    out = io.StringIO()
    with pytest.raises(RuntimeError), progress(total=3, desc="failing", file=out, log_every_s=0.0) as bar:
        bar.update()
        raise RuntimeError("boom")
    assert "done in" not in out.getvalue()
    monkeypatch.setenv("DICOM_NODE_PROGRESS", "0")
    out = io.StringIO()
    assert sum(progress(range(3), file=out, log_every_s=0.0)) == 3 and out.getvalue() == ""
