"""Giving freed memory back to the OS between pipeline steps, so peak RSS stays low."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc


def release_memory() -> None:
    """Collect garbage and ask glibc to return free heap pages (large models free gigabytes).

    Without ``malloc_trim`` freed tensors stay in the process's heap and count towards its
    peak when the next step (loading the artifact to verify it) allocates again.
    """
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return
    try:
        libc = ctypes.CDLL(libc_name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return
    trim(0)


def drop_weights(model) -> None:
    """Release every parameter and buffer of a torch module (an export consumed it)."""
    for module in model.modules():
        for name in list(module._parameters):
            module._parameters[name] = None
        for name in list(module._buffers):
            module._buffers[name] = None


def freeze_library_objects() -> None:
    """Import torch and transformers, then move every object alive now out of the garbage
    collector's reach (``gc.freeze``).

    The half-million objects of those libraries live as long as the process; without this every
    full collection (``release_memory`` after each layer, and Python's own during export) walks
    them all: 0.2 s a collection on this machine. Called before any model is loaded, so no
    model-sized object is ever frozen.
    """
    import torch  # noqa: F401
    import transformers  # noqa: F401

    gc.collect()
    gc.freeze()
