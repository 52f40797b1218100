"""``mobile-export build``: resolve the plan once, then run the fixed stages
load → reference → convert → export → verify → fidelity → bundle (:mod:`mobile_export.stages`).

The same sequence for every backend; a backend fills in only export and verify. The plan
(:mod:`mobile_export.plan`) holds every decision; the manifest is assembled from the stages'
results in :mod:`mobile_export.manifest`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from mobile_export import stages
from mobile_export.bundle import Manifest, staged_bundle
from mobile_export.console import StepUI
from mobile_export.manifest import VERSIONED_PACKAGES, package_versions
from mobile_export.memory import freeze_library_objects
from mobile_export.plan import (
    BuildPlan,
    BuildRequest,
    backend_options,
    check_kv_budget,
    context_length,
    kv_cache_bytes,
    parse_group_sizes,
    quant_spec,
    resolve_plan,
    resolve_recipe,
)
from mobile_export.stages import convert, special_ids
from mobile_export.verify import Comparison

__all__ = [
    "VERSIONED_PACKAGES",
    "BuildPlan",
    "BuildRequest",
    "BuildResult",
    "backend_options",
    "build",
    "build_plan",
    "check_kv_budget",
    "context_length",
    "convert",
    "kv_cache_bytes",
    "package_versions",
    "parse_group_sizes",
    "quant_spec",
    "resolve_plan",
    "resolve_recipe",
    "special_ids",
]


@dataclass
class BuildResult:
    """What a build wrote and measured."""

    bundle: Path
    zip_path: Path
    manifest: Manifest
    comparisons: list[Comparison] = field(default_factory=list)
    seconds: float = 0.0


def build(request: BuildRequest, ui: StepUI) -> BuildResult:
    """Run the whole pipeline and return where the bundle went."""
    started = time.perf_counter()
    plan = resolve_plan(request, resolve_recipe(request))
    return build_plan(plan, ui, started)


def build_plan(plan: BuildPlan, ui: StepUI, started: float | None = None) -> BuildResult:
    """Run the stages of a resolved plan."""
    started = time.perf_counter() if started is None else started
    stages.preflight(plan)
    freeze_library_objects()
    loaded = stages.load(plan, ui)
    refs = stages.reference(plan, loaded, ui)
    converted = stages.convert_stage(plan, loaded, ui)
    with staged_bundle(plan.bundle_dir, plan.force) as stage:
        exported = stages.export(plan, loaded, converted, stage, ui)
        verified = stages.verify(plan, loaded, refs, converted, exported, stage, ui)
        fidelity = stages.fidelity(plan, loaded, refs, exported, verified, stage, ui)
        manifest, zip_path = stages.bundle(plan, loaded, refs, converted, exported, verified, fidelity, stage, ui)
    return BuildResult(
        bundle=plan.bundle_dir,
        zip_path=zip_path,
        manifest=manifest,
        comparisons=verified.comparisons,
        seconds=time.perf_counter() - started,
    )
