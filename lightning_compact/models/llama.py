"""A LLaMA-style decoder (RMSNorm, rotary embeddings, SwiGLU, SDPA) with the paper's sizes.

The presets are the GaLore/CompAct pretraining shapes (``llama_60m`` ... ``llama_1b``) and ``llama_7b``.
Linear layers are plain ``nn.Linear`` named like Hugging Face's LLaMA (``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``,
``lm_head``) so CompAct's default filters treat both the same way.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compact.lean.activations import swiglu
from lightning_compact.lean.cross_entropy import causal_lm_loss
from lightning_compact.lean.norms import rms_norm

__all__ = ["LlamaConfig", "LlamaForCausalLM", "LLAMA_PRESETS"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    # Memory-lean RMSNorm, SwiGLU and chunked lm_head + loss (lightning_compact.lean):
    # same outputs and gradients, fewer saved activations, no matmul recomputed.
    lean: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# GaLore's llama_{60m,130m,350m,1b}.json, the configurations the CompAct paper pretrained.
LLAMA_PRESETS: dict[str, LlamaConfig] = {
    "llama_60m": LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
    "llama_130m": LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    "llama_350m": LlamaConfig(hidden_size=1024, intermediate_size=2736, num_hidden_layers=24, num_attention_heads=16),
    "llama_1b": LlamaConfig(hidden_size=2048, intermediate_size=5461, num_hidden_layers=24, num_attention_heads=32),
    # LLaMA-7B (Touvron et al. 2023), for sharded runs (recipes/pretrain/llama_7b_c4_fsdp.yaml).
    "llama_7b": LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048
    ),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, lean: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.lean = lean

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean:
            return rms_norm(x, self.weight, self.eps)
        # Statistics in fp32 for stability, as Hugging Face's LlamaRMSNorm does.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        # Non-persistent: recomputable, keeps state_dict identical to the HF layout.
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)
        self.max_positions = max_positions

    def _inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.theta ** exponents)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Recompute the table (after ``to_empty`` of a model built on ``meta``)."""
        self.inv_freq.copy_(self._inv_freq(self.inv_freq.device))

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        d, self.n_heads, self.head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        shape = (b, t, self.n_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.lean = config.lean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean:
            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.lean)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.lean)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.lean)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(input_ids.shape[1], x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Decoder with an output head; ``forward(input_ids, labels=None)`` returns logits or the loss."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Loss from the hidden states in chunks (no [tokens, vocab] logits); see forward.
        self.lean_loss = config.lean
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, seed: int | None = None) -> None:
        """Initialize every parameter: N(0, std²) matrices (``std/√(2L)`` for ``o_proj`` and ``down_proj``), unit norms.

        Args:
            std: the matrices' standard deviation.
            seed: ``None`` draws from torch's global generator (what the constructor does);
                an int draws each parameter by name with
                :func:`~lightning_compact.meta_init.keyed_normal_`, so that a model
                materialized shard by shard under FSDP2 gets exactly the values a single
                process gets with the same seed.
        """
        for module in self.modules():
            if isinstance(module, (RMSNorm, RotaryEmbedding)):
                module.reset_parameters()
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        if seed is not None:
            from lightning_compact.meta_init import keyed_normal_

            residual = {id(p) for layer in self.model.layers
                        for p in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight)}
            for name, p in self.named_parameters():
                if p.ndim >= 2 and not name.endswith("weight_delta"):
                    keyed_normal_(p, std=residual_std if id(p) in residual else std, seed=seed, key=name)
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
        # Scaled init of the residual projections (GPT-2 style) keeps deep stacks stable.
        for layer in self.model.layers:
            nn.init.normal_(layer.self_attn.o_proj.weight, std=residual_std)
            nn.init.normal_(layer.mlp.down_proj.weight, std=residual_std)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.model(input_ids)
        # Only a plain head: a converted one (e.g. CompActLinear) must run its own forward.
        if labels is not None and self.lean_loss and type(self.lm_head) is nn.Linear:
            return causal_lm_loss(hidden, self.lm_head.weight, labels)
        logits = self.lm_head(hidden)
        if labels is None:
            return logits
        # Next-token prediction: position t predicts labels[t + 1]; -100 is ignored.
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)).float(),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
        )
