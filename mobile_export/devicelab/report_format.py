"""How report figures are shown: the metrics (label, unit, which direction is worse) and the
formatting of values, cells, devices and scenarios that the Markdown and HTML reports share."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """How a metric is shown and which direction is worse."""

    label: str
    unit: str
    scale: float
    higher_is_better: bool
    digits: int = 1


METRICS: dict[str, Metric] = {
    "load_s": Metric("load", "ms", 1000.0, False),
    "ttft_s": Metric("time to first token", "ms", 1000.0, False),
    "prefill_tokens_per_s": Metric("prefill", "tok/s", 1.0, True),
    "decode_tokens_per_s": Metric("decode", "tok/s", 1.0, True),
    "peak_memory_bytes": Metric("peak memory", "MB", 1e-6, False),
    "bundle_bytes": Metric("bundle size", "MB", 1e-6, False, digits=2),
}


def fmt_value(name: str, value: float) -> str:
    """A metric value in its display unit."""
    metric = METRICS[name]
    scaled = value * metric.scale
    digits = metric.digits if abs(scaled) < 1000 else 0
    return f"{scaled:,.{digits}f}"


def fmt_cell(group: dict, name: str) -> str:
    """'median (min–max)' plus the change against the baseline, regressions marked."""
    s = group["metrics"].get(name)
    if not s:
        return "–"
    text = fmt_value(name, s["median"])
    if s["n"] > 1 and s["min"] != s["max"]:
        text += f" ({fmt_value(name, s['min'])}–{fmt_value(name, s['max'])})"
    change = group.get("changes", {}).get(name)
    if change:
        text += f" {change['change_pct']:+.1f}%"
        if change["regression"]:
            text += " **REGRESSION**"
    return text


def device_label(group: dict) -> str:
    """Device name with its model and OS."""
    info = group["device_info"]
    details = ", ".join(
        str(v) for v in (info.get("model"), f"{info.get('os', '')} {info.get('os_version', '')}".strip()) if v
    )
    return f"{group['device']} ({details})" if details else group["device"]


def scenario_label(scenario: dict) -> str:
    """What a scenario measures, in words."""
    return (
        f"prompt {scenario['prompt_tokens']} tokens, generate {scenario['new_tokens']}, "
        f"{scenario.get('warmup', 0)} warm-up, {scenario['repetitions']} repetitions, timeout {scenario['timeout_s']:g}s"
    )


def by_scenario(groups: list[dict]) -> dict[str, list[dict]]:
    """Groups by scenario name, in the order first seen."""
    out: dict[str, list[dict]] = {}
    for group in groups:
        out.setdefault(group["scenario"], []).append(group)
    return out
