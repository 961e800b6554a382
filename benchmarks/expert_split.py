"""Expert split at the delink vs the same number of experts throughout (configs/experts-split.yaml vs
configs/experts-baseline.yaml), at equal optimizer steps.

Every arm trains the recipes' model shape (4 layers, MoE in every layer, top-2) with m6lit's LightningModule, as a
Pseudo Giant (2 shared blocks) that `PseudoToReal` delinks at `--split-step`:
  baseline        E experts throughout;
  split           E/2 experts, then `ExpertSplitMerge` clones every expert into 2 at the delink (E after it),
                  router rows with noise 0.01 to break the copies' tie;
  split-no-noise  the same without noise (top-2 then picks both copies of one expert, which stay identical);
  small           E/2 experts throughout (does growing help over not growing?).
Data: byte-level LM on the Python standard library's source files (held-out files for validation; shared with
benchmarks/p2r_convergence.py). Validation loss on fixed held-out batches every `--eval-every` steps (excluded from
the clock); both wall-clock and process CPU time are recorded. Torch runs single-threaded by default, so CPU time
is the compute spent and is not inflated by OpenMP spin-waits when other processes load the machine.
At the split step the split arm also measures the validation-loss jump of the split itself for several noise levels
(on copies of the model, off the clock).

Prints a table and writes benchmarks/results/expert_split.json and .png.

    python benchmarks/expert_split.py            # about 7 minutes on one CPU core
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from m6lit.callbacks import ExpertSplitMerge, MoEMonitor, PseudoToReal
from p2r_convergence import ByteChunks, stdlib_bytes, time_to_reach

from m6lit.model import M6Config, apply_expert_op, lm_loss
from m6lit.module import M6LitModule


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean LM loss (nats/byte) of `model` on the fixed validation batches, dropout off."""
    was_training = model.training
    model.eval()
    total = sum(float(lm_loss(model(b).logits, b["labels"])) for b in batches)
    model.train(was_training)
    return total / len(batches)


class Clock(L.Callback):
    """Training time per batch (wall and process CPU), validation every `every` optimizer steps off the clock.
    Put it first in the callback list: the structural ops of the other callbacks then also run off the clock."""

    def __init__(self, every: int, val_batches: list[dict[str, torch.Tensor]], also_at: int) -> None:
        self.every = every
        self.also_at = also_at
        self.val_batches = val_batches
        self.wall = self.cpu = 0.0
        self.points: list[dict[str, float]] = []
        self._start: tuple[float, float] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.points.append({"step": 0, "wall_s": 0.0, "cpu_s": 0.0,
                            "val_loss": evaluate(pl_module.model, self.val_batches)})

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        wall, cpu = self._start
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu
        step = trainer.global_step
        if step % self.every == 0 or step in (self.also_at, trainer.max_steps):
            self.points.append({"step": step, "wall_s": self.wall, "cpu_s": self.cpu,
                                "val_loss": evaluate(pl_module.model, self.val_batches)})
            print(f"  step {step:4d}  wall {self.wall:6.1f}s  cpu {self.cpu:6.1f}s  "
                  f"val {self.points[-1]['val_loss']:.4f}", flush=True)


class SplitJump(L.Callback):
    """At the split step (after the delink, before the split), the validation loss of the model before and after
    a split by 2 at each noise level, on deep copies (the training run is untouched)."""

    def __init__(self, step: int, noises: list[float], val_batches: list[dict[str, torch.Tensor]]) -> None:
        self.step, self.noises, self.val_batches = step, noises, val_batches
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step != self.step or self.rows:
            return
        before = evaluate(pl_module.model, self.val_batches)
        for noise in self.noises:
            model = copy.deepcopy(pl_module.model)
            apply_expert_op(model, "split", 2, noise=noise, generator=torch.Generator().manual_seed(0))
            after = evaluate(model, self.val_batches)
            self.rows.append({"noise": noise, "val_before": before, "val_after": after, "jump": after - before})


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one)."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def make_config(args: argparse.Namespace, experts: int) -> M6Config:
    return M6Config(vocab_size=384, d_model=args.d_model, n_heads=args.heads, d_ff=args.d_model * 3,
                    num_layers=args.layers, num_unique_blocks=args.pseudo_blocks, sharing_layout="cycle",
                    moe_layers="all", num_experts=experts, top_k=args.top_k, expert_d_ff=args.expert_d_ff,
                    image_size=32, patch_size=16, max_seq_len=args.seq + 8)


def run_arm(name: str, experts: int, split_noise: float | None, args: argparse.Namespace, train: ByteChunks,
            val_batches: list, measure_jump: bool = False) -> dict[str, Any]:
    """Train one arm; `split_noise` None means no split; `measure_jump` adds the split-jump study."""
    split = split_noise is not None
    torch.manual_seed(args.seed)

    def optimizer(params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)

    module = M6LitModule(make_config(args, experts), optimizer=optimizer, warmup_steps=args.warmup,
                         min_lr_ratio=0.1)
    clock = Clock(args.eval_every, val_batches, also_at=args.split_step)
    p2r = PseudoToReal(delink_step=args.split_step, optimizer_state="copy", rewarmup_steps=args.rewarmup)
    monitor = MoEMonitor(log_every_n_steps=args.eval_every, patience=args.eval_every * 2)
    callbacks: list[L.Callback] = [clock, p2r]
    esm = jump = None
    if split:
        esm = ExpertSplitMerge([{"step": args.split_step, "op": "split", "factor": 2}], noise=split_noise,
                               seed=args.seed)
        if measure_jump:
            jump = SplitJump(args.split_step, args.noises, val_batches)
            callbacks.append(jump)
        callbacks.append(esm)
    callbacks.append(monitor)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, callbacks=callbacks, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0, deterministic=True)
    loader = DataLoader(train, batch_size=args.batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    params_start = module.model.num_parameters()
    print(f"[{name}] {experts} experts, {params_start:,} unique parameters at the start", flush=True)
    trainer.fit(module, loader)
    shapes = [b.ffn.num_experts for b in module.model.blocks]
    return {"name": name, "experts_start": experts, "experts_end": shapes, "split": split, "split_noise": split_noise,
            "points": clock.points, "final_val_loss": clock.points[-1]["val_loss"], "steps": trainer.global_step,
            "wall_s": clock.wall, "cpu_s": clock.cpu, "s_per_step_wall": clock.wall / trainer.global_step,
            "s_per_step_cpu": clock.cpu / trainer.global_step, "params_start": params_start,
            "params_end": module.model.num_parameters(), "delink": p2r.history,
            "split_event": [{k: v for k, v in r.items() if k.startswith("experts/")} for r in esm.history] if esm
            else [], "split_jump": jump.rows if jump else [],
            "final_load": [{"layer": s.layer, "load": s.load} for s in monitor.last],
            "monitor_warnings": monitor.warnings}


def plot(results: list[dict[str, Any]], split_step: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        pts = r["points"][1:]
        ys = [p["val_loss"] for p in pts]
        axes[0].plot([p["step"] for p in pts], ys, label=r["name"])
        axes[1].plot([p["cpu_s"] for p in pts], ys, label=r["name"])
    axes[0].axvline(split_step, color="grey", lw=0.6, ls=":")
    axes[0].set_xlabel("optimizer steps (dotted: delink + split)")
    axes[1].set_xlabel("training CPU time (s)")
    for ax in axes:
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Expert split at the delink (E/2 → E) vs E experts throughout")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=450)
    parser.add_argument("--split-step", type=int, default=150, help="delink and split after this optimizer step")
    parser.add_argument("--experts", type=int, default=8, help="E; the split and small arms start with E/2")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pseudo-blocks", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--expert-d-ff", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rewarmup", type=int, default=10, help="LR re-warm-up after the delink (as the recipes)")
    parser.add_argument("--noise", type=float, default=0.01, help="split noise in the split arm")
    parser.add_argument("--noises", type=float, nargs="+", default=[0.0, 0.01, 0.1],
                        help="noise levels for the split-jump measurement")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="initialisation, data order and split noise")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arms", nargs="+", default=["baseline", "split", "split-no-noise", "small"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "expert_split.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    train_bytes, val_bytes = stdlib_bytes()
    train, val = ByteChunks(train_bytes, args.seq), ByteChunks(val_bytes, args.seq)
    val_loader = DataLoader(val, batch_size=args.batch, shuffle=True, generator=torch.Generator().manual_seed(1))
    val_batches = [b for _, b in zip(range(args.val_batches), val_loader)]
    print(f"data: {len(train_bytes) / 1e6:.1f} MB train, {len(val_bytes) / 1e6:.1f} MB validation bytes", flush=True)

    half = args.experts // 2
    arms = {"baseline": (args.experts, None), "split": (half, args.noise), "split-no-noise": (half, 0.0),
            "small": (half, None)}
    results = [run_arm(name, *arms[name], args, train, val_batches, measure_jump=name == "split")
               for name in args.arms]

    base = next((r for r in results if r["name"] == "baseline"), results[0])
    target = base["final_val_loss"]
    for r in results:
        pts = [{"train_s": p["cpu_s"], "val_loss": p["val_loss"]} for p in r["points"]]
        reach = time_to_reach(pts, target)
        r["cpu_s_to_baseline_final"] = reach
        steps = next((p["step"] for p in r["points"] if p["val_loss"] <= target), None)
        r["steps_to_baseline_final"] = steps
    at_split = {r["name"]: next(p["val_loss"] for p in r["points"] if p["step"] >= args.split_step) for r in results}
    print(f"\n{'arm':<16}{'experts':>8}{'params pseudo':>15}{'params real':>13}{'s/step cpu':>12}"
          f"{'val@split':>11}{'final val':>11}{'steps→base':>12}")
    for r in results:
        experts = f"{r['experts_start']}→{r['experts_end'][0]}" if r["split"] else str(r["experts_start"])
        steps = r["steps_to_baseline_final"]
        print(f"{r['name']:<16}{experts:>8}{r['params_start']:>15,}{r['params_end']:>13,}"
              f"{r['s_per_step_cpu']:>12.3f}{at_split[r['name']]:>11.4f}{r['final_val_loss']:>11.4f}"
              f"{(str(steps) if steps is not None else '—'):>12}")
    for r in results:
        for row in r["split_jump"]:
            print(f"split jump ({r['name']}, noise {row['noise']}): val {row['val_before']:.4f} → "
                  f"{row['val_after']:.4f} ({row['jump']:+.4f})")
    meta = {"device": cpu_name(), "threads": args.threads,
            "torch": torch.__version__, "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args),
            "total_s": time.perf_counter() - started,
            "note": "val loss in nats/byte on fixed held-out stdlib batches; cpu_s = process CPU time of the training "
                    "batches (validation, the split-jump study and the structural callbacks run off the clock); "
                    "steps→base = first evaluated step whose val loss <= the baseline's final val loss"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    plot(results, args.split_step, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {meta['total_s']:.0f}s")


if __name__ == "__main__":
    main()
