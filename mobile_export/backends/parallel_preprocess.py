"""Run an ExecuTorch backend's ``preprocess`` on every partition at once, one process per core.

ExecuTorch lowers a decoder as one partition per layer and preprocesses them one after another
(XNNPACK: its whole pass list, re-tracing each partition with fake tensors: about a third of a
135M model's lowering). The partitions are independent, so forked workers preprocess them in
parallel; ExecuTorch's own ``preprocess_multimethod`` hook takes every partition at once, which is
where this plugs in. Written here because ExecuTorch has no parallel lowering of its own.

Workers are forked (they inherit the partitions copy-on-write; nothing is pickled to them), run
one partition per task so at most one layer's preprocessed bytes per worker are in flight, and
return ExecuTorch's own ``PreprocessResult`` objects. One core, or a single partition, runs in
this process exactly as ExecuTorch would.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

# What forked workers read: (backend class, flat list of programs, flat list of compile specs).
# Set only while a pool runs; a module global because fork passes it by inheritance, not pickling.
_JOBS: tuple | None = None


def usable_cores() -> int:
    """The CPUs this process may run on (``taskset`` and container limits included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _worker_init() -> None:
    import torch

    # Freeze what the worker inherited so its garbage collector never scans it: a scan writes
    # every object's header, copying each page into the worker (fork's classic trap) and making
    # each partition several times slower than in the parent. Freezing is a list splice, not a
    # walk; the collector then runs again on the worker's own objects.
    gc.freeze()
    gc.enable()
    # One intra-op thread a worker: the workers are the parallelism, and OpenMP's thread pool does
    # not survive fork (PyTorch's DataLoader workers do the same).
    torch.set_num_threads(1)


def _preprocess_one(index: int):
    backend, programs, specs = _JOBS
    return backend.preprocess(programs[index], specs[index])


def _parallel_results(backend, programs: list, specs: list, workers: int) -> list:
    global _JOBS
    _JOBS = (backend, programs, specs)
    # This process's collector pauses while the workers share its pages (a scan here would copy
    # them too). Pausing, not gc.freeze/unfreeze: unfreeze would also release what the build froze
    # before loading (memory.freeze_library_objects), and every later collection would walk it.
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init) as pool:
            return list(pool.map(_preprocess_one, range(len(programs))))
    finally:
        if was_enabled:
            gc.enable()
        _JOBS = None


@contextlib.contextmanager
def parallel_preprocess(backend_details: type, workers: int | None = None) -> Iterator[int]:
    """While the block lowers, ``backend_details`` preprocesses its partitions on ``workers``
    processes (default: every usable core); yields the worker count."""
    workers = usable_cores() if workers is None else workers
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield 1
        return
    serial = backend_details.preprocess_multimethod  # bound classmethod: ExecuTorch's loop
    own = "preprocess_multimethod" in backend_details.__dict__
    saved = backend_details.__dict__.get("preprocess_multimethod")

    def preprocess_multimethod(cls, edge_programs: dict, compile_specs: dict) -> dict:
        names = list(edge_programs)
        programs = [program for name in names for program in edge_programs[name]]
        specs = [spec for name in names for spec in compile_specs[name]]
        if len(programs) < 2 or any(len(edge_programs[n]) != len(compile_specs[n]) for n in names):
            return serial(edge_programs, compile_specs)
        flat = iter(_parallel_results(cls, programs, specs, min(workers, len(programs))))
        return {name: [next(flat) for _ in edge_programs[name]] for name in names}

    backend_details.preprocess_multimethod = classmethod(preprocess_multimethod)
    try:
        yield workers
    finally:
        if own:
            backend_details.preprocess_multimethod = saved
        else:
            del backend_details.preprocess_multimethod
