"""``apply_lean``: put the lean ops into an existing model, with outputs and gradients unchanged.

Recognised modules (anything else is left alone):

========================  =====================================================  ==========
option                    module                                                 becomes
========================  =====================================================  ==========
``norms``                 this project's ``RMSNorm``                             ``lean=True``
``norms``                 transformers ``LlamaRMSNorm``/``MistralRMSNorm``/       :class:`LeanRMSNorm`
                          ``Qwen2RMSNorm``
``norms``                 ``nn.LayerNorm`` (BERT, RoBERTa, GPT-2, ...)            :class:`LeanLayerNorm`
``mlp``                   this project's ``LlamaMLP``                            ``lean=True``
``mlp``                   transformers ``LlamaMLP``/``MistralMLP``/``Qwen2MLP``   :class:`LeanSwiGLUMLP`
                          with a SiLU activation
``mlp``                   ``nn.GELU``; transformers ``GELUActivation`` (BERT,      :class:`LeanGELU`
                          RoBERTa), ``NewGELUActivation`` (GPT-2's gelu_new),
                          ``GELUTanh``, ``FastGELUActivation``
``loss``                  this project's ``LlamaForCausalLM``                    ``lean_loss=True``
``loss``                  transformers ``LlamaForCausalLM``/``MistralForCausalLM``  lean ``forward``
                          /``Qwen2ForCausalLM``/``GPT2LMHeadModel``
========================  =====================================================  ==========

Swapped modules take over the original Parameters, so optimizers, ``state_dict`` keys
and CompAct's conversion of the linears (before or after) are unaffected.

**The loss.** A causal LM's training forward (``labels`` given, gradients on) then
computes the loss from the last hidden states with
:func:`~lightning_compact.lean.cross_entropy.causal_lm_loss`, never building the
``[tokens, vocab]`` logits; such a forward returns the loss and **no logits**
(``logits=None`` for transformers models). Forwards without labels, or under
``no_grad`` (validation), are unchanged. The head must be a plain ``nn.Linear``
(a head converted by CompAct keeps the plain path).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compact.lean.activations import LeanGELU, LeanSwiGLUMLP
from lightning_compact.lean.cross_entropy import causal_lm_loss
from lightning_compact.lean.norms import LeanLayerNorm, LeanRMSNorm

__all__ = ["LeanReport", "LeanSwap", "apply_lean"]

_HF_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"})
_HF_SWIGLU_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP"})
_HF_CAUSAL_LMS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel"})
_HF_GELUS = {"GELUActivation": "none", "NewGELUActivation": "tanh", "GELUTanh": "tanh", "FastGELUActivation": "tanh"}


@dataclasses.dataclass(frozen=True)
class LeanSwap:
    """One module handled by :func:`apply_lean`: ``op`` is the lean op, or ``None`` when skipped (see ``reason``)."""

    name: str
    module: str
    op: str | None
    reason: str = ""


@dataclasses.dataclass
class LeanReport:
    """What :func:`apply_lean` swapped and what it recognised but left alone."""

    entries: list[LeanSwap] = dataclasses.field(default_factory=list)

    @property
    def swapped(self) -> list[LeanSwap]:
        return [e for e in self.entries if e.op is not None]

    @property
    def skipped(self) -> list[LeanSwap]:
        return [e for e in self.entries if e.op is None]

    def counts(self) -> dict[tuple[str, str], int]:
        """``(module class, lean op) -> count`` of the swaps."""
        out: dict[tuple[str, str], int] = {}
        for e in self.swapped:
            out[(e.module, e.op)] = out.get((e.module, e.op), 0) + 1
        return out

    def table(self) -> str:
        rows = [(f"{n}x {cls}", op) for (cls, op), n in self.counts().items()]
        rows += [(f"{e.name} ({e.module})", f"skipped: {e.reason}") for e in self.skipped]
        if not rows:
            return "LeanActivations: no recognised module."
        width = max(len(r[0]) for r in rows)
        return "\n".join(["Lean activations:"] + [f"  {a.ljust(width)}  ->  {b}" for a, b in rows])


def _is_ours(module: nn.Module, name: str) -> bool:
    return type(module).__name__ == name and type(module).__module__ == "lightning_compact.models.llama"


def _is_hf(module: nn.Module, names: frozenset[str] | dict[str, str]) -> bool:
    return type(module).__name__ in names and type(module).__module__.startswith("transformers.")


def _is_silu(act: Any) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation" or act is F.silu


def _gelu_approximate(module: nn.Module) -> str | None:
    if type(module) is nn.GELU:
        return module.approximate
    if _is_hf(module, _HF_GELUS):
        return _HF_GELUS[type(module).__name__]
    return None


class _LeanCausalLMForward:
    """Instance ``forward`` of a transformers causal LM: the training loss from hidden states."""

    def __init__(self, model: nn.Module, chunk_size: int | None) -> None:
        self.model, self.chunk_size = model, chunk_size

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        labels = kwargs.get("labels")
        if args or labels is None or not torch.is_grad_enabled() or kwargs.get("return_dict") is False:
            return type(model).forward(model, *args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("labels")
        kwargs.pop("logits_to_keep", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        outputs = model.base_model(**kwargs)
        head = model.get_output_embeddings()
        loss = causal_lm_loss(
            outputs[0], head.weight, labels, bias=head.bias, num_items_in_batch=num_items, chunk_size=self.chunk_size
        )
        return CausalLMOutputWithPast(
            loss=loss, logits=None, hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )


def _loss_skip_reason(model: nn.Module, head: nn.Module | None) -> str:
    if type(head) is not nn.Linear:
        return f"lm_head is a {type(head).__name__}, not a plain nn.Linear"
    config = getattr(model, "config", None)
    for field in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, field, None) not in (None, 1.0):
            return f"config.{field} is set"
    return ""


def apply_lean(
    model: nn.Module,
    *,
    norms: bool = True,
    mlp: bool = True,
    loss: bool = True,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
    chunk_size: int | None = None,
    report: LeanReport | None = None,
) -> nn.Module:
    """Swap the recognised norms, MLP activations and causal-LM losses of ``model`` for lean ones.

    In place (torchao style: the model is also returned). Outputs and gradients are
    those of the unswapped model up to float rounding; fewer activations are saved for
    backward and no matmul is recomputed. Applying twice changes nothing.

    Args:
        model: any module; recognised submodules (table in this module's docstring) are swapped.
        norms: RMSNorm and LayerNorm that save only their input.
        mlp: SwiGLU MLPs and GELU activations that save only their inputs.
        loss: causal LMs compute the training loss in chunks, without the full logits.
        module_filter_fn: ``(module, fully qualified name) -> bool``; only modules for
            which it returns True are swapped.
        chunk_size: tokens per chunk of the loss (default: logits about the size of the hidden states).
        report: filled with what was swapped and what was recognised but skipped.

    Returns:
        ``model`` (or its replacement, when ``model`` itself is a swapped module).
    """
    report = report if report is not None else LeanReport()
    replacements: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if module_filter_fn is not None and not module_filter_fn(module, name):
            continue
        cls = type(module).__name__
        if norms and _is_ours(module, "RMSNorm"):
            if not module.lean:
                module.lean = True
                report.entries.append(LeanSwap(name, cls, "rms_norm"))
        elif norms and _is_hf(module, _HF_RMS_NORMS):
            replacements.append((name, LeanRMSNorm.from_module(module)))
            report.entries.append(LeanSwap(name, cls, "rms_norm"))
        elif norms and type(module) is nn.LayerNorm:
            replacements.append((name, LeanLayerNorm.from_module(module)))
            report.entries.append(LeanSwap(name, cls, "layer_norm"))
        elif mlp and _is_ours(module, "LlamaMLP"):
            if not module.lean:
                module.lean = True
                report.entries.append(LeanSwap(name, cls, "swiglu"))
        elif mlp and _is_hf(module, _HF_SWIGLU_MLPS):
            if _is_silu(getattr(module, "act_fn", None)):
                replacements.append((name, LeanSwiGLUMLP.from_module(module)))
                report.entries.append(LeanSwap(name, cls, "swiglu"))
            else:
                report.entries.append(LeanSwap(name, cls, None, f"activation {type(module.act_fn).__name__} is not SiLU"))
        elif mlp and (approximate := _gelu_approximate(module)) is not None:
            replacements.append((name, LeanGELU(approximate)))
            report.entries.append(LeanSwap(name, cls, f"gelu({approximate})"))
        elif loss and _is_ours(module, "LlamaForCausalLM"):
            reason = _loss_skip_reason(module, module.lm_head)
            if reason:
                report.entries.append(LeanSwap(name, cls, None, reason))
            elif not module.lean_loss:
                module.lean_loss = True
                report.entries.append(LeanSwap(name, cls, "chunked_linear_cross_entropy"))
        elif loss and _is_hf(module, _HF_CAUSAL_LMS):
            reason = _loss_skip_reason(module, module.get_output_embeddings())
            if reason:
                report.entries.append(LeanSwap(name, cls, None, reason))
            elif not isinstance(module.__dict__.get("forward"), _LeanCausalLMForward):
                module.forward = _LeanCausalLMForward(module, chunk_size)
                report.entries.append(LeanSwap(name, cls, "chunked_linear_cross_entropy"))
    for name, new in replacements:
        if not name:
            model = new
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return model
