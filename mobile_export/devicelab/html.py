"""The HTML report: one self-contained page (inline CSS and SVG; no scripts, no network).

Per scenario, one chart per metric with a row per bundle x device: the bar is the median, the
whisker spans min–max, each dot is one repetition (the distribution), a dashed tick marks the
baseline median, and a regression is drawn red.
"""

from __future__ import annotations

import math
from html import escape

from .report_format import METRICS, by_scenario, device_label, fmt_cell, fmt_value, scenario_label

CHART_METRICS = ("decode_tokens_per_s", "prefill_tokens_per_s", "ttft_s", "peak_memory_bytes", "load_s")
_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px auto; max-width: 1180px;
       color: #1d2330; padding: 0 16px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #d6dae3; }
table { border-collapse: collapse; margin: 10px 0; font-size: 13px; }
th, td { border: 1px solid #d6dae3; padding: 4px 8px; text-align: right; vertical-align: top; }
th:nth-child(-n+2), td:nth-child(-n+2) { text-align: left; }
th { background: #f1f3f7; }
.reg { color: #b3261e; font-weight: 600; } .ok { color: #1b7f3b; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.chart { border: 1px solid #e2e5ec; border-radius: 6px; padding: 6px; background: #fff; }
.muted { color: #687083; } code { background: #f1f3f7; padding: 1px 4px; border-radius: 3px; }
"""


def _axis(value: float) -> tuple[float, int]:
    """A round axis end at or above ``value`` and how many intervals divide it into round ticks."""
    if value <= 0:
        return 1.0, 4
    exponent = math.floor(math.log10(value))
    for step, intervals in ((1, 5), (2, 4), (2.5, 5), (5, 5), (10, 5)):
        candidate = step * 10**exponent
        if candidate >= value:
            return candidate, intervals
    return 10 ** (exponent + 1), 5


def bar_chart(name: str, groups: list[dict]) -> str:
    """An inline SVG: median bar, min–max whisker, one dot per repetition, baseline tick per row."""
    metric = METRICS[name]
    rows = [g for g in groups if name in g["metrics"]]
    if not rows:
        return ""
    label_w, plot_w, value_w, row_h, top = 190, 250, 110, 30, 34
    width, height = label_w + plot_w + value_w, top + row_h * len(rows) + 26
    peak = 0.0
    for group in rows:
        s = group["metrics"][name]
        peak = max(peak, s["max"] * metric.scale)
        base = (group.get("baseline") or {}).get("medians", {}).get(name)
        if base is not None:
            peak = max(peak, base * metric.scale)
    top_value, intervals = _axis(peak * 1.05)

    def x(value: float) -> float:
        return label_w + plot_w * (value * metric.scale) / top_value

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(metric.label)}">',
        f'<text x="4" y="18" font-size="13" font-weight="600">{escape(metric.label)} ({escape(metric.unit)})'
        f"{' — higher is better' if metric.higher_is_better else ' — lower is better'}</text>",
    ]
    for i in range(intervals + 1):
        tick = top_value * i / intervals
        tx = label_w + plot_w * i / intervals
        parts.append(f'<line x1="{tx:.1f}" y1="{top - 6}" x2="{tx:.1f}" y2="{height - 22}" stroke="#eceef3"/>')
        parts.append(
            f'<text x="{tx:.1f}" y="{height - 8}" font-size="10" text-anchor="middle" fill="#687083">{tick:g}</text>'
        )
    for index, group in enumerate(rows):
        s = group["metrics"][name]
        change = group.get("changes", {}).get(name)
        regression = bool(change and change["regression"])
        y = top + index * row_h
        label = f"{group['bundle']} · {group['device']}"
        parts.append(f'<text x="4" y="{y + 18}" font-size="12">{escape(label[:30])}</text>')
        parts.append(
            f'<rect x="{label_w}" y="{y + 6}" width="{max(1.0, x(s["median"]) - label_w):.1f}" height="16" '
            f'fill="{"#e0796f" if regression else "#7aa2e3"}"><title>median {fmt_value(name, s["median"])} '
            f"{escape(metric.unit)}</title></rect>"
        )
        parts.append(
            f'<line x1="{x(s["min"]):.1f}" y1="{y + 14}" x2="{x(s["max"]):.1f}" y2="{y + 14}" stroke="#1d2330" stroke-width="1.5"/>'
        )
        for value in s["values"]:
            parts.append(
                f'<circle cx="{x(value):.1f}" cy="{y + 14}" r="2.6" fill="#1d2330" fill-opacity="0.55">'
                f"<title>{fmt_value(name, value)}</title></circle>"
            )
        base = (group.get("baseline") or {}).get("medians", {}).get(name)
        if base is not None:
            parts.append(
                f'<line x1="{x(base):.1f}" y1="{y + 2}" x2="{x(base):.1f}" y2="{y + 26}" stroke="#687083" '
                f'stroke-width="2" stroke-dasharray="3,2"><title>baseline {fmt_value(name, base)}</title></line>'
            )
        text = fmt_value(name, s["median"])
        if change:
            text += f" ({change['change_pct']:+.1f}%)"
        color = "#b3261e" if regression else "#1d2330"
        parts.append(
            f'<text x="{label_w + plot_w + 6}" y="{y + 18}" font-size="12" fill="{color}">{escape(text)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _table(groups: list[dict]) -> str:
    head = "".join(f"<th>{escape(m.label)} ({escape(m.unit)})</th>" for m in METRICS.values())
    rows = []
    for group in groups:
        total = sum(group["runs"].values())
        cells = []
        for name in METRICS:
            text = fmt_cell(group, name).replace(" **REGRESSION**", "")
            change = group.get("changes", {}).get(name)
            cls = ' class="reg"' if change and change["regression"] else ""
            mark = " ▼ regression" if cls else ""
            cells.append(f"<td{cls}>{escape(text)}{mark}</td>")
        rows.append(
            f"<tr><td>{escape(group['bundle'])}</td><td>{escape(device_label(group))}</td>"
            f"<td>{group['runs']['ok']}/{total}</td>{''.join(cells)}</tr>"
        )
    return f"<table><tr><th>bundle</th><th>device</th><th>ok</th>{head}</tr>{''.join(rows)}</table>"


def render_html(summary: dict) -> str:
    """The whole report page."""
    counts = summary["measurements"]
    title = f"Benchmark report: {', '.join(summary['plans']) or 'no plan'}"
    body = [
        f"<h1>{escape(title)}</h1>",
        f"<p>Results <code>{escape(summary['results'])}</code>: {counts['ok']} ok, {counts['failed']} failed, "
        f"{counts['timeout']} timed out, {counts['skipped']} skipped. Generated {escape(summary['generated_at'])}.</p>",
    ]
    if summary["baseline"]:
        body.append(f"<p>Baseline <code>{escape(summary['baseline'])}</code>.</p>")
    body.append("<h2>Regressions</h2>")
    if not summary["baseline"]:
        body.append('<p class="muted">No baseline given.</p>')
    elif not summary["regressions"]:
        body.append('<p class="ok">None beyond the thresholds.</p>')
    else:
        items = []
        for r in summary["regressions"]:
            metric = METRICS[r["metric"]]
            items.append(
                f"<li class='reg'>{escape(r['bundle'])} on {escape(r['device'])}, {escape(r['scenario'])}: "
                f"{escape(metric.label)} {fmt_value(r['metric'], r['baseline'])} → {fmt_value(r['metric'], r['current'])} "
                f"{escape(metric.unit)} ({r['change_pct']:+.1f}%, allowed {r['threshold_pct']:g}%)</li>"
            )
        body.append(f"<ul>{''.join(items)}</ul>")
    for scenario, groups in by_scenario(summary["groups"]).items():
        body.append(f"<h2>Scenario <code>{escape(scenario)}</code></h2>")
        body.append(
            f"<p class='muted'>{escape(scenario_label(groups[0]['scenario_info']))}. "
            "Bars: median; whisker: min–max; dots: repetitions; dashed: baseline median.</p>"
        )
        charts = [bar_chart(name, groups) for name in CHART_METRICS]
        body.append("<div class='charts'>" + "".join(f"<div class='chart'>{c}</div>" for c in charts if c) + "</div>")
        body.append(_table(groups))
    failures = [(g, f) for g in summary["groups"] for f in g["failures"]]
    if failures:
        rows = "".join(
            f"<tr><td>{escape(g['bundle'])}</td><td>{escape(g['device'])}</td><td>{escape(g['scenario'])}</td>"
            f"<td>{f['repetition']}</td><td>{escape(f['status'])}</td><td style='text-align:left'>{escape(str(f['reason']))}</td></tr>"
            for g, f in failures
        )
        body.append(
            "<h2>Failures</h2><table><tr><th>bundle</th><th>device</th><th>scenario</th><th>rep</th>"
            f"<th>status</th><th>reason</th></tr>{rows}</table>"
        )
    if summary["warnings"]:
        body.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{escape(w)}</li>" for w in summary["warnings"]) + "</ul>")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )
