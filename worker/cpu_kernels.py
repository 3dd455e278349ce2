"""float32 linear layers on the CPU through oneDNN instead of MKL.

torch sends a float32 ``F.linear`` on the CPU to MKL's sgemm. For the shapes a decode step has
(a few rows against a large weight) oneDNN's kernel, which torch also ships
(``torch.ops.mkldnn._linear_pointwise``, what ``torch.compile`` uses for CPU linears), was faster
here: docs/benchmarks-notes.md has the figures. It computes the same product in float32; results
differ from MKL's only by summation order (~1e-4 on SmolLM2's logits).

Only exact ``torch.nn.Linear`` modules are touched (bitsandbytes' layers subclass it and keep
their own kernels), only float32 weights on the CPU, and not modules that accelerate hooked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# A single row (one sequence decoding) only goes to oneDNN for the vocabulary projection: for
# the small per-layer matrices MKL was as fast there, and the call costs less.
_LARGE_OUT_FEATURES = 8192


def _forward(module: torch.nn.Linear, op: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    large = module.out_features >= _LARGE_OUT_FEATURES
    linear = torch.nn.functional.linear

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight, bias = module.weight, module.bias
        several_rows = x.dim() > 1 and x.numel() > x.shape[-1]
        # oneDNN's op has no backward: a forward that records gradients stays on torch's path.
        if (several_rows or large) and not (torch.is_grad_enabled() and weight.requires_grad):
            out: torch.Tensor = op(x, weight, bias, "none", [], "")
            return out
        return linear(x, weight, bias)

    forward._onednn = True  # type: ignore[attr-defined]  # what restore_linears may undo
    return forward


def use_onednn_linears(model: Any) -> int:
    """Route the model's float32 CPU linear layers through oneDNN; returns how many."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or hasattr(module, "_hf_hook"):
            continue
        if module.weight.device.type != "cpu" or module.weight.dtype != torch.float32:
            continue
        module.forward = _forward(module, op)
        count += 1
    return count


def restore_linears(model: Any) -> None:
    """Undo ``use_onednn_linears`` (the benchmark's plain-``generate`` baseline runs without it);
    other per-module forwards (accelerate's hooks) stay."""
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "_onednn", False):
            del module.__dict__["forward"]
