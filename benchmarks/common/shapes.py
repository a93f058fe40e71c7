"""The CPU benchmark shapes: this project's LLaMA, batch and sequence length, one place for all scripts."""

from __future__ import annotations

from lightning_compact.models.llama import LlamaConfig

# name: (model, batch, seq)
CPU_SHAPES: dict[str, tuple[LlamaConfig, int, int]] = {
    # d=256, 4 layers, vocab 8000, 8 x 128 (activation_memory.py calls it "small").
    "tiny": (LlamaConfig(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4), 8, 128),
    "small": (LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8), 8, 256),
    # The paper's LLaMA at a width two CPU cores can train: d=512, 8 layers, vocab 32000, 8 x 256.
    "paper-cpu": (LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8), 8, 256),
}
