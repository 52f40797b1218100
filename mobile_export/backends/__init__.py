"""Backends: one module each, registered by name with :func:`register`.

A backend turns an :class:`~mobile_export.modeling.ExportableDecoder` into an artifact file
and verifies it (opening it with its runtime loader from :mod:`mobile_export.runtimes`, which
is also what ``run`` uses; a backend does not open bundles). Every backend declares the
targets and quantization schemes it accepts, so a bad combination is refused before any
heavy work starts.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mobile_export.errors import UserError

_REGISTRY: dict[str, type[Backend]] = {}
# Every module of this package is imported on the first lookup (not at import time, so
# `mobile-export --help` stays fast); a module registers its backends with @register.
_loaded = False


@dataclass(frozen=True)
class BackendOptions:
    """Per-build settings a backend may use (from the recipe's target, overridden on the command line)."""

    compute_units: str | None = None
    deployment_target: str | None = None
    compile_mlmodelc: bool | None = None  # Core ML: also write the compiled .mlmodelc (macOS + Xcode)
    opset: int | None = None  # ONNX: ai.onnx opset of the graph
    min_onnxruntime: str | None = None  # ONNX: oldest ONNX Runtime release the folder must load in


# Command-line flag of each BackendOptions field (for errors).
OPTION_FLAGS = {
    "compute_units": "--compute-units",
    "deployment_target": "--min-ios",
    "compile_mlmodelc": "--compile-mlmodelc",
    "opset": "--opset",
    "min_onnxruntime": "--min-onnxruntime",
}
COREML_OPTIONS = ("compute_units", "deployment_target", "compile_mlmodelc")


@dataclass
class ExportInfo:
    """What a backend writes into the artifact besides the weights (metadata, special ids)."""

    model_name: str
    hf_id: str | None
    revision: str | None
    license: str
    max_seq_len: int
    vocab_size: int
    n_layers: int
    bos_id: int | None
    eos_ids: list[int]
    spec: object  # QuantSpec
    options: BackendOptions = field(default_factory=BackendOptions)


@dataclass
class ExportedArtifact:
    """What a backend's :meth:`Backend.export` wrote, handed as is to its :meth:`Backend.verify`.

    ``manifest`` is the manifest's ``artifact`` section (``file`` and ``format`` first, then the
    backend's own facts); ``files`` every top-level bundle entry the artifact consists of;
    ``quantization`` and ``min_os`` go to those manifest sections; ``verify_inputs`` carries
    what verification needs from the export (an exported program, a scratch fp32 graph), and is
    emptied by :meth:`release`. Nothing is kept on the backend object between the two calls.
    """

    file: str
    format: str
    manifest: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    compiled: str | None = None
    quantization: dict = field(default_factory=dict)
    min_os: dict = field(default_factory=dict)
    verify_inputs: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_facts(cls, facts: dict, **verify_inputs) -> ExportedArtifact:
        """An artifact from the facts a backend reports (``file``, ``format``, optional ``files``,
        ``compiled``, ``quantization``, ``min_os``; every other key is a manifest fact)."""
        facts = dict(facts)
        quantization = facts.pop("quantization", {})
        min_os = facts.pop("min_os", {})
        return cls(
            file=facts["file"],
            format=facts["format"],
            manifest=facts,
            files=list(facts.get("files") or [facts["file"]]),
            compiled=facts.get("compiled"),
            quantization=quantization,
            min_os=min_os,
            verify_inputs=verify_inputs,
        )

    def path(self, folder: Path) -> Path:
        """The artifact's main file (or package folder) inside ``folder``."""
        return folder / self.file

    def release(self) -> None:
        """Drop what verification needed (exported programs, scratch folders)."""
        for value in self.verify_inputs.values():
            cleanup = getattr(value, "cleanup", None)
            if callable(cleanup):
                cleanup()
        self.verify_inputs.clear()


@dataclass
class VerifyContext:
    """Reference figures a backend checks its artifact against."""

    sequences: list[list[int]]
    reference: list[torch.Tensor]  # original model's logits at every compared position
    lowering_ref: list[torch.Tensor] | None  # the same quantized model run eagerly (torch-side quantization)
    tokenizer: object
    eos_ids: list[int]
    spec: object  # QuantSpec
    weights_meaningful: bool
    reference_dtype: torch.dtype
    ui: object


@dataclass
class Verification:
    """What a backend's verification found: comparisons, other failures, manifest details."""

    comparisons: list = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    # what the fidelity text runs on when the artifact's runtime is not available here (Core ML
    # off macOS: the package's own weights in the PyTorch module), with words saying so
    stand_in: object = None
    stand_in_label: str = ""


class Backend(ABC):
    """What a backend provides to the build pipeline."""

    name: str = ""
    targets: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ()
    artifact_file: str = ""
    artifact_format: str = ""  # the manifest's artifact.format: which runtime loader opens it
    delegate: str | None = None  # the ExecuTorch delegate its program needs (the manifest's artifact.delegate)
    default_quant = None  # QuantSettings used when a recipe names another backend for the target
    attention: str = "executorch"  # the ExportableDecoder attention this backend converts
    quantizes_in_torch: bool = True  # False: the backend compresses weights itself after conversion
    weight_dtype: torch.dtype = torch.float32  # dtype the decoder layers are converted in
    cache_dtype: torch.dtype = torch.float32  # KV-cache element type on device
    keeps_model: bool = False  # verify() needs the eager decoder after export
    weight_only: bool = False  # int8 means weight-only (no dynamic activation quantization)
    option_names: tuple[str, ...] = ()  # the BackendOptions fields this backend takes
    # What the command line, recipes and pre-flight checks derive from the registry:
    order: int = 100  # place in listings (--backend help, --quant help)
    target_rank: dict[str, int] = {}  # per target: lower = preferred when a target lists backends
    embeddings: tuple[str, ...] = ("none", "int8", "int4")  # embedding schemes it accepts
    quant_algos: tuple[str, ...] = ("rtn",)  # --quant-algo values it takes
    algo_hint: str | None = None  # hint shown when --quant-algo is refused (default: the list)
    rotates: bool = False  # takes --rotate (weights rotated in torch before export)
    torch_grid: bool = False  # the converter stores integers chosen in torch (hqq, --keep-8bit)
    per_layer_bits: bool = False  # the converter quantizes layer by layer (each layer its own bits)
    group_patterns: bool = False  # takes --group-size-for (per-layer group sizes)
    own_embedding_groups: bool = False  # takes --embedding-group-size though it quantizes after conversion
    exact_eager_stand_in: bool = False  # torchao's eager model is exactly its quantization (sensitivity)

    @classmethod
    def keeps_8bit(cls) -> bool:
        """Whether --keep-8bit layers can stay 8-bit with this backend."""
        return cls.quantizes_in_torch or cls.per_layer_bits

    @classmethod
    def takes_torch_integers(cls, scheme: str) -> bool:
        """Whether integers chosen in torch (gptq, awq, hqq on a torch grid, 8-bit layers) reach
        the artifact with ``scheme``: always when torch quantizes, else only for int4 and int8."""
        return cls.quantizes_in_torch or scheme in ("int4", "int8")

    @classmethod
    def embedding_groups(cls) -> bool:
        """Whether --embedding-group-size applies with this backend."""
        return cls.quantizes_in_torch or cls.own_embedding_groups

    def check_options(self, options: BackendOptions, spec) -> BackendOptions:
        """Validate and fill in backend options; refuses options meant for other backends."""
        given = [k for k, v in vars(options).items() if v is not None and k not in self.option_names]
        if given:
            owners = "Core ML backends" if given[0] in COREML_OPTIONS else "the onnx backend"
            flags = ", ".join(OPTION_FLAGS.get(k, k) for k in given)
            raise UserError(f"backend '{self.name}' takes no {flags}", hint=f"only {owners} use {flags}")
        return options

    def tensor_specs(self, decoder, vocab_size: int) -> tuple[list, list, list]:
        """Inputs, outputs and states of the artifact (ExecuTorch runner convention by default)."""
        from mobile_export.bundle import TensorSpec

        inputs = [
            TensorSpec(name="tokens", dtype="int64", shape=[1, "seq_len"]),
            TensorSpec(name="input_pos", dtype="int64", shape=[1]),
        ]
        outputs = [TensorSpec(name="logits", dtype="float32", shape=[1, vocab_size])]
        states = []
        for index, layer in enumerate(decoder.layers):
            for kind in ("k_cache", "v_cache"):
                buf = getattr(layer.self_attn, kind)
                dtype = str(buf.dtype).removeprefix("torch.")
                states.append(TensorSpec(name=f"layers.{index}.{kind}", dtype=dtype, shape=list(buf.shape)))
        return inputs, outputs, states

    @abstractmethod
    def verify(self, artifact: ExportedArtifact, folder: Path, ctx: VerifyContext, decoder) -> Verification:
        """Check ``artifact``, written into ``folder``; ``decoder`` is the eager model when
        ``keeps_model``, else None."""

    def check(self, target: str, scheme: str) -> None:
        """Refuse a target or scheme this backend cannot do, listing what it can."""
        if target not in self.targets:
            raise UserError(
                f"backend '{self.name}' cannot build for target '{target}'",
                hint="it builds for: " + ", ".join(self.targets),
            )
        from mobile_export.quantize import LINEAR_SCHEMES

        if scheme not in LINEAR_SCHEMES:
            raise UserError(
                f"unknown quantization scheme '{scheme}'",
                hint=f"backend '{self.name}' can do: " + ", ".join(self.schemes),
            )
        if scheme not in self.schemes:
            raise UserError(
                f"backend '{self.name}' cannot do quantization '{scheme}'",
                hint="it can do: " + ", ".join(self.schemes),
            )

    @abstractmethod
    def export(self, model, info: ExportInfo, out_dir: Path, ui) -> ExportedArtifact:
        """Write the artifact into ``out_dir``; return what was written, for verify and the manifest."""


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: add a backend to the registry (duplicate names are an error)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"backend '{cls.name}' registered twice ({_REGISTRY[cls.name].__name__}, {cls.__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    """Import every module of this package once (each registers its own backends)."""
    global _loaded
    if _loaded:
        return
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        if not module.startswith("_"):
            importlib.import_module(f"{__name__}.{module}")
    _loaded = True


def available() -> list[str]:
    """Names of the registered backends."""
    _load_all()
    return sorted(_REGISTRY)


def backend_classes() -> list[type[Backend]]:
    """The registered backend classes in listing order."""
    _load_all()
    return sorted(_REGISTRY.values(), key=lambda cls: (cls.order, cls.name))


def backend_class(name: str) -> type[Backend] | None:
    """A registered backend class by name, or None."""
    _load_all()
    return _REGISTRY.get(name)


def target_backends(target: str) -> tuple[str, ...]:
    """Backends that build for ``target``, in preference order."""
    able = [cls for cls in backend_classes() if target in cls.targets]
    return tuple(cls.name for cls in sorted(able, key=lambda cls: cls.target_rank.get(target, 100)))


def backends_help() -> str:
    """The backend names as a sentence: 'a, b, c or d'."""
    names = [cls.name for cls in backend_classes()]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def schemes_help() -> str:
    """Each backend's schemes: 'xnnpack fp32|8da4w|int8; coreml fp16|...'."""
    return "; ".join(f"{cls.name} {'|'.join(cls.schemes)}" for cls in backend_classes())


def get_backend(name: str) -> Backend:
    """A backend by name; unknown names list the known ones and suggest a close match."""
    _load_all()
    if name not in _REGISTRY:
        known = sorted(_REGISTRY)
        close = difflib.get_close_matches(name, known, n=1)
        hint = "available: " + ", ".join(known) + (f"; did you mean '{close[0]}'?" if close else "")
        raise UserError(f"unknown or unavailable backend '{name}'", hint=hint)
    return _REGISTRY[name]()
