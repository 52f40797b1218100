"""Imported once by the host device's fork server: PyTorch, ExecuTorch and its kernels, ONNX Runtime, the runtime loaders.

Measurement processes are forked from that server, so they start with all of this in memory
and time only what a phone app would do: load the bundle and generate.
"""

import onnxruntime  # noqa: F401

from mobile_export.devicelab import harness  # noqa: F401
from mobile_export.generate import generate  # noqa: F401
from mobile_export.runtimes import LOADERS, loader
from mobile_export.runtimes.executorch import load_runtime_ops

load_runtime_ops()
for _format in LOADERS:
    loader(_format)
