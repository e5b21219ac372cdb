"""The drill's report: a JSON file, a terminal summary, and a self-contained HTML timeline.

The HTML page has no script and loads nothing: inline SVG charts (throughput, errors,
latency, shards served) per second, with the fault window shaded and each drill event
marked, and the headline numbers and every check above them.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clearinghouse.drill.timeline import Second

REPORT_JSON = "report.json"
TIMELINE_HTML = "timeline.html"
CLIENT_LOG = "client-log.jsonl"
# The unmeasured warm-up's payments (runner.Drill._warm_up): not among those checked.
WARMUP_LOG = "warmup-client-log.jsonl"

CHART_W_PX = 960
CHART_H_PX = 170
MARGIN_L_PX = 64
MARGIN_R_PX = 16
MARGIN_T_PX = 24
MARGIN_B_PX = 26
FAULT_FILL = "#d62728"
EVENT_LABEL_CHARS = 28
EVENT_LABEL_ROWS = 3
EVENT_LABEL_ROW_PX = 11
COLORS = {"acked": "#1f77b4", "sent": "#9ecae1", "errors": "#d62728", "p50": "#2ca02c",
          "p99": "#ff7f0e", "shards": "#6a51a3", "success": "#2a7a2a"}  # fmt: skip


def rate_text(per_s: float) -> str:
    return f"{per_s:g} payments/s" if per_s else "as fast as possible"


def _span(span: Any) -> str:
    """Which payments the baseline is: those sent in [lo, hi) s of the load."""
    if not span:
        return ""
    return f" (payments sent {span[0]}-{span[1]} s into the load)"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _secs(x: float | None, never: str = "not within the run") -> str:
    return never if x is None else f"{x:.1f}s"


def _warmup_line(w: dict[str, Any] | None) -> str:
    if not w or w.get("warm") is None:
        return "  no warm-up: the load was measured from its first second"
    rates = ", ".join(f"{100 * r:.0f}%" for r in w.get("rates", [])) or "none"
    state = "warm" if w["warm"] else "NOT warm (the baseline may read low)"
    return (f"  warm-up (unmeasured, not checked): {w['seconds']:.0f}s, {w['sent']} payments; "
            f"{state}, its last seconds answered {rates} in time")  # fmt: skip


def summary_lines(report: dict[str, Any]) -> list[str]:
    v = report["verdict"]
    load = report["load"]
    fault = report["fault"]
    hints = report["hints_replayed"]
    states = ", ".join(f"{k} {n}" for k, n in v["by_state"].items()) or "none"
    refused = ", ".join(f"{k}: {n}" for k, n in v["rejected_by_reason"].items())
    lines = [
        f"drill {report['scenario']} (seed {report['seed']}): {report['plan']['summary']}",
        f"  fault {fault['start_s']:.1f}s -> {fault['end_s']:.1f}s "
        f"(held {report['plan']['hold_s']:.0f}s); load "
        f"{rate_text(load['rate_per_s'])} for {load['seconds']:.0f}s (asked: "
        f"{load.get('duration_s', load['seconds']):.0f}s, and on to "
        f"{load.get('after_fault_s', 0):.0f}s after the fault ended); the run ended at "
        f"{load.get('run_s', load['seconds']):.0f}s, the load drained and the victims restored",
        f"  payments: {load['sent']} sent, {v['acknowledged']} acknowledged ({states}), "
        f"{v['rejected']} refused{f' ({refused})' if refused else ''}, {v['unknown']} unknown "
        f"(resolved: {', '.join(f'{k} {n}' for k, n in v['resolutions'].items()) or 'none'})",
        f"  retries {load['retries']}; not sent because the generator was saturated: "
        f"{load['skipped_payments']}",
        f"  LOST {v['lost']}   DUPLICATED {v['duplicated']}   UNRESOLVED {v['unresolved']}",
        _warmup_line(report.get("warmup")),
        f"  success rate before the fault {_pct(report['success_rate_before_fault'])}"
        f"{_span(report.get('baseline_span_s'))}; "
        f"error rate during the fault {_pct(report['error_rate_during_fault'])}",
        f"  recovery time {_secs(report['recovery_time_s'])} after the fault's start (the "
        f"last degraded second ends {_secs(report['last_degraded_s'], never='-')} after it)",
        f"  payments answered within {report['answer_slo_s']:g}s during the fault: "
        f"{_pct(report['success_rate_during_fault'])}",
        f"  shards moved {report['shards_moved']} (at most {report['shards_unserved_max']} "
        f"unserved at once); hints replayed "
        f"{hints['count'] if hints['count'] is not None else 'unavailable'} ({hints['source']})",
    ]
    for led in report.get("ledgers", []):
        for r in led.get("repairs", []):
            lines.append(
                f"  {led['city']} ({led['role']}) still lacked rows after hints "
                f"({led.get('short_before_repair') or 'see report.json'}): nodetool repair on "
                f"{r['zone']} {'done' if r['ok'] else 'FAILED'} in {r['seconds']:.0f}s "
                f"({r['detail']}); chains {'verified' if led['read'] else 'not verified'} "
                f"after {led['waited_s']:.0f}s"
            )
            if r.get("left_out"):
                lines.append(f"    left out (down), not repaired: {', '.join(r['left_out'])}")
        if led.get("after_repair_of"):
            lines.append(
                f"  {led['city']} ({led['role']}) was read after the repair from "
                f"{led['after_repair_of']}, which levels every city's replicas"
            )
    failed = [c for c in v["checks"] if not c["ok"]]
    lines.append(f"  checks: {len(v['checks']) - len(failed)} passed, {len(failed)} failed")
    for c in v["checks"]:
        lines.append(f"    {'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}")
        lines += [f"         e.g. {e}" for e in ([] if c["ok"] else c["examples"])]
    files = report["files"]
    lines.append(f"  files: {files['report']}, {files['timeline']}, {files['client_log']}")
    lines.append(f"RESULT: {'PASS' if v['ok'] else 'FAIL'}")
    return lines


def write_json(report: dict[str, Any], out: Path) -> Path:
    path = out / REPORT_JSON
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    return path


# -- HTML -----------------------------------------------------------------------------------


def _nice_max(v: float) -> float:
    """The smallest of 1, 2, 4, 6, 8 x 10^k at or above ``v`` (quarters stay round)."""
    if v <= 0:
        return 1.0
    step = 10.0 ** math.floor(math.log10(v))
    for m in (1.0, 2.0, 4.0, 6.0, 8.0, 10.0):
        if m * step >= v * (1 - 1e-9):
            return m * step
    return 10 * step


def chart(
    title: str,
    unit: str,
    *,
    seconds: int,
    series: Sequence[tuple[str, str, Sequence[float | None], bool]],
    fault: tuple[float, float],
    events: Sequence[tuple[float, str]],
    labels: bool = False,
    marks: Sequence[tuple[float, str]] = (),
    top: float | None = None,
) -> str:
    """One SVG panel; each series is (name, colour, values per second, as bars). Events
    are dashed lines (with their text when ``labels``); ``marks`` are green lines."""
    w, h = CHART_W_PX, CHART_H_PX
    pw = w - MARGIN_L_PX - MARGIN_R_PX
    ph = h - MARGIN_T_PX - MARGIN_B_PX
    if top is None:
        top = _nice_max(max((v for _, _, vs, _ in series for v in vs if v is not None), default=0))
    span = max(1, seconds)

    def x(t: float) -> float:
        return MARGIN_L_PX + pw * min(max(t, 0.0), span) / span

    def y(v: float) -> float:
        return MARGIN_T_PX + ph * (1 - v / top)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="{MARGIN_L_PX}" y="15" font-size="13" font-weight="bold">'
           f'{html.escape(title)}</text>']  # fmt: skip
    fx0, fx1 = x(fault[0]), x(fault[1])
    out.append(f'<rect x="{fx0:.1f}" y="{MARGIN_T_PX}" width="{max(1.0, fx1 - fx0):.1f}" '
               f'height="{ph}" fill="{FAULT_FILL}" fill-opacity="0.12">'
               f"<title>fault {fault[0]:.1f}s - {fault[1]:.1f}s</title></rect>")  # fmt: skip
    for frac in (0, 0.25, 0.5, 0.75, 1):
        yy = y(top * frac)
        out.append(f'<line x1="{MARGIN_L_PX}" x2="{w - MARGIN_R_PX}" y1="{yy:.1f}" '
                   f'y2="{yy:.1f}" stroke="#ddd"/><text x="{MARGIN_L_PX - 4}" y="{yy + 4:.1f}" '
                   f'font-size="10" text-anchor="end">{round(top * frac, 6):g}</text>')  # fmt: skip
    tick = max(5, 10 * round(span / 100))
    for t in range(0, span + 1, tick):
        out.append(f'<text x="{x(t):.1f}" y="{h - 8}" font-size="10" '
                   f'text-anchor="middle">{t}s</text>')  # fmt: skip
    out.append(f'<text x="12" y="{MARGIN_T_PX + ph / 2:.0f}" font-size="10" '
               f'transform="rotate(-90 12 {MARGIN_T_PX + ph / 2:.0f})" '
               f'text-anchor="middle">{html.escape(unit)}</text>')  # fmt: skip
    bar_w = max(1.0, pw / span - 1)
    for name, color, values, bars in series:
        if bars:
            for t, v in enumerate(values):
                if v:
                    out.append(f'<rect x="{x(t):.1f}" y="{y(v):.1f}" width="{bar_w:.1f}" '
                               f'height="{y(0) - y(v):.1f}" fill="{color}">'
                               f"<title>{t}s {name}: {v:g}</title></rect>")  # fmt: skip
            continue
        path: list[str] = []
        pen_up = True
        for t, v in enumerate(values):
            if v is None:
                pen_up = True
                continue
            path.append(f"{'M' if pen_up else 'L'}{x(t + 0.5):.1f},{y(v):.1f}")
            pen_up = False
        if path:
            out.append(f'<path d="{" ".join(path)}" fill="none" stroke="{color}" '
                       f'stroke-width="1.6"><title>{html.escape(name)}</title></path>')  # fmt: skip
    for i, (at, what) in enumerate(events):
        out.append(f'<line x1="{x(at):.1f}" x2="{x(at):.1f}" y1="{MARGIN_T_PX}" '
                   f'y2="{MARGIN_T_PX + ph}" stroke="#444" stroke-dasharray="3,3">'
                   f"<title>{at:.1f}s {html.escape(what)}</title></line>")  # fmt: skip
        if labels:
            short = what if len(what) <= EVENT_LABEL_CHARS else what[: EVENT_LABEL_CHARS - 1] + "…"
            row = MARGIN_T_PX + 10 + EVENT_LABEL_ROW_PX * (i % EVENT_LABEL_ROWS)  # staggered
            out.append(f'<text x="{x(at) + 3:.1f}" y="{row}" font-size="9" '
                       f'fill="#444">{html.escape(short)}</text>')  # fmt: skip
    for at, what in marks:
        out.append(f'<line x1="{x(at):.1f}" x2="{x(at):.1f}" y1="{MARGIN_T_PX}" '
                   f'y2="{MARGIN_T_PX + ph}" stroke="#2a7a2a" stroke-width="2">'
                   f"<title>{at:.1f}s {html.escape(what)}</title></line>"
                   f'<text x="{x(at) + 3:.1f}" y="{MARGIN_T_PX + ph - 4}" font-size="10" '
                   f'fill="#2a7a2a">{html.escape(what)}</text>')  # fmt: skip
    lx = w - MARGIN_R_PX
    for name, color, _, _ in reversed(series):
        out.append(f'<text x="{lx}" y="15" font-size="11" fill="{color}" '
                   f'text-anchor="end">{html.escape(name)}</text>')  # fmt: skip
        lx -= 9 * len(name) + 14
    out.append("</svg>")
    return "\n".join(out)


def render_html(report: dict[str, Any], secs: Sequence[Second]) -> str:
    fault = (report["fault"]["start_s"], report["fault"]["end_s"])
    events = [(e["t"], e["what"]) for e in report["events"]]

    recovery = report["recovery_time_s"]
    marks = [] if recovery is None else [(fault[0] + recovery, f"recovered (+{recovery:.1f}s)")]

    def panel(
        title: str, unit: str, *series: tuple[str, str, list[float | None], bool], **kw: Any
    ) -> str:
        return chart(title, unit, seconds=len(secs), series=series, fault=fault, events=events,
                     **kw)  # fmt: skip

    def col(values: Sequence[float | int | None]) -> list[float | None]:
        return [None if v is None else float(v) for v in values]

    panels = [
        panel("Throughput", "payments/s",
              ("sent/s", COLORS["sent"], col([s.sent for s in secs]), False),
              ("acknowledged/s", COLORS["acked"], col([s.acked for s in secs]), False),
              labels=True),
        panel(f"Success rate: payments answered within {report['answer_slo_s']:g} s, by the "
              "second they were sent", "%",
              ("success %", COLORS["success"],
               col([None if s.success_rate is None else 100 * s.success_rate for s in secs]),
               False), marks=marks, top=100.0),
        panel("Errors (failed attempts, retries included)", "errors/s",
              ("errors/s", COLORS["errors"], col([s.errors for s in secs]), True)),
        panel("Latency, first send to acknowledgement", "ms",
              ("p50", COLORS["p50"], col([s.p50_ms for s in secs]), False),
              ("p99", COLORS["p99"], col([s.p99_ms for s in secs]), False)),
        panel("Shards served (as the switch nodes say)", "shards",
              ("served", COLORS["shards"], col([s.shards_served for s in secs]), False)),
    ]  # fmt: skip
    v = report["verdict"]
    rows = [
        ("result", "PASS" if v["ok"] else "FAIL"),
        ("fault", report["plan"]["summary"]),
        ("payments acknowledged", v["acknowledged"]),
        ("lost (must be 0)", v["lost"]),
        ("duplicated (must be 0)", v["duplicated"]),
        ("unknown / unresolved", f"{v['unknown']} / {v['unresolved']}"),
        ("error rate during the fault (failed attempts)", _pct(report["error_rate_during_fault"])),
        (f"payments answered within {report['answer_slo_s']:g} s during the fault",
         _pct(report["success_rate_during_fault"])),
        ("recovery time", _secs(report["recovery_time_s"])),
        ("last degraded second ends at (after the fault's start)",
         _secs(report["last_degraded_s"], never="-")),
        ("shards moved", report["shards_moved"]),
        ("hints replayed", report["hints_replayed"]["count"]
         if report["hints_replayed"]["count"] is not None
         else f"unavailable: {report['hints_replayed']['note']}"),
    ]  # fmt: skip
    table = "\n".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(val))}</td></tr>"
        for k, val in rows
    )
    checks = "\n".join(
        f'<li class="{"ok" if c["ok"] else "bad"}">{"ok" if c["ok"] else "FAIL"} '
        f"<b>{html.escape(c['name'])}</b>: {html.escape(c['detail'])}"
        + "".join(f"<br><small>{html.escape(e)}</small>" for e in c["examples"])
        + "</li>"
        for c in v["checks"]
    )
    evs = "\n".join(f"<li>{e['t']:.1f}s {html.escape(e['what'])}</li>" for e in report["events"])
    title = f"drill {report['scenario']} seed {report['seed']} at {report['started_at']}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ text-align: left; padding: 2px 12px 2px 0; }}
li.ok {{ color: #2a7a2a; }} li.bad {{ color: #b00; font-weight: bold; }}
.note {{ color: #555; font-size: 0.9em; max-width: 960px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<table>{table}</table>
<p class="note">Shaded: the fault, from its first step to the end of recovery. Dashed lines:
drill events. Seconds count from the start of the load. Errors are failed attempts (each
retry counts); latency is per acknowledged payment, retries included.</p>
{"".join(f"<div>{p}</div>" for p in panels)}
<h2>Checks</h2><ul>{checks}</ul>
<h2>Events</h2><ul>{evs}</ul>
</body></html>
"""


def write_html(report: dict[str, Any], secs: Sequence[Second], out: Path) -> Path:
    path = out / TIMELINE_HTML
    path.write_text(render_html(report, secs))
    return path


__all__ = [
    "CLIENT_LOG",
    "REPORT_JSON",
    "TIMELINE_HTML",
    "WARMUP_LOG",
    "chart",
    "rate_text",
    "render_html",
    "summary_lines",
    "write_html",
    "write_json",
]
