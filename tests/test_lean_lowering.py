"""Faster lowering gives the same program: parallel preprocessing of an ExecuTorch backend's
partitions, and the skipped or op-gated passes."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
from executorch.exir.backend.backend_details import BackendDetails, PreprocessResult

from mobile_export.backends.parallel_preprocess import parallel_preprocess, usable_cores


class RecordingDetails(BackendDetails):
    """Test double of a backend: its 'compiled' bytes name the partition and the process."""

    @staticmethod
    def preprocess(edge_program, compile_specs) -> PreprocessResult:
        return PreprocessResult(processed_bytes=f"{edge_program}:{os.getpid()}".encode())


def test_results_keep_each_partition_in_order_and_come_from_workers() -> None:
    programs = {"forward": ["p0", "p1", "p2", "p3"], "other": ["q0"]}
    specs = {"forward": [[], [], [], []], "other": [[]]}
    with parallel_preprocess(RecordingDetails, workers=2) as workers:
        results = RecordingDetails.preprocess_multimethod(programs, specs)
    assert workers == 2
    assert list(results) == ["forward", "other"]
    decoded = {name: [r.processed_bytes.decode().split(":") for r in rs] for name, rs in results.items()}
    assert [name for name, _ in decoded["forward"]] == programs["forward"]
    assert [name for name, _ in decoded["other"]] == ["q0"]
    pids = {pid for rs in decoded.values() for _, pid in rs}
    assert str(os.getpid()) not in pids
    # the class is restored: back to ExecuTorch's serial loop, in this process
    assert "preprocess_multimethod" not in RecordingDetails.__dict__
    serial = RecordingDetails.preprocess_multimethod(programs, specs)
    assert serial["forward"][0].processed_bytes.decode() == f"p0:{os.getpid()}"


class CollectorStateDetails(BackendDetails):
    """Test double of a backend: its 'compiled' bytes are the worker's garbage-collector state."""

    @staticmethod
    def preprocess(edge_program, compile_specs) -> PreprocessResult:
        return PreprocessResult(processed_bytes=f"{gc.get_freeze_count() > 0}:{gc.isenabled()}".encode())


def test_workers_freeze_what_they_inherit_and_the_parent_keeps_its_frozen_objects() -> None:
    gc.freeze()  # what the build froze before loading (memory.freeze_library_objects)
    try:
        frozen = gc.get_freeze_count()
        with parallel_preprocess(CollectorStateDetails, workers=2):
            results = CollectorStateDetails.preprocess_multimethod({"forward": ["a", "b"]}, {"forward": [[], []]})
        assert [r.processed_bytes.decode() for r in results["forward"]] == ["True:True", "True:True"]
        assert gc.get_freeze_count() >= frozen
        assert gc.isenabled()
    finally:
        gc.unfreeze()


def test_one_worker_runs_executorch_own_loop_here() -> None:
    with parallel_preprocess(RecordingDetails, workers=1) as workers:
        results = RecordingDetails.preprocess_multimethod({"forward": ["a", "b"]}, {"forward": [[], []]})
    assert workers == 1
    assert [r.processed_bytes.decode() for r in results["forward"]] == [f"a:{os.getpid()}", f"b:{os.getpid()}"]


def test_usable_cores_follows_the_affinity_mask() -> None:
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)


class ThreeLinears(torch.nn.Module):
    """Linears split by an op XNNPACK does not take (cumsum): three XNNPACK partitions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cumsum(layer(x), dim=-1)
        return x


def _lowered_bytes(workers: int) -> tuple[bytes, int]:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
    from executorch.exir import to_edge

    program = torch.export.export(ThreeLinears().eval(), (torch.randn(2, 16),))
    edge = to_edge(program)
    with parallel_preprocess(XnnpackBackend, workers=workers):
        edge = edge.to_backend(XnnpackPartitioner())
    delegates = sum("executorch_call_delegate" in str(n.target) for n in edge.exported_program().graph.nodes)
    return edge.to_executorch().buffer, delegates


@pytest.mark.skipif("fork" not in __import__("multiprocessing").get_all_start_methods(), reason="needs fork")
def test_xnnpack_program_is_byte_identical_with_parallel_preprocess() -> None:
    serial, serial_delegates = _lowered_bytes(1)
    parallel, parallel_delegates = _lowered_bytes(2)
    assert serial_delegates == parallel_delegates == 3
    assert parallel == serial


def _tiny_pte(arch: str, tmp_path: Path, lean: bool) -> bytes:
    import contextlib

    from tiny_models import tiny_model

    from mobile_export.backends import ExportInfo, get_backend
    from mobile_export.backends import xnnpack as xnnpack_module
    from mobile_export.console import StepUI
    from mobile_export.quantize import QuantSpec
    from mobile_export.stages import convert

    backend = get_backend("xnnpack")
    spec = QuantSpec(scheme="8da4w", group_size=32, embedding="int4")
    decoder, _ = convert(tiny_model(arch), spec, 64, backend, StepUI(quiet=True))
    info = ExportInfo(
        model_name="tiny",
        hf_id=None,
        revision=None,
        license="test",
        max_seq_len=64,
        vocab_size=decoder.vocab_size if hasattr(decoder, "vocab_size") else 1024,
        n_layers=2,
        bos_id=0,
        eos_ids=[1],
        spec=spec,
    )
    out = tmp_path / ("lean" if lean else "full")
    out.mkdir()
    saved = xnnpack_module.lean_xnnpack_passes, xnnpack_module.gated_edge_passes
    if not lean:
        xnnpack_module.lean_xnnpack_passes = xnnpack_module.gated_edge_passes = contextlib.nullcontext
    try:
        backend.export(decoder, info, out, StepUI(quiet=True))
    finally:
        xnnpack_module.lean_xnnpack_passes, xnnpack_module.gated_edge_passes = saved
    return (out / backend.artifact_file).read_bytes()


@pytest.mark.slow
def test_lean_xnnpack_passes_change_no_byte_of_the_program(tmp_path: Path) -> None:
    """Skipped and op-gated XNNPACK and edge passes: the same .pte as ExecuTorch's full lists. Gemma 3:
    the family with the most graph features (q/k norms, soft-capping, sliding windows, scaled
    embeddings); llama, phi3, gemma2, qwen2 and qwen3 were compared the same way when the gates
    were written (each a 40-60 s pair of builds, too slow to repeat in every run)."""
    assert _tiny_pte("gemma3_text", tmp_path, lean=True) == _tiny_pte("gemma3_text", tmp_path, lean=False)
