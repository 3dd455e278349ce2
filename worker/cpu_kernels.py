"""float32 linear layers on the CPU through oneDNN, with weights packed once, instead of MKL.

torch sends a float32 ``F.linear`` on the CPU to MKL's sgemm. For the shapes a decode step has
(a few rows against a large weight) oneDNN's kernel, which torch also ships
(``torch.ops.mkldnn._linear_pointwise``, what ``torch.compile`` uses for CPU linears), was faster
here, and faster again when the weight is reordered once into oneDNN's blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``) instead of on every call: docs/benchmarks-notes.md
has the figures. It computes the same product in float32; results differ from MKL's only by
summation order (~1e-4 on SmolLM2's logits).

The packed weight replaces the module's parameter, so memory holds one copy of each matrix; a
weight another module also uses (an output projection tied to the input embeddings) stays as it
is and the layer gets a packed copy. Only exact ``torch.nn.Linear`` modules are touched
(bitsandbytes' layers subclass it and keep their own kernels), only float32 weights on the CPU,
and not modules that accelerate hooked. The packed model is for inference: ``restore_linears``
gives the layers back their plain weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _forward(module: torch.nn.Linear, op: Any, packed: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        # oneDNN's op has no backward: an input that needs gradients goes through F.linear.
        if x.requires_grad and torch.is_grad_enabled():
            return torch.nn.functional.linear(x, packed.to_dense(), module.bias)
        out: torch.Tensor = op(x, packed, module.bias, "none", [], "")
        return out

    forward._onednn = True  # type: ignore[attr-defined]  # what restore_linears may undo
    return forward


def _is_ours(module: torch.nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), "_onednn", False) is True


def _shared_parameters(model: torch.nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (tied weights)."""
    holders: dict[int, int] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                holders[id(param)] = holders.get(id(param), 0) + 1
    return {key for key, count in holders.items() if count > 1}


def use_onednn_linears(model: Any) -> int:
    """Pack the model's float32 CPU linear layers for oneDNN; returns how many run on it."""
    # Weights made under inference mode could never take part in autograd again (restore_linears).
    with torch.inference_mode(False):
        return _pack(model)


def _pack(model: Any) -> int:
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    if op is None or reorder is None or not torch.backends.mkldnn.is_available():
        return 0
    shared = _shared_parameters(model)
    count = replaced = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or hasattr(module, "_hf_hook"):
            continue
        if _is_ours(module):
            count += 1
            continue
        weight = module.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.is_mkldnn:
            continue
        packed = reorder(weight.detach())
        if id(weight) not in shared:
            module._onednn_requires_grad = weight.requires_grad
            module.weight = torch.nn.Parameter(packed, requires_grad=False)
            replaced += 1
        module.forward = _forward(module, op, packed)
        count += 1
    if replaced:
        # safetensors checkpoints are memory-mapped: the file's pages stay in the process until
        # every tensor loaded from it is gone, so the few that remain (the embeddings, norms) get
        # memory of their own, or the replaced weights would stay resident beside their packed
        # copies (SmolLM2: ~1.45 GiB RSS instead of ~1.05).
        for param in model.parameters():
            if param.device.type == "cpu" and not param.is_mkldnn:
                param.data = param.data.clone()
    return count


def restore_linears(model: Any) -> None:
    """Undo ``use_onednn_linears`` (the benchmark's plain-``generate`` baseline runs without it);
    other per-module forwards (accelerate's hooks) stay."""
    for module in model.modules():
        if not _is_ours(module):
            continue
        del module.__dict__["forward"]
        if module.weight.is_mkldnn:
            requires_grad = bool(module.__dict__.pop("_onednn_requires_grad", True))
            module.weight = torch.nn.Parameter(module.weight.to_dense(), requires_grad=requires_grad)
