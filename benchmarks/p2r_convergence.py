"""Pseudo-to-Real vs training the Real Giant from scratch, at equal wall-clock budgets.

Both arms train the same Real Giant (default: 24 layers, d_model 1024, MoE on every other layer) with m6lit's own
LightningModule; the P2R arms first train the Pseudo Giant (K=2 physical blocks in a cycle: one dense, one MoE) with
a larger effective batch (gradient accumulation), then `PseudoToReal` delinks it mid-fit — once per optimizer-state
policy. Data: byte-level LM on the Python standard library's own source files (held-out files for validation), text
that nobody here wrote. Validation runs on a fixed set of held-out batches every `--eval-every-s` seconds of
training time; the evaluation time is excluded from the budget.

Prints a table and writes benchmarks/results/p2r_convergence.json and .png.

    python benchmarks/p2r_convergence.py --budget-s 70
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import sysconfig
import time
import zlib
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m6lit.callbacks import PseudoToReal  # noqa: E402
from m6lit.model import M6Config, lm_loss  # noqa: E402
from m6lit.module import M6LitModule  # noqa: E402

BYTE_OFFSET = 3  # ByT5: pad 0, eos 1, unk 2, then the 256 bytes


def stdlib_bytes(held_out_every: int = 20) -> tuple[bytes, bytes]:
    """(train, validation) bytes of the standard library's .py files; every n-th file (by name hash) held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val = bytearray(), bytearray()
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        data = path.read_bytes()
        (val if zlib.crc32(str(path.relative_to(root)).encode()) % held_out_every == 0 else train).extend(data)
    return bytes(train), bytes(val)


class ByteChunks(Dataset):
    """Fixed-length byte-level LM samples in the batch contract (prefix_len 1: the first byte is context)."""

    def __init__(self, data: bytes, seq_len: int) -> None:
        self.tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + BYTE_OFFSET
        self.seq_len = seq_len

    def __len__(self) -> int:
        return self.tokens.numel() // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.tokens[i * self.seq_len:(i + 1) * self.seq_len]
        labels = ids.clone()
        labels[0] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool), "labels": labels,
                "prefix_len": torch.tensor(1)}


class Budget(L.Callback):
    """Stops at `budget_s` seconds of training time; evaluates every `every_s` seconds (excluded from the clock)."""

    def __init__(self, budget_s: float, every_s: float, val_batches: list[dict[str, torch.Tensor]],
                 tokens_per_micro_batch: int) -> None:
        self.budget_s, self.every_s = budget_s, every_s
        self.val_batches = val_batches
        self.tokens = tokens_per_micro_batch
        self.points: list[dict[str, float]] = []
        self.train_time = 0.0
        self.micro_batches = 0
        self._last: Optional[float] = None
        self._next_eval = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._last is None:
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            self._last = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.micro_batches += 1
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.train_time += now - self._last
        if self.train_time >= self._next_eval or self.train_time >= self.budget_s:
            self.points.append({"train_s": self.train_time, "step": trainer.global_step,
                                "tokens": self.micro_batches * self.tokens, "val_loss": self.evaluate(pl_module)})
            self._next_eval = self.train_time + self.every_s
            print(f"  t={self.train_time:6.1f}s step={trainer.global_step:5d} val={self.points[-1]['val_loss']:.4f}",
                  flush=True)
        if self.train_time >= self.budget_s:
            trainer.should_stop = True
        self._last = time.perf_counter()

    @torch.no_grad()
    def evaluate(self, pl_module: L.LightningModule) -> float:
        pl_module.eval()
        total = 0.0
        for batch in self.val_batches:
            batch = {k: v.to(pl_module.device) for k, v in batch.items()}
            with torch.autocast(pl_module.device.type, dtype=torch.bfloat16, enabled=pl_module.device.type == "cuda"):
                out = pl_module.model(batch)
            total += float(lm_loss(out.logits, batch["labels"]))
        pl_module.train()
        return total / len(self.val_batches)


def make_config(args: argparse.Namespace, unique: int) -> M6Config:
    return M6Config(vocab_size=384, d_model=args.d_model, n_heads=args.heads, d_ff=args.d_ff,
                    num_layers=args.layers, num_unique_blocks=unique, sharing_layout="cycle", moe_layers=2,
                    num_experts=args.experts, top_k=args.top_k, expert_d_ff=args.expert_d_ff,
                    image_size=32, patch_size=16, max_seq_len=args.seq + 8)


def run_arm(name: str, args: argparse.Namespace, train: Dataset, val_batches: list, policy: Optional[str],
            delink_step: Optional[int]) -> dict[str, Any]:
    torch.manual_seed(0)
    unique = args.layers if policy is None else args.pseudo_blocks
    lr = args.lr

    def optimizer(params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)

    module = M6LitModule(make_config(args, unique), optimizer=optimizer, warmup_steps=args.warmup,
                         min_lr_ratio=1.0)
    budget = Budget(args.budget_s, args.eval_every_s, val_batches, args.batch * args.seq)
    callbacks: list[L.Callback] = [budget]
    accumulate = 1
    p2r = None
    if policy is not None:
        p2r = PseudoToReal(delink_step=delink_step, optimizer_state=policy, rewarmup_steps=args.rewarmup,
                           accumulate_grad_batches_after=1)
        callbacks.insert(0, p2r)
        accumulate = args.pseudo_accumulate
    trainer = L.Trainer(accelerator="auto", devices=1, precision=args.precision, max_steps=10**9,
                        accumulate_grad_batches=accumulate, callbacks=callbacks, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0)
    loader = DataLoader(train, batch_size=args.batch, shuffle=True, num_workers=2, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    params_start = module.model.num_parameters()
    params_logical = module.model.num_parameters(unique=False)
    print(f"[{name}] unique params {params_start:,} / compute-equivalent {params_logical:,}", flush=True)
    trainer.fit(module, loader)
    steps_per_s = trainer.global_step / max(budget.train_time, 1e-9)
    return {"name": name, "policy": policy, "delink_step": delink_step, "points": budget.points,
            "final_val_loss": budget.points[-1]["val_loss"], "steps": trainer.global_step,
            "train_s": budget.train_time, "steps_per_s": steps_per_s,
            "tokens_per_s": budget.micro_batches * args.batch * args.seq / budget.train_time,
            "params_unique_at_start": params_start, "params_compute_equivalent": params_logical,
            "event": p2r.history if p2r else []}


def time_to_reach(points: list[dict[str, float]], target: float) -> Optional[float]:
    """First training time at which val loss ≤ target (linear interpolation between evaluations)."""
    prev = None
    for p in points:
        if p["val_loss"] <= target:
            if prev is None:
                return p["train_s"]
            frac = (prev["val_loss"] - target) / max(prev["val_loss"] - p["val_loss"], 1e-12)
            return prev["train_s"] + frac * (p["train_s"] - prev["train_s"])
        prev = p
    return None


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        xs = [p["train_s"] for p in r["points"]]
        steps = [p["step"] for p in r["points"]]
        ys = [p["val_loss"] for p in r["points"]]
        axes[0].plot(xs, ys, label=r["name"])
        axes[1].plot(steps, ys, label=r["name"])
        if r["delink_step"]:
            t = next((p["train_s"] for p in r["points"] if p["step"] >= r["delink_step"]), None)
            if t is not None:
                axes[0].axvline(t, color="grey", lw=0.5, ls=":")
    axes[0].set_xlabel("training time (s)")
    axes[1].set_xlabel("optimizer steps")
    for ax in axes:
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Pseudo-to-Real vs Real Giant from scratch (equal wall-clock)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=70.0)
    parser.add_argument("--eval-every-s", type=float, default=7.0)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--d-ff", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-d-ff", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pseudo-blocks", type=int, default=2)
    parser.add_argument("--pseudo-accumulate", type=int, default=2)
    parser.add_argument("--delink-frac", type=float, default=0.4, help="share of the budget spent pseudo")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--rewarmup", type=int, default=0)
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--precision", default="bf16-mixed" if torch.cuda.is_available() else "32-true")
    parser.add_argument("--policies", nargs="+", default=["copy", "rescale", "reset"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "p2r_convergence.json"))
    args = parser.parse_args()
    torch.set_float32_matmul_precision("high")

    train_bytes, val_bytes = stdlib_bytes()
    train, val = ByteChunks(train_bytes, args.seq), ByteChunks(val_bytes, args.seq)
    val_loader = DataLoader(val, batch_size=args.batch, shuffle=True, generator=torch.Generator().manual_seed(1))
    val_batches = [b for _, b in zip(range(args.val_batches), val_loader)]
    print(f"data: {len(train_bytes) / 1e6:.1f} MB train, {len(val_bytes) / 1e6:.1f} MB validation bytes", flush=True)

    results = [run_arm("scratch (real)", args, train, val_batches, None, None)]
    scratch = results[0]
    pseudo_steps_per_s = scratch["steps_per_s"] / args.pseudo_accumulate
    delink_step = max(1, int(args.delink_frac * args.budget_s * pseudo_steps_per_s))
    for policy in args.policies:
        results.append(run_arm(f"p2r {policy}", args, train, val_batches, policy, delink_step))

    target = scratch["final_val_loss"]
    for r in results:
        reach = time_to_reach(r["points"], target)
        r["time_to_scratch_final_s"] = reach
        r["time_to_target_ratio"] = None if reach is None else reach / scratch["train_s"]
    print(f"\n{'arm':<16}{'steps':>7}{'tok/s':>10}{'final val':>11}{'t→scratch final':>17}{'ratio':>8}")
    for r in results:
        reach = r["time_to_scratch_final_s"]
        ratio = r["time_to_target_ratio"]
        print(f"{r['name']:<16}{r['steps']:>7}{r['tokens_per_s']:>10.0f}{r['final_val_loss']:>11.4f}"
              f"{(f'{reach:.1f}s' if reach is not None else 'not reached'):>17}"
              f"{(f'{ratio:.2f}' if ratio is not None else '—'):>8}")
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
            "torch": torch.__version__, "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args),
            "delink_step": delink_step, "target": "scratch arm's final validation loss",
            "note": "time_to_target_ratio = P2R training time to reach scratch's final val loss / scratch's time"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
