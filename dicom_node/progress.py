"""Progress for long commands (``dicom-node analyze`` on a folder, training, evaluation, benchmarks).

One helper for the whole project::

    from dicom_node.progress import progress

    for path in progress(paths, desc="reading", unit="file"):
        ...
    with progress(total=epochs, desc="training", unit="epoch") as bar:
        for epoch in range(epochs):
            ...
            bar.set_postfix(loss=f"{loss:.3f}")
            bar.update()

On a terminal it is a tqdm bar on stderr.  When stderr is not a terminal (a log file, CI, systemd) it
prints a plain line every `log_every_s` seconds and a last one when done, and nothing for a job shorter
than that, nor a last line after a failure: logs stay readable, and a command that fails quickly still
ends with its one-line reason alone.
``DICOM_NODE_PROGRESS=0`` (or tqdm's own ``TQDM_DISABLE=1``) silences it; ``DICOM_NODE_PROGRESS=1`` forces
the bar.  stdout is never touched, so commands that print results there stay pipeable.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, Generic, TypeVar

T = TypeVar("T")


def _mode(file: IO[str]) -> str:
    env = os.environ.get("DICOM_NODE_PROGRESS", "").strip().lower()
    if env in ("0", "false", "no", "off") or os.environ.get("TQDM_DISABLE", "").strip() in ("1", "true", "True"):
        return "off"
    if env in ("1", "true", "yes", "on", "bar"):
        return "bar"
    try:
        return "bar" if file.isatty() else "lines"
    except (AttributeError, ValueError):
        return "lines"


class LineProgress(Generic[T]):
    """The non-terminal form: the tqdm calls the project uses (update, set_postfix, close, iteration)."""

    def __init__(self, iterable: Iterable[T] | None, total: int | None, desc: str, unit: str, file: IO[str],
                 log_every_s: float) -> None:
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)  # type: ignore[arg-type]
        self.desc = desc
        self.unit = unit
        self.file = file
        self.log_every_s = log_every_s
        self.n = 0
        self.postfix = ""
        self.started = time.monotonic()
        self._last = self.started
        self._closed = False
        self._printed = False

    def __iter__(self) -> Iterator[T]:
        if self.iterable is None:
            raise TypeError("no iterable given")
        failed = True
        try:
            for item in self.iterable:
                yield item
                self.update()
            failed = False
        finally:
            self.close(failed=failed)

    def __enter__(self) -> LineProgress[T]:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(failed=exc_type is not None)

    def update(self, n: int = 1) -> None:
        """`n` more done."""
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.log_every_s:
            self._last = now
            self._print()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """Extra values shown after the counts (e.g. the current loss)."""
        values = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        """Change the label."""
        self.desc = desc or ""

    def write(self, text: str) -> None:
        """Print a message line."""
        print(text, file=self.file, flush=True)

    def close(self, failed: bool = False) -> None:
        """Print the final line (once, and only after progress lines and without a failure)."""
        if not self._closed:
            self._closed = True
            if self._printed and not failed:
                self._print(final=True)

    def _print(self, final: bool = False) -> None:
        self._printed = True
        elapsed = time.monotonic() - self.started
        rate = self.n / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        pct = f" ({100.0 * self.n / self.total:.0f} %)" if self.total else ""
        eta = ""
        if not final and self.total and rate > 0 and self.n < self.total:
            eta = f", about {_duration((self.total - self.n) / rate)} left"
        post = f", {self.postfix}" if self.postfix else ""
        word = "done in" if final else "after"
        print(f"{self.desc}: {count} {self.unit}{pct} {word} {_duration(elapsed)} ({rate:.2f} {self.unit}/s{eta}){post}",
              file=self.file, flush=True)


class _Off(LineProgress[T]):
    def _print(self, final: bool = False) -> None:
        return None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", file: IO[str] | None = None, log_every_s: float = 10.0,
             leave: bool = True) -> Any:
    """A progress bar over `iterable` (or a manual one with `total`); see the module docstring."""
    out = file if file is not None else sys.stderr
    mode = _mode(out)
    if mode == "bar":
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, file=out, leave=leave, dynamic_ncols=True)
    cls = _Off if mode == "off" else LineProgress
    return cls(iterable, total, desc, unit, out, log_every_s)
