"""Signal rules evaluated on scanner rows (:meth:`sidecar.scanner.Scanner.read`).

Rules (each can be switched on or off with ``SIDECAR_SIGNAL_RULES``):

=================== ==================================================================
``rsi_below``       ``rsi < SIDECAR_SIGNAL_RSI_BELOW`` (default 30)
``rsi_above``       ``rsi > SIDECAR_SIGNAL_RSI_ABOVE`` (default 70)
``close_above_bb``  ``close > bb_upper``
``close_below_bb``  ``close < bb_lower``
``macd_cross_up``   MACD histogram went from ``<= 0`` on the previous bar to ``> 0``
``macd_cross_down`` MACD histogram went from ``>= 0`` on the previous bar to ``< 0``
``close_above_vwap`` ``close > vwap * (1 + SIDECAR_SIGNAL_VWAP_PCT / 100)`` (default 0.5)
``close_below_vwap`` ``close < vwap * (1 - SIDECAR_SIGNAL_VWAP_PCT / 100)``
=================== ==================================================================

The MACD crossing compares the bar's histogram with ``macd_hist_prev``, which the
daemon writes into the same features map (the histogram of the bar before), so
one read is enough and a one-shot ``scan --signals`` sees crossings too.

A row that is stale, missing, or lacks a value a rule needs (warm-up) never
gives a signal. With ``SIDECAR_SIGNAL_CLOSED_ONLY=true`` only closed bars are
evaluated (no signal from a bar that can still change).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.errors import ConfigError
from sidecar.settings import _Reader

RULES: tuple[str, ...] = (
    "rsi_below", "rsi_above", "close_above_bb", "close_below_bb",
    "macd_cross_up", "macd_cross_down", "close_above_vwap", "close_below_vwap",
)


@dataclass(frozen=True, slots=True)
class Signal:
    """One rule that holds for one symbol's current bar."""

    symbol: str
    broker: str
    rule: str
    t: int  # open time of the bar (epoch ms UTC)
    forming: bool
    src: str
    values: dict[str, float]  # what the rule looked at, thresholds included
    tf: str = ""  # the bar's timeframe

    def as_dict(self) -> dict[str, Any]:
        """The JSON form ``scan --signals --json`` prints and ``/v1/signals`` serves."""
        return {"symbol": self.symbol, "broker": self.broker, "tf": self.tf, "rule": self.rule,
                "t": self.t, "forming": self.forming, "src": self.src, "values": self.values}


@dataclass(frozen=True, slots=True)
class SignalRules:
    """Which rules are on and their thresholds. Build with :meth:`from_env`."""

    enabled: frozenset[str] = field(default_factory=lambda: frozenset(RULES))
    rsi_below: float = 30.0
    rsi_above: float = 70.0
    vwap_pct: float = 0.5
    closed_only: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SignalRules:
        """Read ``SIDECAR_SIGNAL_*``; raise :class:`ConfigError` naming a bad one."""
        r = _Reader(os.environ if env is None else env)
        text = r.raw("SIDECAR_SIGNAL_RULES")
        enabled = frozenset(RULES)
        if text is not None and text.lower() != "all":
            names = [n.strip().lower() for n in text.split(",") if n.strip()]
            unknown = [n for n in names if n not in RULES]
            if unknown or not names:
                raise ConfigError("SIDECAR_SIGNAL_RULES",
                                  f"unknown rule(s) {', '.join(unknown) or '(none given)'}; "
                                  f"known: all, {', '.join(RULES)}")
            enabled = frozenset(names)
        return cls(
            enabled=enabled,
            rsi_below=r.number("SIDECAR_SIGNAL_RSI_BELOW", 30.0, low=0.0, high=100.0),
            rsi_above=r.number("SIDECAR_SIGNAL_RSI_ABOVE", 70.0, low=0.0, high=100.0),
            vwap_pct=r.number("SIDECAR_SIGNAL_VWAP_PCT", 0.5, low=0.0, high=100.0),
            closed_only=r.boolean("SIDECAR_SIGNAL_CLOSED_ONLY", False),
        )


def evaluate(rows: Iterable[Mapping[str, Any]], rules: SignalRules) -> list[Signal]:
    """The signals of ``rows`` (scanner rows), in row order then rule order.

    Costs a few comparisons per row; objects are created only for signals that fire.
    """
    on = rules.enabled
    rsi_lo = rules.rsi_below if "rsi_below" in on else None
    rsi_hi = rules.rsi_above if "rsi_above" in on else None
    bb_up, bb_dn = "close_above_bb" in on, "close_below_bb" in on
    macd_up, macd_dn = "macd_cross_up" in on, "macd_cross_down" in on
    vwap_up, vwap_dn = "close_above_vwap" in on, "close_below_vwap" in on
    above = 1.0 + rules.vwap_pct / 100.0
    below = 1.0 - rules.vwap_pct / 100.0
    closed_only = rules.closed_only
    out: list[Signal] = []
    for row in rows:
        if row.get("stale") is not False:  # stale, missing, or not a scanner row
            continue
        forming = row.get("forming") is True
        if closed_only and forming:
            continue
        close = row.get("close")
        if close is None:
            continue
        fired: list[tuple[str, dict[str, float]]] | None = None
        rsi = row.get("rsi")
        if rsi is not None:
            if rsi_lo is not None and rsi < rsi_lo:
                fired = [("rsi_below", {"rsi": rsi, "threshold": rsi_lo})]
            elif rsi_hi is not None and rsi > rsi_hi:
                fired = [("rsi_above", {"rsi": rsi, "threshold": rsi_hi})]
        if bb_up or bb_dn:
            upper, lower = row.get("bb_upper"), row.get("bb_lower")
            if bb_up and upper is not None and close > upper:
                fired = fired or []
                fired.append(("close_above_bb", {"close": close, "bb_upper": upper}))
            elif bb_dn and lower is not None and close < lower:
                fired = fired or []
                fired.append(("close_below_bb", {"close": close, "bb_lower": lower}))
        if macd_up or macd_dn:
            hist, prev = row.get("macd_hist"), row.get("macd_hist_prev")
            if hist is not None and prev is not None:
                if macd_up and prev <= 0.0 < hist:
                    fired = fired or []
                    fired.append(("macd_cross_up", {"macd_hist": hist, "macd_hist_prev": prev}))
                elif macd_dn and prev >= 0.0 > hist:
                    fired = fired or []
                    fired.append(("macd_cross_down", {"macd_hist": hist, "macd_hist_prev": prev}))
        if vwap_up or vwap_dn:
            vwap = row.get("vwap")
            if vwap is not None:
                if vwap_up and close > vwap * above:
                    fired = fired or []
                    fired.append(("close_above_vwap", {"close": close, "vwap": vwap,
                                                       "pct": rules.vwap_pct}))
                elif vwap_dn and close < vwap * below:
                    fired = fired or []
                    fired.append(("close_below_vwap", {"close": close, "vwap": vwap,
                                                       "pct": rules.vwap_pct}))
        if fired:
            sym = row["symbol"]
            broker = row.get("broker") or sym
            t, src, tf = row["t"], row.get("src") or "", row.get("tf") or ""
            for rule, values in fired:
                out.append(Signal(sym, broker, rule, t, forming, src, values, tf))
    return out


def signal_rows(rows: Iterable[Mapping[str, Any]], rules: SignalRules) -> list[dict[str, Any]]:
    """The signals of ``rows`` as JSON-ready dicts (:meth:`Signal.as_dict`)."""
    return [sig.as_dict() for sig in evaluate(rows, rules)]
