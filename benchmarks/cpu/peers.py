"""CompAct beside the optimizers users would pick instead, each at its own best learning rate.

Issue 20's benchmark: this project's LLaMA (d=256, 4 layers, SwiGLU 688, 4 heads, byte
vocabulary) on KJV bytes through :class:`~lightning_compact.data.PretrainDataModule`,
``--steps`` (300) steps of 8 x 128, fp32, CPU, linear warm-up (30 steps) then cosine to
0.1x, weight decay 0 for every method. For one seed every method gets the same
initialisation, the same batches and the same validation blocks (the seed also picks
CompAct's projections). Rows (:data:`METHODS`): AdamW, CompAct (the paper's Gaussian n/4
and n/8, orthogonal, lean activations, and the update rules / projections beyond the
paper where this checkout has them), GaLore (galore-torch), APOLLO and APOLLO-Mini
(apollo-torch). A row whose option or library is missing is skipped with the reason.

Protocol: a learning-rate sweep on seed 0 (``--lrs``; extended by x2 past either end
while the best value is at that end, ``--max-extend`` times), then ``--seeds`` at each
method's best lr. One JSON per run under ``<out>/runs/`` (``--resume`` skips those on
disk). Memory (weights, grads, optimizer state incl. projector matrices and r-space
moments, CompAct's projection cache, saved activations) and step time (interleaved,
paired ratio to AdamW) are measured side by side in the main process
(``<out>/measure.json``). Then ``<out>/peers.json``, ``<out>/table.md`` and
``<out>/peers.png`` (final validation loss against total memory).

    python benchmarks/cpu/peers.py --jobs 2 --resume                 # the full benchmark
    python benchmarks/cpu/peers.py --quick --out /tmp/peers_quick    # CI smoke (minutes)
    python benchmarks/cpu/peers.py --methods adamw,compact_n4 --lrs 2e-3,4e-3 --seeds 0 --steps 100
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from torch import nn

# The shared helpers (provenance, timing, shapes) are in benchmarks/common/, not beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "peers"


@dataclasses.dataclass(frozen=True)
class Settings:
    """The run's shape (the same for every method)."""

    steps: int = 300
    batch_size: int = 8
    seq_len: int = 128
    warmup: int = 30
    min_lr_ratio: float = 0.1
    val_every: int = 50
    val_blocks: int = 64
    hidden: int = 256
    layers: int = 4
    intermediate: int = 688
    heads: int = 4

    @property
    def tag(self) -> str:
        return (f"s{self.steps}_b{self.batch_size}_l{self.seq_len}_w{self.warmup}_d{self.hidden}x{self.layers}"
                f"_f{self.intermediate}_v{self.val_blocks}")


QUICK = Settings(steps=12, batch_size=4, seq_len=64, warmup=3, val_every=6, val_blocks=8, hidden=64, layers=2, intermediate=160, heads=4)


@dataclasses.dataclass(frozen=True)
class Method:
    """One row: ``kind`` picks the builder, ``options`` its arguments."""

    label: str
    kind: str  # "adamw" | "compact" | "galore" | "apollo"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    lean: bool = False


# GaLore's pretraining recipe (rank scaled with the model: n/4), APOLLO's and APOLLO-Mini's
# recommended settings (its scripts/pretrain_c4: random projection, T=200, scale 1 / 128).
GALORE = dict(rank_fraction=0.25, update_proj_gap=200, scale=0.25, proj_type="std")
APOLLO = dict(rank_fraction=0.25, proj="random", scale_type="channel", scale=1.0, update_proj_gap=200, proj_type="std")
APOLLO_MINI = dict(rank=1, proj="random", scale_type="tensor", scale=128.0, update_proj_gap=200, proj_type="std")
# The paper's CompAct: Gaussian P, compressed gradients, CompActAdamW with its update rule, o_proj
# exact, T=50, alpha=1 (an AdamW learning rate keeps its meaning). Spelled out: since 0.3 the
# package's defaults are the channel rule with attention outputs converted (DEFAULTS below).
PAPER = dict(grad_mode="compressed", update_proj_gap=50, update_rule="adam", exclude_modules=["o_proj"])
# The package's defaults (0.3): nothing but the rank and the benchmark's T.
DEFAULTS = dict(grad_mode="compressed", update_proj_gap=50)

METHODS: dict[str, Method] = {m.label: m for m in [
    Method("adamw", "adamw"),
    Method("compact_n4_default", "compact", dict(DEFAULTS, rank=0.25)),
    Method("compact_n8_default", "compact", dict(DEFAULTS, rank=0.125)),
    Method("compact_n4", "compact", dict(PAPER, rank=0.25)),
    Method("compact_n8", "compact", dict(PAPER, rank=0.125)),
    Method("compact_n4_orth", "compact", dict(PAPER, rank=0.25, projection="orthogonal")),
    Method("compact_n4_lean", "compact", dict(PAPER, rank=0.25), lean=True),
    Method("galore_n4", "galore", GALORE),
    Method("apollo_n4", "apollo", APOLLO),
    Method("apollo_mini", "apollo", APOLLO_MINI),
    # Beyond the paper (issue 20): APOLLO-style update rules in r-space and PRAC projections.
    Method("compact_n4_channel", "compact", dict(PAPER, rank=0.25, update_rule="channel")),
    Method("compact_n4_tensor", "compact", dict(PAPER, rank=0.25, update_rule="tensor")),
    Method("compact_n4_principal", "compact", dict(PAPER, rank=0.25, projection="principal")),
    Method("compact_n8_channel", "compact", dict(PAPER, rank=0.125, update_rule="channel")),
    Method("compact_n4_principal_channel", "compact", dict(PAPER, rank=0.25, projection="principal", update_rule="channel")),
    # The paper's alpha (0.25 for pretraining, at lr 1e-2): compressed weights step at a quarter of the lr
    # that embeddings, lm_head, norms and o_proj get, as GaLore's scale 0.25 does for its projected weights.
    Method("compact_n4_a25", "compact", dict(PAPER, rank=0.25, scale=0.25)),
    Method("compact_n8_a25", "compact", dict(PAPER, rank=0.125, scale=0.25)),
    Method("compact_n4_channel_a25", "compact", dict(PAPER, rank=0.25, scale=0.25, update_rule="channel")),
    Method("compact_n4_principal_a25", "compact", dict(PAPER, rank=0.25, scale=0.25, projection="principal")),
    Method("compact_n4_principal_channel_a25", "compact", dict(PAPER, rank=0.25, scale=0.25, projection="principal", update_rule="channel")),
    # P = U_r: every column from the input's top directions (principal_rank=1.0), no random part (biased).
    Method("compact_n4_principal_full", "compact", dict(PAPER, rank=0.25, projection="principal", principal_rank=1.0)),
    Method("compact_n4_principal_full_channel", "compact",
           dict(PAPER, rank=0.25, projection="principal", principal_rank=1.0, update_rule="channel")),
    Method("compact_n8_principal_full", "compact", dict(PAPER, rank=0.125, projection="principal", principal_rank=1.0)),
    # The paper's recipe in the form its code has it: attention and MLP weights at a quarter of the lr the
    # embeddings, head and norms get (alpha = 0.25 on the compressed layers, o_proj scaled alike), as the
    # projected peers' scales do; the user's own param groups, CompActAdamW's scale left at 1.
    Method("compact_n4_split", "compact", dict(PAPER, rank=0.25, linear_lr_scale=0.25)),
    Method("compact_n4_channel_split", "compact", dict(PAPER, rank=0.25, update_rule="channel", linear_lr_scale=0.25)),
    Method("compact_n4_principal_full_split", "compact",
           dict(PAPER, rank=0.25, projection="principal", principal_rank=1.0, linear_lr_scale=0.25)),
    Method("compact_n4_principal_full_channel_split", "compact",
           dict(PAPER, rank=0.25, projection="principal", principal_rank=1.0, update_rule="channel",
                linear_lr_scale=0.25)),
    # Which of APOLLO's differences from compact_n4_channel_split matter: a principal (low-variance) P, the
    # attention output converted too (APOLLO projects it), APOLLO's window T = 200, a fresh P every step, and
    # r = 0.9 n with an orthogonal P (a near-exact gradient: the estimator's variance taken away).
    Method("compact_n4_principal_channel_split", "compact",
           dict(PAPER, rank=0.25, projection="principal", update_rule="channel", linear_lr_scale=0.25)),
    Method("compact_n4_channel_split_all", "compact",
           dict(PAPER, rank=0.25, update_rule="channel", linear_lr_scale=0.25, default_exclusions=False,
                exclude_modules=["lm_head"])),
    Method("compact_n4_split_all", "compact",
           dict(PAPER, rank=0.25, linear_lr_scale=0.25, default_exclusions=False, exclude_modules=["lm_head"])),
    Method("compact_n4_channel_all", "compact",
           dict(PAPER, rank=0.25, update_rule="channel", default_exclusions=False, exclude_modules=["lm_head"])),
    Method("compact_n8_channel_split_all", "compact",
           dict(PAPER, rank=0.125, update_rule="channel", linear_lr_scale=0.25, default_exclusions=False,
                exclude_modules=["lm_head"])),
    # The same through CompAct's own options: alpha = 0.25 (the paper's, for pretraining) now reaches every
    # attention and MLP weight because the attention output is converted too: the split without param groups.
    Method("compact_n4_channel_a25_all", "compact",
           dict(PAPER, rank=0.25, update_rule="channel", scale=0.25, default_exclusions=False, exclude_modules=["lm_head"])),
    Method("compact_n8_channel_a25_all", "compact",
           dict(PAPER, rank=0.125, update_rule="channel", scale=0.25, default_exclusions=False, exclude_modules=["lm_head"])),
    Method("compact_n4_channel_a25_all_t200", "compact",
           dict(PAPER, rank=0.25, update_rule="channel", scale=0.25, default_exclusions=False, exclude_modules=["lm_head"],
                update_proj_gap=200)),
    Method("compact_n8_channel_all", "compact",
           dict(PAPER, rank=0.125, update_rule="channel", default_exclusions=False, exclude_modules=["lm_head"])),
    Method("compact_n4_channel_split_t200", "compact",
           dict(PAPER, rank=0.25, update_rule="channel", linear_lr_scale=0.25, update_proj_gap=200)),
    Method("compact_n4_channel_split_t1", "compact",
           dict(PAPER, rank=0.25, update_rule="channel", linear_lr_scale=0.25, update_proj_gap=1)),
    Method("compact_n90_orth_channel_split", "compact",
           dict(PAPER, rank=0.9, projection="orthogonal", update_rule="channel", linear_lr_scale=0.25)),
    # A control, not a peer: AdamW with the same split (attention and MLP weights at lr x 0.25), to read how
    # much of the projected methods' lead is the split itself.
    Method("adamw_split", "adamw", dict(linear_lr_scale=0.25)),
]}
DEFAULT_LRS = (4e-3, 2e-3, 8e-3, 1e-3)  # run in this order; the middle of the range first


def skip_reason(method: Method) -> str | None:
    """Why this checkout cannot run ``method`` (``None``: it can)."""
    if method.kind == "galore":
        try:
            import galore_torch  # noqa: F401
        except Exception as err:  # ImportError, or bitsandbytes failing inside its import
            return f"galore-torch does not import ({type(err).__name__}); pip install 'lightning-compact[bench]'"
    if method.kind == "apollo":
        try:
            import apollo_torch  # noqa: F401
        except Exception as err:
            return f"apollo-torch does not import ({type(err).__name__}); pip install 'lightning-compact[bench]'"
    if method.kind == "compact":
        from lightning_compact import CompAct
        from lightning_compact.projection import PROJECTIONS

        accepted = inspect.signature(CompAct).parameters
        for key in (k for k in method.options if k != "linear_lr_scale"):
            if key not in accepted:
                return f"CompAct has no {key!r} argument in this checkout"
        if method.options.get("projection", "gaussian") not in PROJECTIONS:
            return f"projection {method.options['projection']!r} is not in PROJECTIONS {PROJECTIONS}"
        rule = method.options.get("update_rule")
        if rule is not None:
            from lightning_compact import optim

            rules = getattr(optim, "UPDATE_RULES", ())
            if rule not in rules:
                return f"update_rule {rule!r} is not in optim.UPDATE_RULES {rules}"
    return None


# -- data ------------------------------------------------------------------------------


def load_blocks(s: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """(train blocks, validation blocks) of KJV bytes, ``[N, seq_len]`` int64."""
    from lightning_compact.data import PretrainDataModule

    dm = PretrainDataModule(dataset="kjv", tokenizer="byte", seq_len=s.seq_len, batch_size=s.batch_size,
                            val_fraction=0.02, max_val_blocks=s.val_blocks, seed=0)
    dm.setup("fit")
    return dm.train_data[:]["input_ids"].long(), dm.val_data[:]["input_ids"].long()


def batch_order(n_blocks: int, s: Settings, seed: int) -> torch.Tensor:
    """The seed's batches: ``[steps, batch_size]`` block indices (the same for every method)."""
    g = torch.Generator().manual_seed(1000 + seed)
    need = s.steps * s.batch_size
    perms = [torch.randperm(n_blocks, generator=g) for _ in range(-(-need // n_blocks))]
    return torch.cat(perms)[:need].view(s.steps, s.batch_size)


# -- building a method -----------------------------------------------------------------


@dataclasses.dataclass
class Run:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    compact: Any = None

    def step(self, batch: torch.Tensor, step: int) -> torch.Tensor:
        if self.compact is not None:
            self.compact.step(step)
        loss = self.model(batch, labels=batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def _config(s: Settings):
    from lightning_compact.models.llama import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                       num_attention_heads=s.heads, max_position_embeddings=s.seq_len)


def _attn_mlp_weights(model: nn.Module) -> list[nn.Parameter]:
    # As GaLore's and APOLLO's pretraining scripts: every linear inside attention and MLP blocks.
    return [m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear) and (".self_attn." in name or ".mlp." in name)]


def build(method: Method, s: Settings, seed: int, lr: float) -> Run:
    """``method``'s model (initialised from ``seed``, identically for every method) and optimizer."""
    from lightning_compact.models.llama import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(s))
    model.train()
    if method.lean:
        from lightning_compact.lean import apply_lean

        apply_lean(model)
    kw = dict(lr=lr, weight_decay=0.0)
    options = dict(method.options)
    split = options.pop("linear_lr_scale", None)

    def param_groups() -> Any:
        # With a split: attention and MLP weights (GaLore's and APOLLO's projected set) at lr x split.
        if split is None:
            return model.parameters()
        linear = {id(p) for p in _attn_mlp_weights(model)}
        return [{"params": [p for p in model.parameters() if id(p) not in linear]},
                {"params": [p for p in model.parameters() if id(p) in linear], "lr": lr * split}]

    if method.kind == "adamw":
        return Run(model, torch.optim.AdamW(param_groups(), **kw))
    if method.kind == "compact":
        from lightning_compact import CompAct

        compact = CompAct(seed=seed, **options)
        compact.convert(model)  # same Parameters: the groups made after it hold the converted weights
        optimizer = compact.optimizer(torch.optim.AdamW(param_groups(), **kw))
        return Run(model, optimizer, compact)
    projected = _attn_mlp_weights(model)
    ids = {id(p) for p in projected}
    regular = [p for p in model.parameters() if id(p) not in ids]
    opts = dict(method.options)
    rank = opts.pop("rank", None) or max(1, int(s.hidden * opts.pop("rank_fraction")))
    opts.pop("rank_fraction", None)
    groups = [{"params": regular}, {"params": projected, "rank": rank, **opts}]
    if method.kind == "galore":
        from galore_torch import GaLoreAdamW

        return Run(model, GaLoreAdamW(groups, **kw))
    if method.kind == "apollo":
        from apollo_torch import APOLLOAdamW

        return Run(model, APOLLOAdamW(groups, **kw))
    raise ValueError(f"unknown kind {method.kind!r}")


def lr_schedule(run: Run, s: Settings) -> torch.optim.lr_scheduler.LambdaLR:
    from lightning_compact.models.schedule import lr_lambda

    return torch.optim.lr_scheduler.LambdaLR(run.optimizer, lr_lambda(s.steps, s.warmup, s.min_lr_ratio, "cosine"))


@torch.no_grad()
def val_loss(model: nn.Module, val: torch.Tensor, batch_size: int) -> float:
    model.eval()
    losses = [float(model(val[i:i + batch_size], labels=val[i:i + batch_size])) * len(val[i:i + batch_size])
              for i in range(0, len(val), batch_size)]
    model.train()
    return sum(losses) / len(val)


# -- one training run ------------------------------------------------------------------


def train(method: Method, seed: int, lr: float, s: Settings, data: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """Train ``method`` for ``s.steps`` steps; its validation curve, final and best loss."""
    train_blocks, val = data if data is not None else load_blocks(s)
    order = batch_order(len(train_blocks), s, seed)
    run = build(method, s, seed, lr)
    scheduler = lr_schedule(run, s)
    curve: list[tuple[int, float]] = []
    train_curve: list[tuple[int, float]] = []
    start = time.perf_counter()
    diverged = False
    for step in range(s.steps):
        loss = float(run.step(train_blocks[order[step]], step))
        scheduler.step()
        if step % max(1, s.steps // 60) == 0:
            train_curve.append((step, loss))
        if not math.isfinite(loss):
            diverged = True
            break
        if (step + 1) % s.val_every == 0 or step + 1 == s.steps:
            curve.append((step + 1, val_loss(run.model, val, s.batch_size)))
    seconds = time.perf_counter() - start
    final = curve[-1][1] if curve and not diverged and curve[-1][0] == s.steps else float("inf")
    finite = [v for _, v in curve if math.isfinite(v)]
    return {
        "method": method.label, "seed": seed, "lr": lr, "settings": dataclasses.asdict(s), "val_curve": curve,
        "train_curve": train_curve, "val_loss": final, "best_val_loss": min(finite) if finite else float("inf"),
        "diverged": diverged or not math.isfinite(final), "train_seconds": seconds, "threads": torch.get_num_threads(),
    }


def run_path(out: Path, s: Settings, label: str, seed: int, lr: float) -> Path:
    return out / "runs" / s.tag / f"{label}_seed{seed}_lr{lr:g}.json"


_DATA: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _worker(job: tuple[str, int, float, Settings, str]) -> str:
    label, seed, lr, s, path = job
    torch.set_num_threads(1)  # two workers share two cores
    if s.tag not in _DATA:
        _DATA[s.tag] = load_blocks(s)
    result = train(METHODS[label], seed, lr, s, _DATA[s.tag])
    from provenance import provenance, write_json

    result["provenance"] = provenance("cpu")
    write_json(path, result)
    print(f"  done {label} seed {seed} lr {lr:g}: val {result['val_loss']:.4f} ({result['train_seconds']:.0f} s)", flush=True)
    return path


# -- memory and step time, side by side ------------------------------------------------


def _unique_bytes(tensors: list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _state_tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor an optimizer state holds, incl. GaLore's/APOLLO's projector objects' matrices."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _state_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _state_tensors(v)]
    if hasattr(obj, "__dict__") and not isinstance(obj, (int, float, str)):
        return [t for v in vars(obj).values() for t in _state_tensors(v)]
    return []


def measure_memory(run: Run, batch: torch.Tensor, step: int) -> dict[str, int]:
    """Bytes by category, in one steady-state training step (call after a warm-up step).

    Categories are disjoint storages: weights (the model's parameters), grads (largest:
    after the backward; CompAct's ``Ĝ`` included), optimizer state (after the step,
    projector matrices included), CompAct's projection cache, saved activations (peak
    bytes saved for backward, parameters excluded).
    """
    from lightning_compact.memory import SavedActivationTracker

    params = list(run.model.parameters())
    if run.compact is not None:
        run.compact.step(step)
    with SavedActivationTracker(exclude=[run.model]) as saved:
        loss = run.model(batch, labels=batch)
    loss.backward()
    grads = _unique_bytes([p.grad for p in params if p.grad is not None])
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    state = _unique_bytes([t for st in run.optimizer.state.values() for t in _state_tensors(st)])
    weights = _unique_bytes([p for p in params if p.untyped_storage().nbytes() > 0])
    cache = run.compact.projection_cache_bytes if run.compact is not None else 0
    out = {"weights": weights, "grads": grads, "optimizer_state": state, "projection_cache": cache,
           "saved_activations": saved.result().bytes}
    out["total"] = sum(out.values())
    out["trainable_params"] = sum(p.numel() for p in params if p.requires_grad and p.untyped_storage().nbytes() > 0)
    return out


def measure(labels: list[str], s: Settings, rounds: int, data: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Memory per method, then step times interleaved round by round (ratios paired to AdamW's)."""
    from timing import interleaved_times, median, paired_ratio

    train_blocks, _ = data
    order = batch_order(len(train_blocks), s, 0)
    runs: dict[str, Run] = {}
    rows: dict[str, dict[str, Any]] = {}
    for label in labels:
        try:
            run = build(METHODS[label], s, 0, 1e-3)
            run.step(train_blocks[order[0]], 0)  # warm-up: optimizer state, projectors
            rows[label] = {"memory": measure_memory(run, train_blocks[order[1]], 1)}
            runs[label] = run
        except Exception as err:  # one failing method should not hide the others
            traceback.print_exc()
            rows[label] = {"error": repr(err)}
    counter = {label: 2 for label in runs}

    def stepper(label: str) -> Callable[[], object]:
        def step() -> None:
            i = counter[label] % s.steps
            runs[label].step(train_blocks[order[i]], counter[label])
            counter[label] += 1
        return step

    times = interleaved_times({label: stepper(label) for label in runs}, rounds)
    for label, ts in times.items():
        rows[label]["step_seconds_median"] = median(ts)
        rows[label]["step_seconds"] = ts
        if "adamw" in times:
            rows[label]["step_time_ratio"] = paired_ratio(ts, times["adamw"])
    return rows


# -- the protocol ----------------------------------------------------------------------


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def best_lr(results: dict[float, dict[str, Any]]) -> float:
    """The lr of the lowest final validation loss (a diverged run counts as +inf)."""
    return min(results, key=lambda lr: (results[lr]["val_loss"], lr))


def next_lrs(results: dict[float, dict[str, Any]], extended: int, max_extend: int) -> list[float]:
    """One more lr past the end the best value sits at, while that end improves."""
    if extended >= max_extend or len(results) < 2:
        return []
    lrs = sorted(results)
    best = best_lr(results)
    if best == lrs[-1]:
        return [lrs[-1] * 2]
    if best == lrs[0]:
        return [lrs[0] / 2]
    return []


def schedule(labels: list[str], lrs: list[float], seeds: list[int], s: Settings, out: Path, jobs: int,
             max_extend: int, resume: bool) -> None:
    """Sweep seed ``seeds[0]`` over ``lrs`` per method, extend at the edges, then the other seeds at the best lr."""
    sweep: dict[str, dict[float, dict[str, Any]]] = {label: {} for label in labels}
    extended = {label: 0 for label in labels}
    seeded: set[str] = set()
    pending: dict[Future, tuple[str, int, float]] = {}
    # lr-major, in the order given: a benchmark cut short still compares every method at the first lrs.
    queue: list[tuple[str, int, float]] = [(label, seeds[0], lr) for lr in lrs for label in labels]

    def advance(label: str) -> None:
        if any(job[0] == label and job[1] == seeds[0] for job in [*queue, *pending.values()]):
            return
        # To the front: the methods listed first finish (sweep and seeds) first.
        more = next_lrs(sweep[label], extended[label], max_extend)
        if more:
            extended[label] += 1
            queue[:0] = [(label, seeds[0], lr) for lr in more]
        elif label not in seeded:
            seeded.add(label)
            lr = best_lr(sweep[label])
            queue[:0] = [(label, seed, lr) for seed in seeds[1:]]

    pool = ProcessPoolExecutor(max_workers=jobs) if jobs > 1 else None
    try:
        while queue or pending:
            while queue and (pool is None or len(pending) < jobs):
                label, seed, lr = job = queue.pop(0)
                path = run_path(out, s, label, seed, lr)
                if resume and path.exists():
                    result = _load(path)
                elif pool is None:
                    _worker((label, seed, lr, s, str(path)))
                    result = _load(path)
                else:
                    pending[pool.submit(_worker, (label, seed, lr, s, str(path)))] = job
                    continue
                if seed == seeds[0]:
                    sweep[label][lr] = result
                    advance(label)
            if pending:
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in done:
                    label, seed, lr = pending.pop(future)
                    try:
                        future.result()
                    except Exception:
                        traceback.print_exc()
                        continue
                    if seed == seeds[0]:
                        sweep[label][lr] = _load(run_path(out, s, label, seed, lr))
                        advance(label)
    finally:
        if pool is not None:
            pool.shutdown()


def collect(labels: list[str], s: Settings, out: Path) -> dict[str, dict[str, Any]]:
    """Every run on disk for these methods: {label: {"sweep": {lr: loss}, "best_lr", "seeds": {seed: result}}}."""
    folder = out / "runs" / s.tag
    found: dict[str, dict[str, Any]] = {}
    for label in labels:
        runs = [json.loads(p.read_text()) for p in sorted(folder.glob(f"{label}_seed*_lr*.json"))]
        runs = [r for r in runs if r["method"] == label]
        if not runs:
            continue
        sweep_seed = min(r["seed"] for r in runs)
        sweep = {r["lr"]: r for r in runs if r["seed"] == sweep_seed}
        lr = best_lr(sweep)
        found[label] = {
            "sweep_seed": sweep_seed,
            "sweep": {f"{k:g}": {"val_loss": v["val_loss"], "best_val_loss": v["best_val_loss"]} for k, v in sorted(sweep.items())},
            "best_lr": lr,
            "seeds": {r["seed"]: r for r in sorted(runs, key=lambda r: r["seed"]) if r["lr"] == lr},
        }
    return found


def summarize(found: dict[str, dict[str, Any]], memory: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: loss vs AdamW (mean, worst seed, per seed), memory ratios, step-time ratio."""
    base = found.get("adamw")
    base_mem = memory.get("adamw", {}).get("memory")
    rows = []
    for label in [*found, *(m for m in memory if m not in found)]:
        mem = memory.get(label, {})
        if label not in found:  # measured, not trained (yet)
            rows.append(_with_measurements({"method": label, "not_trained": True, "seeds": [], "sweep": {}}, mem, base_mem))
            continue
        f = found[label]
        seeds = sorted(f["seeds"])
        losses = [f["seeds"][k]["val_loss"] for k in seeds]
        row: dict[str, Any] = {
            "method": label, "best_lr": f["best_lr"], "seeds": seeds, "val_loss": dict(zip(map(str, seeds), losses)),
            "val_loss_mean": statistics.fmean(losses), "sweep": f["sweep"],
            "best_val_loss_mean": statistics.fmean(f["seeds"][k]["best_val_loss"] for k in seeds),
        }
        if base is not None:
            paired = {k: 100 * (f["seeds"][k]["val_loss"] / base["seeds"][k]["val_loss"] - 1) for k in seeds if k in base["seeds"]}
            row["vs_adamw_pct"] = {str(k): v for k, v in paired.items()}
            if paired:
                row["vs_adamw_mean_pct"] = statistics.fmean(paired.values())
                row["vs_adamw_worst_pct"] = max(paired.values())
        rows.append(_with_measurements(row, mem, base_mem))
    return rows


def _with_measurements(row: dict[str, Any], mem: dict[str, Any], base_mem: dict[str, Any] | None) -> dict[str, Any]:
    """``row`` with the method's measured memory (and its ratio to AdamW's) and step-time ratio, where measured."""
    if "memory" in mem:
        row["memory"] = mem["memory"]
        if base_mem:
            row["total_memory_ratio"] = mem["memory"]["total"] / base_mem["total"]
    if "step_time_ratio" in mem:
        row["step_time_ratio"] = mem["step_time_ratio"]
    return row


MIB = 2**20


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("| method | best lr | seeds | val loss (mean) | vs AdamW: mean | worst seed | per seed | total memory | "
            "weights | grads | optim state | proj cache | saved activ | step time |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        per_seed = ", ".join(f"{v:+.1f}" for v in r.get("vs_adamw_pct", {}).values())
        m = r.get("memory", {})
        trained = not r.get("not_trained")
        cells = [
            r["method"], f"{r['best_lr']:g}" if trained else "not trained", str(len(r["seeds"])),
            f"{r['val_loss_mean']:.4f}" if trained else "–",
            f"{r['vs_adamw_mean_pct']:+.1f}%" if "vs_adamw_mean_pct" in r else "–",
            f"{r['vs_adamw_worst_pct']:+.1f}%" if "vs_adamw_worst_pct" in r else "–",
            per_seed or "–",
            f"{r['total_memory_ratio']:.3f}× ({m['total'] / MIB:.1f} MiB)" if "total_memory_ratio" in r else "–",
            *(f"{m[k] / MIB:.2f}" if k in m else "–" for k in ("weights", "grads", "optimizer_state", "projection_cache", "saved_activations")),
            f"{r['step_time_ratio']:.2f}×" if "step_time_ratio" in r else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_sweep(rows: list[dict[str, Any]]) -> str:
    lrs = sorted({float(k) for r in rows for k in r["sweep"]})
    lines = ["| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for r in rows:
        if r.get("not_trained"):
            continue
        cells = []
        for lr in lrs:
            v = r["sweep"].get(f"{lr:g}")
            text = "–" if v is None else ("diverged" if not math.isfinite(v["val_loss"]) else f"{v['val_loss']:.4f}")
            cells.append(f"**{text}**" if v is not None and lr == r["best_lr"] else text)
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(rows):
        if "memory" not in r or r.get("not_trained") or not math.isfinite(r["val_loss_mean"]):
            continue
        x = r["memory"]["total"] / MIB
        losses = list(r["val_loss"].values())
        ax.errorbar(x, r["val_loss_mean"], yerr=[[r["val_loss_mean"] - min(losses)], [max(losses) - r["val_loss_mean"]]],
                    fmt="o", color=f"C{i % 10}", capsize=3)
        ax.annotate(f"{r['method']} ({len(losses)})", (x, r["val_loss_mean"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("total memory (MiB): weights + grads + optimizer state + projection cache + saved activations")
    ax.set_ylabel("final validation loss (nats/byte), mean; bars: min-max over seeds")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", help=f"comma-separated, from {', '.join(METHODS)} (default: all)")
    parser.add_argument("--lrs", help=f"comma-separated sweep, run in this order (default {','.join(f'{x:g}' for x in DEFAULT_LRS)})")
    parser.add_argument("--seeds", help="comma-separated; the first is the sweep's seed (default 0,1,2; --quick: 0)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--max-extend", type=int, default=2, help="lrs added past an end of the sweep (x2 each)")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at once (one thread each)")
    parser.add_argument("--timing-rounds", type=int, default=10, help="interleaved timed steps per method")
    parser.add_argument("--quick", action="store_true", help="CI smoke: a tiny model, few steps, one lr, one seed")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--resume", action="store_true", help="skip runs (and the measurement) already on disk")
    parser.add_argument("--report-only", action="store_true", help="summarize what is on disk")
    parser.add_argument("--measure-only", action="store_true", help="measure memory and step time, train nothing")
    parser.add_argument("--plot-methods", help="comma-separated: the rows drawn in the plot (default: every trained row)")
    args = parser.parse_args(argv)

    s = QUICK if args.quick else Settings()
    if args.steps is not None:
        s = dataclasses.replace(s, steps=args.steps, val_every=min(s.val_every, args.steps))
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else ([4e-3] if args.quick else list(DEFAULT_LRS))
    seeds = [int(x) for x in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    max_extend = 0 if args.quick else args.max_extend
    labels = args.methods.split(",") if args.methods else list(METHODS)
    unknown = [m for m in labels if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if "adamw" not in labels:
        labels.insert(0, "adamw")  # every ratio is to AdamW
    torch.set_num_threads(1)
    skipped = {label: reason for label in labels if (reason := skip_reason(METHODS[label]))}
    for label, reason in skipped.items():
        print(f"  {label}: skipped: {reason}", flush=True)
    labels = [label for label in labels if label not in skipped]

    from provenance import provenance, write_json

    out: Path = args.out
    measure_path = out / f"measure_{s.tag}.json"
    # --report-only reads what is on disk, the measurement included (without it the table lost its memory columns).
    previous = _load(measure_path) if args.resume or args.report_only else None
    memory: dict[str, Any] = (previous or {}).get("methods", {})
    data = load_blocks(s)
    missing = [label for label in labels if label not in memory or "error" in memory[label]]
    if missing and not args.report_only:
        # Every ratio needs AdamW measured in the same run as the method.
        todo = labels if previous is None or "adamw" in missing else ["adamw", *[m for m in missing if m != "adamw"]]
        print(f"measuring memory and step time of {', '.join(todo)} ...", flush=True)
        fresh = measure(todo, s, 2 if args.quick else args.timing_rounds, data)
        if previous is not None and "adamw" not in missing:
            # A later batch: its own AdamW is the reference of its ratios; keep the earlier rows as they were.
            fresh.pop("adamw", None)
        memory.update(fresh)
        write_json(measure_path, {"provenance": provenance("cpu", argv), "settings": dataclasses.asdict(s), "methods": memory})
    if not args.report_only and not args.measure_only:
        print(f"training: {len(labels)} methods, sweep {lrs} on seed {seeds[0]}, then seeds {seeds[1:]}; {args.jobs} at a time",
              flush=True)
        schedule(labels, lrs, seeds, s, out, args.jobs, max_extend, args.resume)
    found = collect(labels, s, out)
    rows = summarize(found, {k: v for k, v in memory.items() if k in labels})
    title = (f"KJV bytes, LLaMA d={s.hidden}x{s.layers}, {s.steps} steps of {s.batch_size}x{s.seq_len}, fp32 CPU; "
             f"each method at its best lr (sweep on seed {seeds[0]}); mean of seeds")
    stem = "peers_quick" if args.quick else "peers"
    summary = {"title": title, "settings": dataclasses.asdict(s), "seeds": seeds, "lrs": lrs, "skipped": skipped,
               "rows": rows, "measure": memory, "provenance": provenance("cpu", argv)}
    write_json(out / f"{stem}.json", summary)
    (out / f"{stem}_table.md").write_text(f"{title}\n\n{format_table(rows)}\n\nSweep (final val loss, seed {seeds[0]}):\n\n{format_sweep(rows)}\n")
    shown = set(args.plot_methods.split(",")) if args.plot_methods else None
    plot([r for r in rows if shown is None or r["method"] in shown], out / f"{stem}.png", title)
    print(title)
    print(format_table(rows))
    print(format_sweep(rows))
    print(f"wrote {out / (stem + '.json')}, {stem}_table.md, {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
