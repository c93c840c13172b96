"""``replay``: plays back recorded bars from a file (JSON lines or CSV).

The file format is the one ``python -m sidecar fetch`` prints, one bar per line
(``{"symbol": ..., "tf": ..., "t": ..., "o": ..., "h": ..., "l": ..., "c": ...,
"v": ..., "src": ...}``), or a CSV with the same column names. Record real data
once, replay it as often as needed.

At ``speed == 1`` the recording is shifted in time by a whole number of bars so
that its first bar opens when the daemon starts, and each bar is released when
its shifted period has closed: it looks like a live feed. At any other speed bars
keep their recorded stamps and the daemon runs on the recording's time
(:attr:`ReplaySource.clock`, a :class:`~sidecar.clock.ReplayClock` from the first
recorded bar, ``speed`` times faster than the wall clock): a bar is released once its
period has closed on that clock. Each answer carries every bar released since the
previous one for the symbol (at least the newest two), oldest first, so no bar is
skipped however many are released per cycle.
"""

from __future__ import annotations

import bisect
import csv
import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from sidecar.bar import Bar
from sidecar.clock import ReplayClock
from sidecar.errors import ConfigError, ProviderError
from sidecar.settings import SYMBOL_RE
from sidecar.sources.base import LatestResult, Source
from sidecar.timeframe import Timeframe


def read_bars(path: Path) -> list[Bar]:
    """Read a recording; raises :class:`ConfigError` naming the line that is malformed.

    Symbols must be canonical (they become Redis keys) and timeframes valid.
    """
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            first = fh.readline()
            fh.seek(0)
            if first.lstrip().startswith("{"):
                rows: Iterable[tuple[int, Any]] = (
                    (lineno, line) for lineno, line in enumerate(fh, 1) if line.strip())
            else:
                rows = ((lineno, _csv_flags(dict(row))) for lineno, row in enumerate(csv.DictReader(fh), 2))
            return [_bar(path, lineno, row) for lineno, row in rows]
    except UnicodeDecodeError as exc:
        raise ConfigError("SIDECAR_REPLAY_FILE", f"{path}: not UTF-8 text ({exc.reason} at byte "
                                                 f"{exc.start})") from None
    except (csv.Error, OSError) as exc:
        raise ConfigError("SIDECAR_REPLAY_FILE", f"{path}: {exc}") from None


def _bar(path: Path, lineno: int, row: str | dict[str, Any]) -> Bar:
    """One recorded bar (a JSON line or a CSV row); ``ConfigError`` naming the line if bad."""
    try:
        obj = json.loads(row) if isinstance(row, str) else row
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {str(row).strip()[:80]!r}")
        bar = Bar.from_json_dict(obj)
        if not SYMBOL_RE.match(bar.symbol):
            raise ValueError(f"{bar.symbol[:40]!r} is not a canonical symbol ({SYMBOL_RE.pattern})")
        bar.tf = Timeframe.parse(bar.tf).name
    except (ValueError, RecursionError) as exc:
        raise ConfigError("SIDECAR_REPLAY_FILE", f"{path}:{lineno}: {str(exc)[:200]}") from None
    return bar


def _csv_flags(row: dict[str, object]) -> dict[str, object]:
    """CSV cells are text: ``"False"`` or ``"0"`` must not read as a true flag."""
    for key in ("forming", "synthetic"):
        value = row.get(key)
        if isinstance(value, str):
            row[key] = value.strip().lower() not in ("", "0", "false", "no", "off")
    return row


class ReplaySource(Source):
    """Releases recorded bars in order: at ``speed == 1`` paced by ``clock`` (the wall
    clock), else by :attr:`clock`, the recording's own time."""

    name = "replay"

    def __init__(
        self,
        path: Path,
        speed: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock``: the wall clock (epoch seconds); a :class:`ReplayClock` is used as
        the recording's time as it is."""
        self._path = path
        self._speed = speed
        self._by_symbol: dict[tuple[str, str], list[Bar]] = {}
        self._times: dict[tuple[str, str], list[int]] = {}
        #: Per (symbol, timeframe): how many of its bars have been handed out.
        self._handed: dict[tuple[str, str], int] = {}
        self._start_ms: int | None = None
        self._origin: dict[str, int] = {}
        for bar in read_bars(path):
            self._by_symbol.setdefault((bar.symbol, bar.tf), []).append(bar)
        for key, bars in self._by_symbol.items():
            bars.sort(key=lambda b: b.t)
            dedup: dict[int, Bar] = {b.t: b for b in bars}  # the last revision wins
            self._by_symbol[key] = sorted(dedup.values(), key=lambda b: b.t)
            self._times[key] = [b.t for b in self._by_symbol[key]]
        self._tf_ms = {key: Timeframe.parse(key[1]).ms for key in self._times}
        #: The recording's time at ``speed != 1`` (``None`` at ``speed == 1``): it starts at
        #: the first recorded bar's open and runs once the daemon begins it.
        self.clock: ReplayClock | None = None
        if isinstance(clock, ReplayClock):
            self.clock = clock
        elif speed != 1.0:
            first = min((ts[0] for ts in self._times.values() if ts), default=0)
            self.clock = ReplayClock(first / 1000, speed, wall=clock)
        self._clock: Callable[[], float] = self.clock if self.clock is not None else clock

    def can_serve(self, symbol: str) -> bool:
        return any(sym == symbol for sym, _ in self._by_symbol)

    def _offset(self, tf: Timeframe) -> tuple[int, int]:
        """(recording origin, shift in ms) for timeframe ``tf``."""
        if self._start_ms is None:
            self._start_ms = int(self._clock() * 1000)
        if tf.name not in self._origin:
            firsts = [ts[0] for (_, name), ts in self._times.items() if name == tf.name and ts]
            self._origin[tf.name] = min(firsts) if firsts else 0
        origin = self._origin[tf.name]
        shift = tf.floor(self._start_ms) - origin if self._speed == 1.0 else 0
        return origin, shift

    def _released_until(self, tf: Timeframe, now_ms: int) -> tuple[int, int]:
        """Recorded open time bound: bars with ``t < bound`` have been released."""
        if self.clock is not None:
            # On the recording's time: released once the bar's period has closed.
            return now_ms - tf.ms + 1, 0
        origin, shift = self._offset(tf)
        assert self._start_ms is not None
        elapsed = (now_ms - self._start_ms) * self._speed
        # A bar is released once its whole period has passed on the replay clock.
        bound = origin + int(elapsed) - tf.ms + (self._start_ms - tf.floor(self._start_ms)) + 1
        return bound, shift

    async def fetch_latest(
        self, symbols: Sequence[str], tf: Timeframe, now_ms: int
    ) -> LatestResult:
        bound, shift = self._released_until(tf, now_ms)
        out: LatestResult = {}
        for sym in symbols:
            key = (sym, tf.name)
            times = self._times.get(key)
            if times is None:
                out[sym] = ProviderError("unknown_symbol", f"{sym} {tf} not in recording",
                                         source=self.name)
                continue
            end = bisect.bisect_left(times, bound)
            handed = self._handed.get(key, 0)
            # Everything released since the last answer, and at least the newest two again.
            start = min(handed, max(0, end - 2))
            self._handed[key] = max(handed, end)
            out[sym] = [self._shifted(b, shift) for b in self._by_symbol[key][start:end]]
        return out

    def next_release_ms(self, now_ms: int) -> int | None:
        """On the recording's time: when the next bar not yet released at ``now_ms`` will
        be (its period's close); ``None`` when every bar is released."""
        out: int | None = None
        for key, times in self._times.items():
            step = self._tf_ms[key]
            i = bisect.bisect_right(times, now_ms - step)
            if i < len(times) and (out is None or times[i] + step < out):
                out = times[i] + step
        return out

    def exhausted(self, now_ms: int) -> bool:
        """On the recording's time: every bar is released at ``now_ms`` and every series
        the daemon asked for has been handed out to its end."""
        return self.next_release_ms(now_ms) is None and all(
            n == len(self._times[key]) for key, n in self._handed.items())

    async def fetch_history(
        self, symbol: str, tf: Timeframe, start_ms: int, end_ms: int
    ) -> list[Bar]:
        key = (symbol, tf.name)
        if key not in self._times:
            raise ProviderError("unknown_symbol", f"{symbol} {tf} not in recording",
                                source=self.name)
        bound, shift = self._released_until(tf, int(self._clock() * 1000))
        times = self._times[key]
        lo = bisect.bisect_left(times, start_ms - shift)
        hi = bisect.bisect_left(times, min(end_ms - shift, bound))
        return [self._shifted(b, shift) for b in self._by_symbol[key][lo:hi]]

    def _shifted(self, bar: Bar, shift: int) -> Bar:
        return Bar(bar.symbol, bar.tf, bar.t + shift, bar.o, bar.h, bar.l, bar.c, bar.v,
                   self.name, forming=False, synthetic=bar.synthetic)

    def status(self) -> dict[str, object]:
        return {"file": str(self._path), "speed": self._speed}
