"""Reports from results alone: summary JSON, Markdown, self-contained HTML, baseline regressions.

Repetitions of one bundle x device x scenario are summarised by their median and spread (min,
max, quartiles, standard deviation). With a baseline (last week's results folder), each median
is compared with the baseline's for the same bundle, device and scenario names; a change beyond
the plan's threshold (percent; recorded in every result) in the worse direction is a regression.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
from pathlib import Path

from mobile_export import __version__
from mobile_export.errors import UserError

from .report_format import METRICS, by_scenario, device_label, fmt_cell, fmt_value, scenario_label
from .results import LoadedResults, measurement_key

SUMMARY_SCHEMA_VERSION = 1


def stats(values: list[float]) -> dict:
    """Median and spread of a metric over repetitions."""
    ordered = sorted(values)
    quartiles = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 3
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "mean": statistics.fmean(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "p25": quartiles[0],
        "p75": quartiles[2],
        "stdev": statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
        "values": values,
    }


def final_records(records: list[dict]) -> list[dict]:
    """One record per measurement: its latest ``ok`` record, else its latest record."""
    chosen: dict[tuple, dict] = {}
    for record in records:  # file order is time order
        key = measurement_key(record)
        previous = chosen.get(key)
        if previous is None or record["status"] == "ok" or previous["status"] != "ok":
            chosen[key] = record
    return list(chosen.values())


def group_results(records: list[dict]) -> list[dict]:
    """Bundle x device x scenario groups with per-metric stats, run counts and failure reasons."""
    groups: dict[tuple, dict] = {}
    for record in final_records(records):
        bundle, device, scenario = record["bundle"], record["device"], record["scenario"]
        key = (bundle["name"], bundle["manifest_sha256"], device["name"], scenario["name"], scenario["fingerprint"])
        group = groups.setdefault(
            key,
            {
                "bundle": bundle["name"],
                "bundle_info": bundle,
                "device": device["name"],
                "device_info": {},
                "scenario": scenario["name"],
                "scenario_info": scenario,
                "runs": {"ok": 0, "failed": 0, "timeout": 0, "skipped": 0},
                "failures": [],
                "versions": {},
                "_values": {name: [] for name in METRICS},
                "_last": "",
            },
        )
        group["runs"][record["status"]] += 1
        if record.get("created_at", "") >= group["_last"]:
            group["_last"] = record.get("created_at", "")
            group["device_info"] = {k: v for k, v in device.items() if k not in ("name",)}
            group["versions"] = record.get("versions", {})
        if record["status"] == "ok":
            metrics = record["metrics"]
            for name in METRICS:
                value = bundle.get(name) if name == "bundle_bytes" else metrics.get(name)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    group["_values"][name].append(float(value))
        else:
            failure = record.get("failure") or {}
            group["failures"].append(
                {
                    "repetition": record["repetition"],
                    "status": record["status"],
                    "kind": failure.get("kind"),
                    "reason": failure.get("reason"),
                }
            )
    out = []
    for group in groups.values():
        values = group.pop("_values")
        group.pop("_last")
        group["metrics"] = {name: stats(v) for name, v in values.items() if v}
        out.append(group)
    return out  # in the order first measured: the plan's order


def thresholds_of(records: list[dict], overrides: dict[str, float] | None = None) -> dict[str, float | None]:
    """The plan thresholds recorded with the newest record, with command-line overrides."""
    found: dict = {}
    newest = ""
    for record in records:
        plan = record.get("plan") or {}
        if isinstance(plan.get("thresholds"), dict) and record.get("created_at", "") >= newest:
            newest = record.get("created_at", "")
            found = plan["thresholds"]
    result = {name: found.get(name) for name in METRICS}
    for name, value in (overrides or {}).items():
        if name not in METRICS:
            raise UserError(f"unknown threshold metric '{name}'", hint="use one of: " + ", ".join(METRICS))
        result[name] = value
    return result


def compare(groups: list[dict], baseline_groups: list[dict], thresholds: dict[str, float | None]) -> list[dict]:
    """Attach baseline medians and changes to ``groups``; return the regressions."""
    by_name: dict[tuple, dict] = {}
    for group in baseline_groups:
        by_name[(group["bundle"], group["device"], group["scenario"])] = group
    regressions = []
    for group in groups:
        base = by_name.get((group["bundle"], group["device"], group["scenario"]))
        group["baseline"] = None
        group["changes"] = {}
        if base is None:
            continue
        group["baseline"] = {
            "bundle_manifest_sha256": base["bundle_info"]["manifest_sha256"],
            "medians": {name: s["median"] for name, s in base["metrics"].items()},
        }
        for name, metric in METRICS.items():
            now, before = group["metrics"].get(name), base["metrics"].get(name)
            if not now or not before or before["median"] == 0:
                continue
            change = (now["median"] - before["median"]) / before["median"] * 100.0
            allowed = thresholds.get(name)
            worse = -change if metric.higher_is_better else change
            regression = allowed is not None and worse > allowed
            entry = {
                "baseline": before["median"],
                "current": now["median"],
                "change_pct": change,
                "threshold_pct": allowed,
                "regression": regression,
            }
            group["changes"][name] = entry
            if regression:
                regressions.append(
                    {
                        "bundle": group["bundle"],
                        "device": group["device"],
                        "scenario": group["scenario"],
                        "metric": name,
                    }
                    | entry
                )
    return regressions


def build_summary(
    current: LoadedResults, baseline: LoadedResults | None = None, overrides: dict[str, float] | None = None
) -> dict:
    """The summary every report format is rendered from."""
    groups = group_results(current.records)
    thresholds = thresholds_of(current.records, overrides)
    regressions = compare(groups, group_results(baseline.records), thresholds) if baseline else []
    plans = sorted({(r.get("plan") or {}).get("name", "?") for r in current.records})
    statuses = [r["status"] for r in final_records(current.records)]
    return {
        "schema": "mobile-export.bench-summary",
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "tool": {"name": "mobile-export", "version": __version__},
        "results": str(current.path),
        "baseline": str(baseline.path) if baseline else None,
        "plans": plans,
        "measurements": {status: statuses.count(status) for status in ("ok", "failed", "timeout", "skipped")},
        "thresholds_pct": thresholds,
        "groups": groups,
        "regressions": regressions,
        "warnings": list(current.skipped_lines) + (list(baseline.skipped_lines) if baseline else []),
    }


# --- Markdown --------------------------------------------------------------------------------


def render_markdown(summary: dict) -> str:
    """The report as a Markdown document."""
    counts = summary["measurements"]
    lines = [
        f"# Benchmark report: {', '.join(summary['plans']) or 'no plan'}",
        "",
        f"Results: `{summary['results']}` — {counts['ok']} ok, {counts['failed']} failed, "
        f"{counts['timeout']} timed out, {counts['skipped']} skipped.",
    ]
    if summary["baseline"]:
        lines.append(f"Baseline: `{summary['baseline']}`.")
    lines.append("")
    lines.append("## Regressions")
    lines.append("")
    if not summary["baseline"]:
        lines.append("No baseline given (pass `--baseline DIR` to compare).")
    elif not summary["regressions"]:
        lines.append("None beyond the thresholds.")
    else:
        lines.append("| bundle | device | scenario | metric | baseline | now | change | allowed |")
        lines.append("| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
        for r in summary["regressions"]:
            metric = METRICS[r["metric"]]
            lines.append(
                f"| {r['bundle']} | {r['device']} | {r['scenario']} | {metric.label} ({metric.unit}) | "
                f"{fmt_value(r['metric'], r['baseline'])} | {fmt_value(r['metric'], r['current'])} | "
                f"{r['change_pct']:+.1f}% | {'-' if metric.higher_is_better else '+'}{r['threshold_pct']:g}% |"
            )
    for scenario, groups in by_scenario(summary["groups"]).items():
        lines += ["", f"## Scenario `{scenario}`", "", scenario_label(groups[0]["scenario_info"]), ""]
        header = ["bundle", "device", "ok"] + [f"{m.label} ({m.unit})" for m in METRICS.values()]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("| --- | --- | ---: |" + " ---: |" * len(METRICS))
        for group in groups:
            total = sum(group["runs"].values())
            cells = [group["bundle"], device_label(group), f"{group['runs']['ok']}/{total}"]
            cells += [fmt_cell(group, name) for name in METRICS]
            lines.append("| " + " | ".join(cells) + " |")
    failures = [(g, f) for g in summary["groups"] for f in g["failures"]]
    if failures:
        lines += [
            "",
            "## Failures",
            "",
            "| bundle | device | scenario | rep | status | reason |",
            "| --- | --- | --- | ---: | --- | --- |",
        ]
        for group, failure in failures:
            reason = str(failure["reason"]).replace("|", "\\|").replace("\n", " ")
            lines.append(
                f"| {group['bundle']} | {group['device']} | {group['scenario']} | {failure['repetition']} | "
                f"{failure['status']} | {reason} |"
            )
    lines += ["", "## Environment", ""]
    environment = {}
    for group in summary["groups"]:
        versions = ", ".join(f"{k} {v}" for k, v in group["versions"].items() if v)
        environment[f"- {device_label(group)}: {versions}"] = None
    lines += list(environment)
    if summary["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in summary["warnings"]]
    lines.append("")
    lines.append("Values: median over repetitions (min–max); changes are against the baseline median.")
    return "\n".join(lines) + "\n"


# --- writing ---------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_reports(summary: dict, out_dir: Path, pytorch_db: Path | None = None) -> list[Path]:
    """summary.json, report.md and report.html (and the database rows when asked), each atomically."""
    from .html import render_html
    from .pytorch_db import pytorch_db_rows

    written = [
        write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n"),
        write_atomic(out_dir / "report.md", render_markdown(summary)),
        write_atomic(out_dir / "report.html", render_html(summary)),
    ]
    if pytorch_db is not None:
        written.append(write_atomic(pytorch_db, json.dumps(pytorch_db_rows(summary), indent=2) + "\n"))
    return written


def parse_threshold_overrides(items: tuple[str, ...]) -> dict[str, float]:
    """``metric=percent`` pairs from the command line."""
    overrides = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            overrides[name.strip()] = float(value.rstrip("%"))
        except ValueError:
            sep = ""
        if not sep:
            raise UserError(
                f"--threshold {item!r} is not METRIC=PERCENT", hint="e.g. --threshold decode_tokens_per_s=5"
            )
    return overrides
