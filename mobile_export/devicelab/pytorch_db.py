"""Rows in the PyTorch OSS benchmark database format (v3), as ExecuTorch's device benchmarks upload them.

One row per bundle x device x scenario x metric: ``benchmark`` (name, mode, dtype, extra_info),
``model`` (name, type, backend), ``metric`` (name, every repetition's value, target), ``runners``
(the device). Metric names follow ExecuTorch's: ``token_per_sec``, ``model_load_time(ms)``...
"""

from __future__ import annotations

PYTORCH_DB_METRICS = {
    "load_s": ("model_load_time(ms)", 1000.0),
    "ttft_s": ("ttft(ms)", 1000.0),
    "prefill_tokens_per_s": ("prefill_token_per_sec", 1.0),
    "decode_tokens_per_s": ("token_per_sec", 1.0),
    "peak_memory_bytes": ("peak_mem_usage(mb)", 1.0 / (1024 * 1024)),
}


def pytorch_db_rows(summary: dict) -> list[dict]:
    """Rows in the PyTorch OSS benchmark database format (v3: benchmark, model, metric, runners)."""
    rows = []
    for group in summary["groups"]:
        bundle, device, scenario = group["bundle_info"], group["device_info"], group["scenario_info"]
        for name, (metric_name, scale) in PYTORCH_DB_METRICS.items():
            s = group["metrics"].get(name)
            if not s:
                continue
            memory = device.get("memory_bytes")
            rows.append(
                {
                    "benchmark": {
                        "name": "mobile-export",
                        "mode": "inference",
                        "dtype": (bundle.get("quantization") or {}).get("scheme", ""),
                        "extra_info": {
                            "app_type": device.get("kind", ""),
                            "scenario": scenario["name"],
                            "prompt_tokens": scenario["prompt_tokens"],
                            "new_tokens": scenario["new_tokens"],
                        },
                    },
                    "model": {
                        "name": bundle.get("model", group["bundle"]),
                        "type": "OSS model",
                        "backend": bundle.get("backend", ""),
                        "extra_info": {"bundle": group["bundle"], "manifest_sha256": bundle["manifest_sha256"]},
                    },
                    "metric": {
                        "name": metric_name,
                        "benchmark_values": [v * scale for v in s["values"]],
                        "target_value": None,
                        "extra_info": {"method": "generate", "median": s["median"] * scale},
                    },
                    "runners": [
                        {
                            "name": device.get("model", group["device"]),
                            "type": f"{device.get('os', '')} {device.get('os_version', '')}".strip(),
                            "cpu_info": device.get("soc", ""),
                            "avail_mem_in_gb": "",
                            "total_mem_in_gb": round(memory / 2**30, 1) if isinstance(memory, int) else "",
                        }
                    ],
                }
            )
    return rows
