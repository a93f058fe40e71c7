"""The paper's Table 1, evaluated on a converted model: what CompAct should save, by category.

For a converted weight ``W`` (``nn.Linear`` layout ``[m, n]``, rank ``r``) and ``b·l``
tokens, Table 1 of the paper gives:

============================  ==========  ==========
                              original    CompAct
============================  ==========  ==========
gradients                     m·n         m·r
optimizer states (Adam)       2·m·n       2·m·r
linear-input activations      b·l·n       b·l·r
============================  ==========  ==========

The gradient and optimizer rows apply only when the gradient stays compressed (the
paper's full method, ``grad_mode="compressed"``); with gradient decompression ``.grad`` and
Adam's moments stay ``m·n``. Layers that read the same input (q, k and v; gate and up)
share one saved ``x`` in the original model, so ``b·l·n`` is counted once per distinct
input, while each CompAct layer stores its own ``x·P`` (``b·l·r`` each). Under autocast
an input in a wider dtype than autocast's is cast anew by every layer and each plain
layer saves its own cast, so such an input counts once per layer (with ``bf16-mixed``
LLaMA's float32 residual stream makes q, k, v and gate, up save one copy each). A layer
whose input is kept by attention for its own backward (an SDPA kernel's output: ``o_proj``)
saves that input instead of ``x·P`` and is left out of the activation row.

:class:`LinearInputRecorder` watches one forward to learn which converted layers share
an input; :func:`table1` turns that into bytes.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch
from torch import nn

from lightning_compact.functional import input_kept_elsewhere
from lightning_compact.layers import CompActLinear

__all__ = ["LinearInputRecorder", "Table1", "table1"]


@dataclasses.dataclass(frozen=True)
class Table1:
    """Bytes of the converted layers' gradients, Adam moments and inputs: ``(original, CompAct)`` each.

    Layers not converted are not included (they are the same in both).
    """

    gradients: tuple[int, int]
    optimizer_states: tuple[int, int]
    activations: tuple[int, int]

    def savings(self) -> dict[str, int]:
        """Bytes saved per category (original minus CompAct)."""
        return {
            name: before - after
            for name, (before, after) in (
                ("gradients", self.gradients),
                ("optimizer_states", self.optimizer_states),
                ("activations", self.activations),
            )
        }


class LinearInputRecorder:
    """Context manager noting, for one forward, the input of every training ``CompActLinear``.

    Inputs are grouped by storage, so layers reading one tensor (q/k/v) form one group.

    Args:
        model: the converted model.
    """

    def __init__(self, model: nn.Module) -> None:
        self._layers = [m for m in model.modules() if isinstance(m, CompActLinear)]
        self._handles: list[Any] = []
        # One (b·l·n elements, element size) per distinct input storage.
        self.inputs: list[tuple[int, int]] = []
        # storage id -> (weak reference, index into inputs). Weak: holding the storage would
        # keep the input alive, which is exactly what CompAct frees. A dead reference means
        # the id was reused by a new storage.
        self._seen: dict[int, tuple[weakref.ref, int]] = {}
        # One (b·l·r elements, element size) per layer call.
        self.compressed: list[tuple[int, int]] = []

    def _hook(self, module: CompActLinear, args: tuple[Any, ...]) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        x = args[0]
        if input_kept_elsewhere(x):
            return  # the layer saves what attention keeps anyway: no input of its own, before or after
        storage = x.untyped_storage()
        size = x.element_size()
        device_type = x.device.type
        cast = torch.is_autocast_enabled(device_type) and x.dtype != torch.get_autocast_dtype(device_type)
        if cast:
            size = torch.finfo(torch.get_autocast_dtype(device_type)).bits // 8
        self.compressed.append((x.numel() // module.in_features * module.rank, size))
        if cast:
            # Autocast casts the input anew for every layer (it caches only weight casts), and
            # a plain nn.Linear saves its own cast: layers sharing a float32 input under
            # bf16-mixed save one copy each.
            self.inputs.append((x.numel(), size))
            return
        ref, _ = self._seen.get(id(storage), (None, None))
        if ref is None or ref() is not storage:
            self._seen[id(storage)] = (weakref.ref(storage), len(self.inputs))
            self.inputs.append((x.numel(), size))

    def __enter__(self) -> LinearInputRecorder:
        self._handles = [layer.register_forward_pre_hook(self._hook) for layer in self._layers]
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def activation_bytes(self) -> tuple[int, int]:
        """``(Σ over distinct inputs b·l·n, Σ over calls b·l·r)`` in bytes."""
        before = sum(numel * size for numel, size in self.inputs)
        after = sum(numel * size for numel, size in self.compressed)
        return before, after


def table1(model: nn.Module, recorder: LinearInputRecorder | None = None, *, state_dtype: torch.dtype | None = None) -> Table1:
    """Table 1 for ``model``'s ``CompActLinear`` layers.

    Args:
        model: the converted model.
        recorder: a recorder that watched one training forward (for the activation row;
            without one it is ``(0, 0)``).
        state_dtype: dtype of the Adam moments (default: each weight's own dtype, as
            torch's AdamW and ``CompActAdamW`` keep them).
    """
    grads = [0, 0]
    states = [0, 0]
    for layer in model.modules():
        if not isinstance(layer, CompActLinear):
            continue
        m, n, r = layer.out_features, layer.in_features, layer.rank
        kept = r if layer.grad_mode == "compressed" else n
        grad_size = layer.weight.element_size()
        state_size = torch.finfo(state_dtype).bits // 8 if state_dtype is not None else grad_size
        grads[0] += m * n * grad_size
        grads[1] += m * kept * grad_size
        states[0] += 2 * m * n * state_size
        states[1] += 2 * m * kept * state_size
    acts = recorder.activation_bytes() if recorder is not None else (0, 0)
    return Table1(gradients=tuple(grads), optimizer_states=tuple(states), activations=acts)
