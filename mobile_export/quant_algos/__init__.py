"""Quantization algorithms beyond round-to-nearest, for the schemes in :mod:`mobile_export.quantize`.

Every algorithm ends on the same integer grid torchao's intx schemes use (symmetric, groups
along the input dimension), and hands its integer weights and scales to torchao's
``IntxUnpackedToInt8Tensor``, so export and XNNPACK lowering are exactly those of plain
round-to-nearest (the same qd8-qb4w program, the same bytes):

- :mod:`.grid`: the grid itself, and building torchao's tensor from our integers and scales.
- :mod:`.gptq`: GPTQ (Frantar et al. 2022, arXiv:2210.17323), Hessian-aware error feedback.
- :mod:`.awq`: AWQ (Lin et al. 2023, arXiv:2306.00978), activation-aware channel scaling and
  clipping.
- :mod:`.rotation`: QuaRot/SpinQuant-style orthogonal rotations folded into the weights
  (arXiv:2404.00456, arXiv:2405.16406).
- :mod:`.calibration`: calibration text to token windows; running one decoder layer at a time.
- :mod:`.pipeline`: the layer-by-layer driver ``stages.convert`` calls.
- :mod:`.sensitivity`: per-layer-group KL divergence added by quantization (which layers to
  keep at 8 bits).
"""
