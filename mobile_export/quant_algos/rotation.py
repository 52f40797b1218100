"""Orthogonal rotations folded into the weights, so quantization meets fewer outliers (QuaRot:
Ashkboos et al. 2024, arXiv:2404.00456; SpinQuant: Liu et al. 2024, arXiv:2405.16406).

The residual stream of a pre-norm decoder can be rotated by any orthogonal ``Q`` without
changing the model's output, once each RMSNorm's weight ``g`` is folded into the linears
that read the norm (RMSNorm without a weight commutes with ``Q``: ``||x Q|| = ||x||``):

- embedding rows ``E ← E Q``;
- linears reading the residual stream (q/k/v, gate/up, LM head): ``W ← (W · diag(g)) Q``, and
  the norm's weight becomes 1;
- linears writing it (o, down): ``W ← Qᵀ W``, bias ``b ← b Q``.

In addition each attention head's values are rotated by a ``head_dim`` rotation ``R``
(SpinQuant's R2): ``W_v ← Rᵀ W_v`` per kv head and ``W_o ← W_o R`` per query head; attention
is linear in the values, so this is exact too. Nothing is added at run time: the exported
graph is the same, only the weights differ (SpinQuant's online Hadamards R3/R4 are not used).

``Q`` is a randomised Hadamard matrix (random ±1 signs times a normalised Hadamard matrix,
built by Sylvester's construction, times a Paley matrix for sizes 12, 20, 28, 36, 44, ... ·2^k)
when the width allows, else a seeded random orthogonal matrix (QR of a Gaussian). The models
whose norms sit between a linear and the residual stream (Gemma 2/3's "sandwich" norms) do
not fold exactly and are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mobile_export.errors import UserError
from mobile_export.families import all_families

# Model types whose decoder layers are plain pre-norm blocks (norm -> linears -> residual add),
# as their family records say (mobile_export.families: no sandwich norms).
ROTATABLE: tuple[str, ...] = tuple(family.model_type for family in all_families() if family.rotatable)


@dataclass(frozen=True)
class Rotation:
    """The residual-stream rotation and the per-head value rotation, with how they were made."""

    residual: torch.Tensor  # [hidden, hidden], float64
    head: torch.Tensor  # [head_dim, head_dim], float64
    kind: str  # e.g. "hadamard 576 (36 x 16)" or "random orthogonal 600"
    seed: int


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, int(math.isqrt(n)) + 1))


def _paley(order: int) -> torch.Tensor | None:
    """A Hadamard matrix of ``order`` from Paley's constructions (q prime), or None."""

    def jacobsthal(q: int) -> torch.Tensor:
        squares = {(i * i) % q for i in range(1, q)}
        chi = [0] + [1 if i in squares else -1 for i in range(1, q)]
        return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)

    q = order - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I
        c = jacobsthal(q)
        s = torch.zeros(order, order, dtype=torch.float64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = c
        return s + torch.eye(order, dtype=torch.float64)
    q = order // 2 - 1
    if order % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II
        c = jacobsthal(q)
        s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        s[0, 1:] = 1
        s[1:, 0] = 1
        s[1:, 1:] = c
        plus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        minus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        out = torch.zeros(order, order, dtype=torch.float64)
        for i in range(q + 1):
            for j in range(q + 1):
                block = plus if s[i, j] == 0 else minus * s[i, j]
                out[2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = block
        return out
    return None


def hadamard(n: int) -> tuple[torch.Tensor, str] | None:
    """An unnormalised ±1 Hadamard matrix of size ``n`` (Sylvester x Paley), or None."""
    power = 1
    while n % (power * 2) == 0:
        power *= 2
    for base_power in [p for p in (2**k for k in range(power.bit_length())) if power % p == 0][::-1]:
        rest = n // base_power
        base = torch.ones(1, 1, dtype=torch.float64) if rest == 1 else _paley(rest)
        if base is None:
            continue
        h = base
        two = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        for _ in range(int(math.log2(base_power))):
            h = torch.kron(h, two)
        label = f"hadamard {n}" if rest == 1 else f"hadamard {n} (Paley {rest} x Sylvester {base_power})"
        return h, label
    return None


def orthogonal(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """A seeded random orthogonal ``n`` x ``n`` matrix: randomised Hadamard when one exists."""
    gen = torch.Generator().manual_seed(seed)
    found = hadamard(n)
    if found is not None:
        h, label = found
        signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
        return signs[:, None] * h / math.sqrt(n), label
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :], f"random orthogonal {n}"


def check_rotatable(config) -> None:
    """Refuse architectures where the rotation does not fold exactly into the weights."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ROTATABLE:
        raise UserError(
            f"--rotate does not fold exactly for '{model_type}': its norms sit between a linear and the residual stream",
            hint="leave out --rotate; it works for " + ", ".join(ROTATABLE),
        )


def make_rotation(hidden: int, head_dim: int, seed: int = 0) -> Rotation:
    """Residual and per-head rotations for a model of width ``hidden``."""
    residual, kind = orthogonal(hidden, seed)
    head, _ = orthogonal(head_dim, seed + 1)
    return Rotation(residual=residual, head=head, kind=kind, seed=seed)


def _norm_weight(norm: nn.Module, what: str) -> torch.Tensor:
    """Effective multiplier of an RMSNorm already swapped for ``ExportRMSNorm``."""
    from mobile_export.modeling.norms import ExportRMSNorm

    if not isinstance(norm, ExportRMSNorm):
        raise UserError(
            f"--rotate cannot fold {what} ({type(norm).__name__}) into the weights", hint="leave out --rotate"
        )
    return norm.weight.detach().double()


def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype).contiguous()


def _rotate_readers(linears: list[nn.Linear], norm: nn.Module, q: torch.Tensor, what: str) -> None:
    g = _norm_weight(norm, what)
    for linear in linears:
        _set(linear.weight, (linear.weight.detach().double() * g[None, :]) @ q)
    norm.weight.data = torch.ones_like(norm.weight)


def _rotate_writer(linear: nn.Linear, q: torch.Tensor) -> None:
    _set(linear.weight, q.t() @ linear.weight.detach().double())
    if linear.bias is not None:
        _set(linear.bias, linear.bias.detach().double() @ q)


def rotate_embedding(embedding: nn.Embedding, rotation: Rotation) -> None:
    """Embedding rows into the rotated residual stream."""
    _set(embedding.weight, embedding.weight.detach().double() @ rotation.residual)


def rotate_layer(layer: nn.Module, rotation: Rotation) -> None:
    """Fold the layer's norms and rotate its linears (its norms must be ``ExportRMSNorm``)."""
    q = rotation.residual
    attn, mlp = layer.self_attn, layer.mlp
    _rotate_readers([attn.q_proj, attn.k_proj, attn.v_proj], layer.input_layernorm, q, "the attention norm")
    _rotate_writer(attn.o_proj, q)
    _rotate_readers([mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm, q, "the MLP norm")
    _rotate_writer(mlp.down_proj, q)
    r, hd = rotation.head, attn.head_dim
    v = attn.v_proj.weight.detach().double().clone()
    for h in range(attn.n_kv_heads):
        v[h * hd : (h + 1) * hd] = r.t() @ v[h * hd : (h + 1) * hd]
    _set(attn.v_proj.weight, v)
    if attn.v_proj.bias is not None:
        b = attn.v_proj.bias.detach().double().clone()
        for h in range(attn.n_kv_heads):
            b[h * hd : (h + 1) * hd] = b[h * hd : (h + 1) * hd] @ r
        _set(attn.v_proj.bias, b)
    o = attn.o_proj.weight.detach().double().clone()
    for h in range(attn.n_heads):
        o[:, h * hd : (h + 1) * hd] = o[:, h * hd : (h + 1) * hd] @ r
    _set(attn.o_proj.weight, o)


def rotate_head(lm_head: nn.Linear, final_norm: nn.Module, rotation: Rotation) -> None:
    """Fold the final norm into the LM head and read the rotated residual stream."""
    _rotate_readers([lm_head], final_norm, rotation.residual, "the final norm")


def check_layer(layer: nn.Module) -> None:
    """Refuse a layer without the pre-norm projections the rotation folds into."""
    names = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
    missing = [n for n in names if not hasattr(layer, n)]
    missing += [f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(layer.self_attn, n)]
    missing += [f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj") if not hasattr(layer.mlp, n)]
    extra = [n for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm") if hasattr(layer, n)]
    if missing or extra:
        raise UserError(
            f"--rotate cannot fold this decoder layer ({', '.join(missing + extra)})", hint="leave out --rotate"
        )
