"""float32 linear layers on the CPU through oneDNN, with weights packed once, instead of MKL.

torch sends a float32 ``F.linear`` on the CPU to MKL's sgemm. For the shapes a decode step has
(a few rows against a large weight) oneDNN's kernel, which torch also ships
(``torch.ops.mkldnn._linear_pointwise``, what ``torch.compile`` uses for CPU linears), was faster
here, and faster again when the weight is reordered once into oneDNN's blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``) instead of on every call: docs/benchmarks-notes.md
has the figures. It computes the same product in float32; results differ from MKL's only by
summation order (~1e-4 on SmolLM2's logits).

Where MKL's kernel is the faster one for a single row (measured on one layer when the model is
packed), the layers move to the plain layout while the engine decodes one or two rows, and back
(``Layouts``).

The packed weight replaces the module's parameter, so memory holds one copy of each matrix; a
weight another module also uses (an output projection tied to the input embeddings) stays as it
is and the layer gets a packed copy. Only exact ``torch.nn.Linear`` modules are touched
(bitsandbytes' layers subclass it and keep their own kernels), only float32 weights on the CPU,
and not modules that accelerate hooked. The packed model is for inference: ``restore_linears``
gives the layers back their plain weights.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

_LAYOUTS = "_onednn_layouts"  # where a packed model keeps its Layouts


def _forward(module: torch.nn.Linear, op: Any, layouts: Layouts,
             copy: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``copy``: the packed copy of a weight that another module shares (the parameter stays plain)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = module.weight
        # oneDNN's op has no backward: an input that needs gradients goes through F.linear.
        if x.requires_grad and torch.is_grad_enabled():
            return torch.nn.functional.linear(x, weight.to_dense() if weight.is_mkldnn else weight, module.bias)
        if weight.is_mkldnn:
            packed = weight
        elif copy is not None and layouts.packed:
            packed = copy
        else:
            return torch.nn.functional.linear(x, weight, module.bias)
        out: torch.Tensor = op(x, packed, module.bias, "none", [], "")
        return out

    forward._onednn = True  # type: ignore[attr-defined]  # what restore_linears may undo
    return forward


class Layouts:
    """Which kernel the packed layers use, by how many rows the engine decodes.

    oneDNN's packed kernel is the faster one from a few rows up, but on some CPUs MKL's is faster
    for one or two rows (an Intel Xeon here: 576->1536 at one row 58 against 84 us; SmolLM2 at one
    user 25.0 against 20.1 tok/s; docs/benchmarks-notes.md). Both layouts at once would cost a
    second copy of every weight, so the weights change layout instead (~0.25 s for all of
    SmolLM2's): once the steps have stayed ``DWELL_S`` on the other side of ``SMALL_ROWS``, a few
    layers per step (as many as fit in ``STEP_BUDGET_S``, at least one), so no step stalls; a
    layer runs in whatever layout it holds. A move waits while the steps are back on the side it
    left, and turns back once they have stayed there ``DWELL_S``. ``small_rows_dense`` is False
    where MKL was not faster for one row when the model was packed; the layout then never changes.
    """

    SMALL_ROWS = 2
    DWELL_S = 0.5
    STEP_BUDGET_S = 0.01

    def __init__(self, owned: list[torch.nn.Linear], *, small_rows_dense: bool) -> None:
        self.owned = owned  # layers whose parameter is the packed weight
        self.small_rows_dense = small_rows_dense
        self.packed = True  # the layout the layers hold, or are moving to
        self._other_side_since: float | None = None
        self._moving: list[torch.nn.Linear] = []

    def fit(self, rows: int) -> None:
        """Called before each decode step with its row count."""
        if not self.small_rows_dense:
            return
        want_packed = rows > self.SMALL_ROWS
        if want_packed != self.packed:
            now, since = time.monotonic(), self._other_side_since
            if since is None:
                self._other_side_since = now
            if since is None or now - since < self.DWELL_S:
                # A move under way waits: these rows want the layers where they were. Going on
                # moved layers that the dwell then moved back (a burst's end finished a move to
                # the packed layout during the next lone request's first second).
                return
            self.packed, self._other_side_since = want_packed, None
            self._moving = [m for m in self.owned if m.weight.is_mkldnn != want_packed]
        else:
            self._other_side_since = None
        if self._moving:
            self._move(self.STEP_BUDGET_S)

    def set_packed(self, packed: bool) -> None:
        """Move every layer to one layout now."""
        self.packed, self._other_side_since = packed, None
        self._moving = [m for m in self.owned if m.weight.is_mkldnn != packed]
        self._move(float("inf"))

    def _move(self, budget_s: float) -> None:
        # Between steps, on the thread that runs the model: nothing reads the weights meanwhile.
        reorder = torch.ops.mkldnn._reorder_linear_weight
        end = time.perf_counter() + budget_s
        with torch.inference_mode(False), torch.no_grad():
            while self._moving:  # at least one layer per step
                module = self._moving.pop()
                weight = module.weight.detach()
                new = reorder(weight) if self.packed else weight.to_dense()
                module.weight = torch.nn.Parameter(new, requires_grad=False)
                if time.perf_counter() >= end:
                    break
        if not self._moving:
            _return_free_memory()
            log.info("linear layers moved to the %s layout", "packed oneDNN" if self.packed else "plain (MKL)")


def _return_free_memory() -> None:
    """Give the old layout's freed pages back to the system. glibc's malloc raises its mmap
    threshold after large frees, so the new copies came from its heap and the old ones stay
    resident once freed (SmolLM2: 1.77 GiB RSS at 32 users after a move, against 1.36)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def layouts_of(model: Any) -> Layouts | None:
    """The ``Layouts`` of a model whose linears ``use_onednn_linears`` packed, else None."""
    layouts: Layouts | None = model.__dict__.get(_LAYOUTS)  # not nn.Module's raising __getattr__
    return layouts


def fit_rows(model: Any, rows: int) -> None:
    """Let the model's packed linears pick their layout for ``rows`` rows (see ``Layouts``)."""
    layouts = layouts_of(model)
    if layouts is not None:
        layouts.fit(rows)


def _dense_faster_for_one_row(weight: torch.Tensor, op: Any, packed: torch.Tensor) -> bool:
    """Time one row through both kernels, alternating, best of five rounds each."""
    x = torch.randn(1, weight.shape[1])
    best = {"dense": float("inf"), "packed": float("inf")}
    with torch.no_grad():
        for _ in range(5):
            for name in best:
                start = time.perf_counter()
                for _ in range(10):
                    if name == "dense":
                        torch.nn.functional.linear(x, weight)
                    else:
                        op(x, packed, None, "none", [], "")
                best[name] = min(best[name], time.perf_counter() - start)
    return best["dense"] < 0.85 * best["packed"]


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
    layouts = layouts_of(model)
    if layouts is None:
        layouts = Layouts([], small_rows_dense=False)
    largest: tuple[torch.nn.Linear, torch.Tensor] | None = None  # (layer, its plain weight)
    for module in model.modules():
        if type(module) is not torch.nn.Linear or hasattr(module, "_hf_hook"):
            continue
        if _is_ours(module):
            count += 1
            continue
        weight = module.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.is_mkldnn:
            continue
        if id(weight) not in shared and (largest is None or weight.numel() > largest[1].numel()):
            largest = (module, weight)  # the layer that calibrates the layers that change layout
        packed = reorder(weight.detach())
        if id(weight) not in shared:
            module._onednn_requires_grad = weight.requires_grad
            module.weight = torch.nn.Parameter(packed, requires_grad=False)
            layouts.owned.append(module)
            replaced += 1
            module.forward = _forward(module, op, layouts, None)
        else:
            module.forward = _forward(module, op, layouts, packed)
        count += 1
    if largest is not None:
        weight = largest[1].detach()
        layouts.small_rows_dense = _dense_faster_for_one_row(weight, op, reorder(weight))
        model.__dict__[_LAYOUTS] = layouts
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
    model.__dict__.pop(_LAYOUTS, None)
    for module in model.modules():
        if not _is_ours(module):
            continue
        del module.__dict__["forward"]
        if "_onednn_requires_grad" in module.__dict__:  # its parameter was ours, in either layout
            requires_grad = bool(module.__dict__.pop("_onednn_requires_grad"))
            weight = module.weight.detach()
            module.weight = torch.nn.Parameter(weight.to_dense() if weight.is_mkldnn else weight,
                                               requires_grad=requires_grad)
