"""Progress of long work (replay, recovery, audit, import): a tqdm bar on a terminal,
plain periodic lines otherwise (logs, CI), both with done/total, rate and ETA.

tqdm draws the bar; when stderr is not a terminal its carriage-return redraws would
make one unreadable line in a log file, so this writes a line every `every_s` seconds
instead, through the caller's `say` (a logger or print).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from tqdm import tqdm


class Progress:
    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        unit: str = "records",
        say: Callable[[str], None] | None = None,
        every_s: float = 5.0,
        tty: bool | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.every_s = every_s
        self.done = 0
        self.started = time.monotonic()
        self._last = self.started
        use_bar = sys.stderr.isatty() if tty is None else tty
        self._bar: Any = (
            tqdm(total=total, desc=label, unit=f" {unit}", unit_scale=True, file=sys.stderr)
            if use_bar
            else None
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def add(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self.say(self.line())

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def line(self) -> str:
        rate = self.rate()
        if self.total:
            left = max(self.total - self.done, 0)
            eta = f", ETA {left / rate:.0f}s" if rate > 0 else ""
            share = (
                f"{self.done:,}/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%)"
            )
        else:
            eta, share = "", f"{self.done:,} {self.unit}"
        return f"{self.label}: {share}, {rate:,.0f}/s{eta}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        took = time.monotonic() - self.started
        self.say(f"{self.label}: done, {self.done:,} {self.unit} in {took:.1f}s "
                 f"({self.rate():,.0f}/s)")  # fmt: skip
