"""Pseudo-to-Real in the memory-bound regime: the Real Giant does not fit a stated GPU memory cap, the Pseudo Giant
does, and both are trained through m6lit's own Trainer path (M6LitModule, SelectiveOffloadStrategy, PseudoToReal).

Setup. A dense byte-level GPT (default d_model 2560, 32 layers, SwiGLU d_ff 6912, 20 heads, vocab 384: 2.54 B
parameters as the Real Giant; the Pseudo Giant runs its 32 layers on 2 shared blocks in a cycle, 0.16 B unique
parameters). Data: the Python standard library's own source files, held-out files for validation
(`p2r_convergence.stdlib_bytes`). One batch for every arm and phase: 6 x 1024 bytes per optimizer step. The GPU is
capped with `torch.cuda.set_per_process_memory_fraction` at `--gpu_cap_gb` (default 38 GB): the Real Giant's fp32
weights, gradients and AdamW state alone are 16 B/param = 40.6 GB (45.7 GB with the bf16 autocast copies), so it
cannot train resident, not even with every block checkpointed; the Pseudo Giant (2.9 GB of state plus its
activations, ~27 GB by the strategy's conservative estimate) fits. The cap cannot go much lower: the delink
materialises the Real Giant's weights and its copied Adam moments on the GPU (12 B/param = 30.5 GB, 33.4 GB with
the Pseudo Giant's state) before the strategy re-plans the placement and moves the streamed blocks to the host.

Phases, in order, every one budgeted from `--time_budget` (default 520 s; progress lines carry the elapsed time):
1. Throughput probes (at most `--probe_share` of the budget; each one times `--probe_s` seconds after its warm-up
   steps, and a second evaluation, after one that pays any compilation): the Pseudo Giant resident, then the Real
   Giant under the cap in several ways — the strategy's own plan for the cap (`gpu_memory_budget` = 0.9 x cap),
   every other block streamed ("half") or every block but the first two ("all"), with block activation
   checkpointing ("ckpt"), with gradient accumulation (same tokens per optimizer step), optimizer_overlap exact
   or delayed. Offload patterns only name blocks >= 2, so one configuration leaves the two shared blocks of a
   Pseudo Giant resident and streams real blocks once a delink creates them. The fastest Real Giant configuration
   that ran with its peak allocated memory within `--max_fill` (92 %) of the cap is picked automatically; one that
   fails (out of memory under the cap) is recorded and skipped, and the ones that would start after the probe
   budget is spent are recorded as skipped.
2. Arms, two seeds, interleaved (scratch 0, p2r 0, scratch 1, p2r 1): `scratch` (the Real Giant in the picked
   configuration from step 0) and `p2r` (the Pseudo Giant, resident under the same strategy, for `--pseudo_share`
   of the arm's training time — the delink runs at the first optimizer step after it —, then `PseudoToReal` with
   its default optimizer-state policy, the strategy re-planning the offload; block activation checkpointing, when
   the picked configuration uses it, is switched on at the delink, before the re-plan). Each arm warms the LR up
   over 10 steps, then follows one cosine that reaches 0 at the arm's own training-time budget. Evaluation (fixed
   held-out batches, `--evals` times per arm) is excluded from the clock, except the time its forward waited for
   the host engine, which the next training forward would have waited (charged to training). The delink's own
   time counts as P2R training time.
3. The decision rule (printed first, stored in the JSON), a table, benchmarks/results/p2r_regime.json (stamped:
   git revision or `M6LIT_GIT_REV`, torch, device; rewritten after every probe and arm, so a partial run keeps what
   it measured) and a PNG: validation loss against training time and against tokens, and the probe rates.

Budget arithmetic (defaults, one H200): ~15 s start-up (imports, data, CUDA); probes <= 25 % of the budget (130 s:
~15 s for the pseudo probe including the FlexAttention compilation, ~15-22 s per Real Giant configuration with its
set-up, host buffers and Adam state first touched in its warm-up steps: 6 of the 7 fit); the remaining ~360 s less
a 15 s reserve for the table, JSON and plot go to 4 arms in fixed wall slots (~86 s each). An arm's training time
is its slot minus the measured set-up (~5-8 s), teardown (~3 s) and evaluations (13 x ~0.5 s), divided by 1.05:
~65-70 s, of which the P2R arm spends half as the Pseudo Giant (~140 steps) and half, delink included, as the Real
Giant (~50 steps); scratch makes ~110 steps. An arm stops at its training time or at the end of its wall slot,
whichever comes first (then flagged `cut_short`), so the script cannot overrun.

    python benchmarks/p2r_regime.py                              # one H200, ~520 s
    python benchmarks/p2r_regime.py --quick --out /tmp/q.json    # tiny, on the CPU, < 60 s: exercises every phase
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from m6lit.callbacks import PseudoToReal  # noqa: E402
from m6lit.model import M6Config, M6Model, lm_loss  # noqa: E402
from m6lit.module import M6LitModule  # noqa: E402
from m6lit.strategies import SelectiveOffloadStrategy  # noqa: E402
from m6lit.strategies.planner import plan_offload  # noqa: E402
from m6lit.strategies.sizes import format_count  # noqa: E402
from p2r_convergence import ByteChunks, stdlib_bytes, time_to_reach  # noqa: E402
from stamp import stamp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "p2r_regime.json"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GB = 1e9
RULE = ("Decided before the arms run. Target: the mean of the two scratch arms' final validation losses. For each "
        "P2R seed, ratio = P2R's training time to first reach the target (linear interpolation between evaluations) "
        "/ the scratch arms' mean training time. SHOWN if ratio <= 0.6 in both seeds. REFUTED AT THIS SCALE if "
        "ratio >= 0.9 (or never reached) in both seeds while the pseudo phase runs >= 2x the scratch arms' tokens/s. "
        "Otherwise PARTIAL (rerun with three seeds before claiming anything).")


def elapsed() -> float:
    return time.perf_counter() - STARTED


def log(message: str) -> None:
    print(f"[{elapsed():6.1f}s] {message}", flush=True)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def cleanup() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def host_rss_peak() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------- model and configs
def model_config(args: argparse.Namespace, unique: Optional[int] = None, checkpointing: bool = False) -> M6Config:
    return M6Config(vocab_size=384, d_model=args.d_model, n_heads=args.heads, d_ff=args.d_ff,
                    num_layers=args.layers, num_unique_blocks=unique, sharing_layout="cycle", moe_layers="none",
                    image_size=32, patch_size=16, max_seq_len=args.seq + 8,
                    activation_checkpointing="all" if checkpointing else None)


@dataclasses.dataclass
class Candidate:
    """One way to train the Real Giant under the cap (what the probes compare and the arms use)."""

    name: str
    placement: str  # "none" | "half" | "all" | "plan"
    mode: str = "exact"  # optimizer_overlap
    checkpointing: bool = False
    accumulate: int = 1

    def strategy_kwargs(self, args: argparse.Namespace, cap_bytes: float) -> dict[str, Any]:
        K, L_ = args.pseudo_blocks, args.layers
        micro = args.batch // self.accumulate
        kwargs: dict[str, Any] = {"prefetch": 1, "optimizer_overlap": self.mode, "delay_warmup_steps": 2,
                                  "micro_batch_tokens": micro * args.seq}
        if self.placement == "none":
            kwargs["offload"] = []
        elif self.placement == "half":  # every other block, never one of the pseudo's shared block indices
            kwargs["offload"] = [f"model.blocks.[{','.join(str(i) for i in range(K + 1, L_, 2))}]"]
        elif self.placement == "all":
            kwargs["offload"] = [f"model.blocks.[{K}-{L_ - 1}]"]
        elif self.placement == "plan":
            kwargs["gpu_memory_budget"] = int(cap_bytes * args.plan_fraction)
        else:
            raise ValueError(f"placement {self.placement!r}")
        return kwargs


def candidates(args: argparse.Namespace) -> list[Candidate]:
    """Real Giant configurations in the order they are probed: by the speed predicted from the offload benchmark
    (benchmarks/NOTES.md), so a spent probe budget skips the slowest, and a dominated one ("half+ckpt" streams more
    blocks than "plan+ckpt" for the same recompute) comes after one "all" configuration."""
    order = [("half", "delayed", False, 1), ("plan", "delayed", True, 1), ("half", "exact", False, 1),
             ("plan", "exact", True, 1), ("all", "delayed", False, 1), ("plan", "exact", True, 2),
             ("half", "delayed", True, 1), ("half", "exact", True, 1), ("all", "exact", False, 1)]
    out = []
    for placement, mode, ckpt, accumulate in order:
        if mode not in args.modes or args.batch % accumulate:
            continue
        name = placement + ("+ckpt" if ckpt else "") + (f" accumulate {accumulate}" if accumulate > 1 else "")
        out.append(Candidate(f"{name} {mode}", placement, mode, checkpointing=ckpt, accumulate=accumulate))
    if args.candidates is not None:
        unknown = set(args.candidates) - {c.name for c in out}
        if unknown:
            raise ValueError(f"--candidates: unknown {sorted(unknown)}; choose from {[c.name for c in out]}")
        out = [c for c in out if c.name in args.candidates]
    return out


def estimates(args: argparse.Namespace) -> dict[str, float]:
    """The strategy's own memory model (shapes only, meta device) for the pseudo and real forms at the batch."""
    tokens = args.batch * args.seq

    def gpu(unique: Optional[int], ckpt: bool) -> tuple[float, int]:
        holder = nn.Module()
        with torch.device("meta"):
            holder.model = M6Model(model_config(args, unique, ckpt))
        plan = plan_offload(holder, offload=[], precision="bf16-mixed", micro_batch_tokens=tokens)
        return plan.estimate.gpu_total, plan.estimate.resident_params

    pseudo, n_pseudo = gpu(args.pseudo_blocks, False)
    real, n_real = gpu(None, False)
    real_ckpt, _ = gpu(None, True)
    return {"pseudo_resident_gpu_bytes": pseudo, "real_resident_gpu_bytes": real,
            "real_resident_ckpt_gpu_bytes": real_ckpt, "pseudo_params": n_pseudo, "real_params": n_real,
            "real_weights_grads_adam_bytes": 16.0 * n_real,
            "delink_peak_bytes": 12.0 * n_real + 18.0 * n_pseudo}


# ---------------------------------------------------------------------------------------------- the clock
class Clock(L.Callback):
    """Training-time clock, time-based LR schedule, evaluation and stopping for one run.

    Times every micro-batch (a device sync at each batch end), evaluates on the fixed validation batches every
    `every_s` of training time at optimizer-step boundaries (excluded from the clock, except the host engine's wait,
    see the module docstring), and stops at `train_s` of training time or at the wall-clock `deadline`."""

    def __init__(self, label: str, train_s: float, every_s: float, val_batches: list[dict[str, torch.Tensor]],
                 micro_tokens: int, deadline: float, warmup_steps: int = 10, min_steps: int = 0,
                 evaluate: bool = True, untimed_batches: int = 0) -> None:
        self.label, self.train_s, self.every_s = label, train_s, every_s
        self.val_batches, self.micro_tokens, self.deadline = val_batches, micro_tokens, deadline
        self.warmup_steps, self.min_steps, self.evaluate_during = warmup_steps, min_steps, evaluate
        self.untimed_batches = untimed_batches  # probes: warm-up batches that do not count towards `train_s`
        self.train_time = 0.0
        self.timed_time = 0.0
        self.tokens = 0
        self.points: list[dict[str, float]] = []
        self.batches: list[dict[str, Any]] = []  # per micro-batch: phase, seconds, step after it
        self.first_batch_at: Optional[float] = None
        self.eval_s: list[float] = []
        self.charged_s = 0.0
        self.cut_short = False
        self.switch: Optional["PhaseSwitch"] = None
        self.delink_s: Optional[float] = None
        self.delink_at_s: Optional[float] = None
        self._last: Optional[float] = None
        self._last_step = 0
        self._phase = "real"
        self._next_eval = every_s

    def lr_factor(self, step: int) -> float:
        """Linear warm-up over the first steps, then one cosine reaching 0 at `train_s` of training time."""
        warm = min(1.0, (step + 1) / max(self.warmup_steps, 1))
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, self.train_time / self.train_s)))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        model = pl_module.model
        self._phase = "pseudo" if len(model.blocks) < model.config.num_layers else "real"
        if self._last is None:
            sync()
            self._last = time.perf_counter()
            self.first_batch_at = elapsed()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        sync()
        now = time.perf_counter()
        dt = now - self._last
        model = pl_module.model
        delinked_now = self._phase == "pseudo" and len(model.blocks) == model.config.num_layers
        if delinked_now and self.switch is not None and self.switch.mark is not None:
            if DEVICE == "cuda":  # hand the pseudo phase's cached blocks back before the real phase fragments more
                torch.cuda.empty_cache()
                sync()
                now = time.perf_counter()
            self.delink_s = now - self.switch.mark
            self.delink_at_s = self.train_time + dt
        self.train_time += dt
        if len(self.batches) >= self.untimed_batches:
            self.timed_time += dt
        self.tokens += self.micro_tokens
        stepped = trainer.global_step != self._last_step
        self._last_step = trainer.global_step
        self.batches.append({"phase": self._phase, "s": dt, "delink_s": self.delink_s if delinked_now else 0.0,
                             "step": trainer.global_step})
        stop = stepped and trainer.global_step >= self.min_steps and self.timed_time >= self.train_s
        if stepped and now >= self.deadline:
            stop, self.cut_short = True, self.train_time < self.train_s
        if stepped and ((self.evaluate_during and self.train_time >= self._next_eval) or stop):
            if not self.evaluate_during:  # a probe: the first evaluation pays any compilation, time the second
                self.evaluate(trainer, pl_module, quiet=True)
                self.eval_s.clear()
                self.points.clear()
            self.evaluate(trainer, pl_module)
            self._next_eval = self.train_time + self.every_s
        if stop:
            trainer.should_stop = True
        self._last = time.perf_counter()

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, quiet: bool = False) -> None:
        start = time.perf_counter()
        streamer = getattr(trainer.strategy, "streamer", None)
        if streamer is not None:
            streamer.begin_pass()
        pl_module.eval()
        total = torch.zeros((), device=pl_module.device)
        for b in self.val_batches:
            b = {k: v.to(pl_module.device, non_blocking=True) for k, v in b.items()}
            with torch.autocast(pl_module.device.type, dtype=torch.bfloat16):
                out = pl_module.model(b)
            total += lm_loss(out.logits.float(), b["labels"])
        loss = float(total) / len(self.val_batches)
        pl_module.train()
        charged = 0.0
        if streamer is not None:
            streamer.begin_pass()
            charged = streamer.collect_stats().engine_wait_s  # the next training forward would have waited this
        self.train_time += charged
        self.timed_time += charged
        self.charged_s += charged
        self.eval_s.append(time.perf_counter() - start - charged)
        self.points.append({"train_s": self.train_time, "step": trainer.global_step, "tokens": self.tokens,
                            "val_loss": loss, "phase": self._phase_now(pl_module)})
        if not quiet:
            log(f"  {self.label}: t={self.train_time:6.1f}s step={trainer.global_step:5d} tokens={self.tokens:>9,} "
                f"val={loss:.4f} ({self.points[-1]['phase']})")

    @staticmethod
    def _phase_now(pl_module: L.LightningModule) -> str:
        model = pl_module.model
        return "pseudo" if len(model.blocks) < model.config.num_layers else "real"


class PhaseSwitch(L.Callback):
    """Runs just before PseudoToReal: at the first optimizer-step boundary where the clock has reached `delink_at_s`
    of training time it moves PseudoToReal's delink event to this step (the callback counts steps, the share is one
    of time), marks the time (the clock reports the delink's cost), and switches on block activation checkpointing
    when the picked Real Giant configuration uses it, so the strategy's re-plan inside the delink already counts
    the checkpointed activations."""

    def __init__(self, p2r: PseudoToReal, clock: Clock, delink_at_s: float, checkpointing: bool) -> None:
        self.p2r, self.clock, self.delink_at_s, self.checkpointing = p2r, clock, delink_at_s, checkpointing
        self.mark: Optional[float] = None
        self.step: Optional[int] = None
        self._last_step = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stepped, self._last_step = trainer.global_step != self._last_step, trainer.global_step
        if self.mark is not None or not stepped:
            return
        sync()
        now = time.perf_counter()
        if self.clock.train_time + (now - self.clock._last) < self.delink_at_s:
            return
        self.mark, self.step = now, trainer.global_step
        self.p2r.events[0].step = trainer.global_step
        if self.checkpointing:
            pl_module.model.config.activation_checkpointing = "all"


# ---------------------------------------------------------------------------------------------- one run
def phase_rates(clock: Clock) -> dict[str, Any]:
    """Tokens/s per phase over the timed micro-batches (the delink's own time reported apart)."""
    out: dict[str, Any] = {}
    for phase in ("pseudo", "real"):
        rows = [b for b in clock.batches if b["phase"] == phase]
        seconds = sum(b["s"] - b["delink_s"] for b in rows)
        if rows and seconds > 0:
            out[phase] = {"micro_batches": len(rows), "seconds": seconds,
                          "tokens_per_s": len(rows) * clock.micro_tokens / seconds}
    return out


def offload_counters(strategy: SelectiveOffloadStrategy, steps: int) -> dict[str, Any]:
    """Means of the strategy's per-step counters (`step_stats`, one row per optimizer step with streamed units)
    over the last `steps` rows, plus the placement it planned."""
    rows = strategy.step_stats[-steps:] if steps > 0 else []
    out: dict[str, Any] = {"steps_with_streamed_units": len(rows)}
    if rows:
        for key in rows[0]:
            values = [r[key] for r in rows if not math.isnan(r[key])]
            out[key] = statistics.mean(values) if values else None
    plan = strategy.plan
    if plan is not None:
        out.update({"offloaded_modules": len(plan.offload), "offloaded_names": list(plan.offload),
                    "offloaded_params": plan.estimate.offloaded_params,
                    "resident_params": plan.estimate.resident_params,
                    "estimated_gpu_bytes": plan.estimate.gpu_total, "estimated_host_bytes": plan.estimate.host_total})
    out.update({"redo_units": strategy.redo_units, "speculated_units": strategy.speculated_units,
                "delayed_steps": strategy.delayed_steps})
    return out


def run(label: str, args: argparse.Namespace, data: dict[str, Any], candidate: Candidate, cap_bytes: float, *,
        seed: int, unique: Optional[int], train_s: float, deadline: float, every_s: float, evaluate: bool = True,
        delink_at_s: Optional[float] = None, warmup_batches: int = 0) -> dict[str, Any]:
    """Build, train through Lightning with SelectiveOffloadStrategy (and PseudoToReal, delinking once `delink_at_s`
    of training time has passed, when given) and report. Exceptions (an out-of-memory under the cap) are recorded,
    not raised."""
    t_start = elapsed()
    cleanup()
    torch.manual_seed(seed)
    real_from_start = unique is None
    checkpointing = candidate.checkpointing and real_from_start
    micro = args.batch // candidate.accumulate
    clock = Clock(label, train_s, every_s, data["val"], micro * args.seq, deadline, min_steps=warmup_batches + 2,
                  evaluate=evaluate, untimed_batches=warmup_batches * candidate.accumulate)
    result: dict[str, Any] = {"label": label, "seed": seed, "candidate": dataclasses.asdict(candidate),
                              "delink_at_planned_s": delink_at_s, "planned_train_s": train_s}
    strategy = None
    try:
        def adamw(params: Any) -> torch.optim.Optimizer:
            return torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

        with torch.device(DEVICE):
            module = M6LitModule(model_config(args, unique, checkpointing), optimizer=adamw, warmup_steps=0,
                                 min_lr_ratio=1.0)
        module.lr_multipliers.append(clock.lr_factor)
        strategy = SelectiveOffloadStrategy(**candidate.strategy_kwargs(args, cap_bytes))
        callbacks: list[L.Callback] = []
        p2r = None
        if delink_at_s is not None:
            p2r = PseudoToReal(delink_step=2**62)  # default optimizer-state policy; PhaseSwitch sets the step
            switch = PhaseSwitch(p2r, clock, delink_at_s, candidate.checkpointing)
            clock.switch = switch
            callbacks += [switch, p2r]
        callbacks.append(clock)
        trainer = L.Trainer(accelerator="gpu" if DEVICE == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                            strategy=strategy, max_steps=-1, max_epochs=1000,
                            accumulate_grad_batches=candidate.accumulate, callbacks=callbacks, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            gradient_clip_val=1.0, num_sanity_val_steps=0, limit_val_batches=0)
        loader = DataLoader(data["train"], batch_size=micro, shuffle=True, drop_last=True,
                            num_workers=args.workers, generator=torch.Generator().manual_seed(seed))
        result["params_unique_at_start"] = module.model.num_parameters()
        trainer.fit(module, loader)
        timed = [b for b in clock.batches[warmup_batches * candidate.accumulate:]]
        phases = phase_rates(clock)
        result.update({
            "ok": True, "points": clock.points, "train_s": clock.train_time, "steps": trainer.global_step,
            "tokens": clock.tokens, "final_val_loss": clock.points[-1]["val_loss"] if clock.points else None,
            "tokens_per_s": clock.tokens / clock.train_time if clock.train_time else None,
            "timed_tokens_per_s": (len(timed) * clock.micro_tokens / sum(b["s"] for b in timed)) if timed else None,
            "phases": phases, "delink_s": clock.delink_s, "delink_at_train_s": clock.delink_at_s,
            "delink_step": clock.switch.step if clock.switch else None,
            "cut_short": clock.cut_short, "setup_s": (clock.first_batch_at or t_start) - t_start,
            "first_batch_s": clock.batches[0]["s"] if clock.batches else None,
            "eval_s_mean": statistics.mean(clock.eval_s) if clock.eval_s else None,
            "evaluations": len(clock.eval_s), "charged_engine_wait_s": clock.charged_s,
            "params_unique_at_end": module.model.num_parameters(),
            "peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated() if DEVICE == "cuda" else None,
            "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved() if DEVICE == "cuda" else None,
            "host_rss_peak_bytes": host_rss_peak(), "p2r_history": p2r.history if p2r else [],
            "offload": offload_counters(strategy, trainer.global_step)})
    except Exception as err:  # noqa: BLE001 - an OOM under the cap is a result of the probe, not a crash
        traceback.print_exc()
        result.update({"ok": False, "error": f"{type(err).__name__}: {str(err)[:400]}",
                       "train_s": clock.train_time, "points": clock.points})
        # the traceback's frames hold the failed run's module, optimizer and activations: free them, or every
        # later probe starts with that memory still allocated under the cap
        traceback.clear_frames(err.__traceback__)
    finally:
        strategy = None
        module = trainer = None  # noqa: F841
        cleanup()
    result["wall_s"] = elapsed() - t_start
    status = (f"{result['tokens_per_s']:,.0f} tok/s over {result['train_s']:.1f}s, {result['steps']} steps"
              if result.get("ok") else f"FAILED: {result['error'][:200]}")
    log(f"{label}: {status} (wall {result['wall_s']:.1f}s)")
    return result


# ---------------------------------------------------------------------------------------------- analysis
def predicted_ratio(r_pseudo: float, r_real: float, share: float, worth: float) -> float:
    """P2R time to reach scratch's final loss / scratch's time, if a pseudo-phase token is worth `worth` of a real
    token and loss depended on (worth-weighted) tokens only: solve worth*r_p*min(t, sT) + r_r*max(0, t - sT) = r_r*T."""
    gain = worth * r_pseudo / r_real
    if gain * share >= 1.0:
        return 1.0 / gain
    return share + (1.0 - gain * share)


def decide(arms: list[dict[str, Any]]) -> dict[str, Any]:
    scratch = [a for a in arms if a["label"].startswith("scratch") and a.get("ok")]
    p2r = [a for a in arms if a["label"].startswith("p2r") and a.get("ok")]
    if len(scratch) < 2 or len(p2r) < 2:
        return {"outcome": "INCOMPLETE", "why": f"{len(scratch)} scratch and {len(p2r)} P2R arms finished (need 2+2)"}
    target = statistics.mean(a["final_val_loss"] for a in scratch)
    scratch_s = statistics.mean(a["train_s"] for a in scratch)
    scratch_rate = statistics.mean(a["tokens_per_s"] for a in scratch)
    ratios, per_seed = [], []
    for a in p2r:
        reach = time_to_reach(a["points"], target)
        ratio = None if reach is None else reach / scratch_s
        ratios.append(ratio)
        own = next((s for s in scratch if s["seed"] == a["seed"]), None)
        own_reach = time_to_reach(a["points"], own["final_val_loss"]) if own else None
        per_seed.append({"seed": a["seed"], "time_to_target_s": reach, "ratio": ratio,
                         "ratio_vs_own_seed_scratch": None if own_reach is None else own_reach / own["train_s"]})
    pseudo_rates = [a["phases"]["pseudo"]["tokens_per_s"] for a in p2r if "pseudo" in a.get("phases", {})]
    speedup = statistics.mean(pseudo_rates) / scratch_rate if pseudo_rates else None
    if all(r is not None and r <= 0.6 for r in ratios):
        outcome = "SHOWN"
    elif all(r is None or r >= 0.9 for r in ratios) and speedup is not None and speedup >= 2.0:
        outcome = "REFUTED AT THIS SCALE"
    else:
        outcome = "PARTIAL"
    return {"outcome": outcome, "target_val_loss": target, "scratch_mean_train_s": scratch_s,
            "scratch_tokens_per_s": scratch_rate, "pseudo_phase_speedup_per_token": speedup, "per_seed": per_seed}


def table(probes: list[dict[str, Any]], arms: list[dict[str, Any]]) -> str:
    lines = [f"{'probe':<36}{'tok/s':>10}{'peak GB':>9}{'offl. params':>14}{'engine wait s':>15}{'setup s':>9}"]
    for p in probes:
        if not p.get("ok"):
            lines.append(f"{p['label']:<36}  {'skipped: ' + p['skipped'] if 'skipped' in p else 'FAILED'} "
                         f"{p.get('error', '')[:80]}")
            continue
        off = p["offload"]
        offloaded = format_count(off.get("offloaded_params", 0))
        lines.append(f"{p['label']:<36}{p['timed_tokens_per_s']:>10,.0f}"
                     f"{(p['peak_gpu_reserved_bytes'] or 0) / GB:>9.1f}{offloaded:>14}"
                     f"{off.get('engine_wait_s') or 0:>15.3f}{p['setup_s']:>9.1f}"
                     + ("  <- picked" if p.get("picked") else "")
                     + ("  (too close to the cap: not picked)" if p.get("eligible") is False else ""))
    lines.append("")
    lines.append(f"{'arm':<14}{'steps':>7}{'tokens':>11}{'train s':>9}{'pseudo tok/s':>14}{'real tok/s':>12}"
                 f"{'delink s':>10}{'final val':>11}")
    for a in arms:
        if not a.get("ok"):
            lines.append(f"{a['label']:<14} FAILED {a.get('error', '')[:100]}")
            continue
        ph = a["phases"]
        lines.append(f"{a['label']:<14}{a['steps']:>7}{a['tokens']:>11,}{a['train_s']:>9.1f}"
                     f"{ph.get('pseudo', {}).get('tokens_per_s', float('nan')):>14,.0f}"
                     f"{ph.get('real', {}).get('tokens_per_s', float('nan')):>12,.0f}"
                     f"{a['delink_s'] if a['delink_s'] is not None else float('nan'):>10.2f}"
                     f"{a['final_val_loss']:>11.4f}" + ("  (cut short)" if a.get("cut_short") else ""))
    return "\n".join(lines)


def plot(arms: list[dict[str, Any]], probes: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    colors = {"scratch": "tab:blue", "p2r": "tab:orange"}
    for a in arms:
        if not a.get("points"):
            continue
        kind = a["label"].split()[0]
        style = "-" if a["seed"] == 0 else "--"
        ys = [p["val_loss"] for p in a["points"]]
        axes[0].plot([p["train_s"] for p in a["points"]], ys, style, color=colors.get(kind), label=a["label"])
        axes[1].plot([p["tokens"] for p in a["points"]], ys, style, color=colors.get(kind), label=a["label"])
        if a.get("delink_at_train_s") is not None:
            axes[0].axvline(a["delink_at_train_s"], color="grey", lw=0.6, ls=":")
    finals = [a["final_val_loss"] for a in arms if a.get("ok") and a["label"].startswith("scratch")]
    if finals:
        for ax in axes[:2]:
            ax.axhline(statistics.mean(finals), color="grey", lw=0.8, ls="--", label="target (scratch mean final)")
    axes[0].set_xlabel("training time (s, evaluation excluded)")
    axes[1].set_xlabel("tokens (bytes) seen")
    for ax in axes[:2]:
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ok = [p for p in probes if p.get("ok")]
    axes[2].barh(range(len(ok)), [p["timed_tokens_per_s"] for p in ok], color="tab:green")
    axes[2].set_yticks(range(len(ok)))
    axes[2].set_yticklabels([p["label"] for p in ok], fontsize=7)
    axes[2].set_xlabel("probe tokens/s")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------- main
def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--time_budget", type=float, default=None, help="seconds for the whole script (default 520; "
                   "quick 55)")
    p.add_argument("--gpu_cap_gb", type=float, default=38.0, help="GPU memory cap (set_per_process_memory_fraction)")
    p.add_argument("--plan_fraction", type=float, default=0.9, help="gpu_memory_budget of 'plan' = this x the cap")
    p.add_argument("--max_fill", type=float, default=0.92, help="a probe whose peak allocated GPU memory passed this "
                   "share of the cap is not picked (a longer run fragments more)")
    p.add_argument("--d_model", type=int, default=2560)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=20)
    p.add_argument("--d_ff", type=int, default=6912)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=6, help="sequences per optimizer step (every arm and phase)")
    p.add_argument("--pseudo_blocks", type=int, default=2)
    p.add_argument("--pseudo_share", type=float, default=0.5, help="share of a P2R arm's training time spent pseudo")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--modes", nargs="+", default=["exact", "delayed"], help="optimizer_overlap modes to probe")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--probe_s", type=float, default=6.0, help="timed seconds per probe (after warm-up)")
    p.add_argument("--probe_share", type=float, default=0.25, help="share of the time budget for all probes")
    p.add_argument("--evals", type=int, default=12, help="evaluations per arm")
    p.add_argument("--val_batches", type=int, default=4)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (slicing a byte tensor needs none)")
    p.add_argument("--candidates", nargs="+", default=None, help="probe only these Real Giant configurations "
                   "(names as printed, e.g. 'plan+ckpt delayed')")
    p.add_argument("--reserve_s", type=float, default=15.0, help="seconds kept for the table, JSON and plot")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="tiny model on the CPU (< 60 s): exercises every phase")
    if "--quick" in (sys.argv[1:] if argv is None else argv):  # tiny defaults; explicit flags still win
        p.set_defaults(d_model=64, layers=4, heads=4, d_ff=512, seq=64, batch=4, probe_s=0.2, evals=4, val_batches=2,
                       reserve_s=3.0, probe_share=0.45, plan_fraction=1.0, time_budget=55.0)
    args = p.parse_args(argv)
    args.time_budget = args.time_budget or 520.0
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse(argv)
    out = args.out or (RESULTS.with_name("p2r_regime_quick.json") if args.quick else RESULTS)
    torch.set_float32_matmul_precision("high")
    if args.quick:
        torch.set_num_threads(1)  # tiny shapes: spinning intra-op threads only slow a shared CPU down
    meta = stamp()
    print("Decision rule (fixed before running):\n  " + RULE, flush=True)
    est = estimates(args)
    if args.quick:  # no cap on the CPU: a planning budget between the two forms, so 'plan' streams some blocks
        cap = 0.5 * (est["pseudo_resident_gpu_bytes"] + est["real_resident_ckpt_gpu_bytes"])
        if cap <= est["pseudo_resident_gpu_bytes"]:
            raise ValueError("--quick: the checkpointed Real Giant's estimate must exceed the Pseudo Giant's")
    else:
        cap = args.gpu_cap_gb * GB
    cap_applied = False
    if DEVICE == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
        cap_applied = True
    regime = {"cap_bytes": cap, "cap_applied": cap_applied, **est,
              "real_state_exceeds_cap": est["real_weights_grads_adam_bytes"] > cap,
              "pseudo_fits_estimate": est["pseudo_resident_gpu_bytes"] <= cap,
              "delink_peak_fits_estimate": est["delink_peak_bytes"] <= cap}
    log(f"cap {cap / GB:.1f} GB ({'applied' if cap_applied else 'planning only, no CUDA'}); Real Giant "
        f"{est['real_params'] / 1e9:.2f} B params, weights+grads+Adam "
        f"{est['real_weights_grads_adam_bytes'] / GB:.1f} GB, "
        f"resident estimate {est['real_resident_gpu_bytes'] / GB:.1f} GB (checkpointed "
        f"{est['real_resident_ckpt_gpu_bytes'] / GB:.1f}); Pseudo Giant {est['pseudo_params'] / 1e9:.3f} B, estimate "
        f"{est['pseudo_resident_gpu_bytes'] / GB:.1f} GB; delink peak {est['delink_peak_bytes'] / GB:.1f} GB")

    train_bytes, val_bytes = stdlib_bytes()
    if args.quick:
        train_bytes = train_bytes[:2_000_000]
    data = {"train": ByteChunks(train_bytes, args.seq)}
    val_loader = DataLoader(ByteChunks(val_bytes, args.seq), batch_size=args.batch, shuffle=True,
                            generator=torch.Generator().manual_seed(1234))
    data["val"] = [b for _, b in zip(range(args.val_batches), val_loader)]
    log(f"data: {len(train_bytes) / 1e6:.1f} MB train, {len(val_bytes) / 1e6:.1f} MB validation; "
        f"{args.batch} x {args.seq} tokens per step")

    record: dict[str, Any] = {**meta, "rule": RULE, "args": {k: str(v) if isinstance(v, Path) else v
                                                           for k, v in vars(args).items()},
                              "regime": regime, "probes": [], "arms": []}

    def save() -> None:
        record["total_s"] = elapsed()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1, default=str))

    # ---- 1. probes
    probe_end = elapsed() + args.probe_share * args.time_budget
    probe_every = 1e9
    resident = Candidate("pseudo resident", "none")
    pseudo = run("pseudo resident", args, data, resident, cap, seed=0, unique=args.pseudo_blocks,
                 train_s=args.probe_s, deadline=time.perf_counter() + args.probe_s * 4 + 30, every_s=probe_every,
                 evaluate=False, warmup_batches=3)
    record["probes"].append(pseudo)
    real_probes: list[tuple[Candidate, dict[str, Any]]] = []
    for cand in candidates(args):
        expected = max((p["wall_s"] for _, p in real_probes if p.get("ok")), default=pseudo["wall_s"])
        if elapsed() + expected > probe_end:
            row = {"label": f"real {cand.name}", "ok": False, "skipped": "probe budget spent",
                   "candidate": dataclasses.asdict(cand)}
        else:
            deadline = min(time.perf_counter() + args.probe_s * 4 + 30, STARTED + probe_end + 10)
            row = run(f"real {cand.name}", args, data, cand, cap, seed=0, unique=None, train_s=args.probe_s,
                      deadline=deadline, every_s=probe_every, evaluate=False, warmup_batches=2)
        record["probes"].append(row)
        real_probes.append((cand, row))
        save()
    ran = []
    for c, p in real_probes:  # eligible: ran, and left headroom under the cap for a longer run's fragmentation
        peak = p.get("peak_gpu_allocated_bytes")
        p["eligible"] = bool(p.get("ok")) and (peak is None or not cap_applied or peak <= args.max_fill * cap)
        if p["eligible"]:
            ran.append((c, p))
    if not pseudo.get("ok") or not ran:
        record["outcome"] = {"outcome": "INCOMPLETE", "why": "the pseudo probe or every real probe failed (or "
                                                            f"filled more than {args.max_fill:.0%} of the cap)"}
        return finish(record, out, cap, meta, save)
    best, best_probe = max(ran, key=lambda cp: cp[1]["timed_tokens_per_s"])
    best_probe["picked"] = True
    r_pseudo, r_real = pseudo["timed_tokens_per_s"], best_probe["timed_tokens_per_s"]
    record["best_real"] = {"name": best.name, "candidate": dataclasses.asdict(best), "tokens_per_s": r_real,
                           "strategy": best.strategy_kwargs(args, cap)}

    # ---- budget for the arms
    n_arms = 2 * len(args.seeds)
    per_arm = (args.time_budget - elapsed() - args.reserve_s) / n_arms
    eval_s = max(best_probe.get("eval_s_mean") or 0.0, pseudo.get("eval_s_mean") or 0.0)
    setup_s = max(best_probe["setup_s"], pseudo["setup_s"])  # the first batch counts as training time
    teardown_s = max(best_probe["wall_s"] - best_probe["setup_s"] - best_probe["train_s"]
                     - (best_probe.get("eval_s_mean") or 0.0), 1.0)
    train_s = (per_arm - setup_s - teardown_s - (args.evals + 1) * eval_s) / 1.05
    if train_s <= 0:
        record["outcome"] = {"outcome": "INCOMPLETE", "why": f"no time left for the arms ({per_arm:.1f} s each)"}
        return finish(record, out, cap, meta, save)
    delink_step = max(1, round(args.pseudo_share * train_s * r_pseudo / (args.batch * args.seq)))  # expected
    prediction = {f"worth_{w}": predicted_ratio(r_pseudo, r_real, args.pseudo_share, w) for w in (1.0, 0.7, 0.5)}
    record["budget"] = {"per_arm_wall_s": per_arm, "arm_train_s": train_s, "setup_s": setup_s,
                        "teardown_s": teardown_s, "eval_s": eval_s, "evaluations": args.evals + 1,
                        "delink_at_s": args.pseudo_share * train_s, "expected_delink_step": delink_step}
    record["prediction"] = {"pseudo_tokens_per_s": r_pseudo, "real_tokens_per_s": r_real,
                            "pseudo_speedup_per_token": r_pseudo / r_real, "pseudo_share": args.pseudo_share,
                            "time_ratio_if_a_pseudo_token_is_worth": prediction,
                            "note": "token-count model: loss depends only on tokens seen, a pseudo-phase token worth "
                                    "w real ones; the ratio is P2R's time to scratch's final loss / scratch's time"}
    log(f"best Real Giant configuration: {best.name} at {r_real:,.0f} tok/s; Pseudo Giant {r_pseudo:,.0f} tok/s "
        f"({r_pseudo / r_real:.2f}x); arms: {train_s:.1f} s of training each (wall slot {per_arm:.1f} s), delink at "
        f"{args.pseudo_share * train_s:.1f} s (about step {delink_step}); predicted time ratio (w=1 / 0.7 / 0.5): "
        + " / ".join(f"{v:.2f}" for v in prediction.values()))
    save()

    # ---- 2. arms: fixed wall slots, so a slow arm shortens the next one instead of the script overrunning
    arms_start = time.perf_counter()
    order = [(seed, kind) for seed in args.seeds for kind in ("scratch", "p2r")]
    for i, (seed, kind) in enumerate(order):
        slot_end = arms_start + (i + 1) * per_arm - teardown_s
        if slot_end - time.perf_counter() < 0.5 * per_arm:
            record["arms"].append({"label": f"{kind} seed{seed}", "seed": seed, "ok": False,
                                   "error": "skipped: its wall slot was mostly spent by the arms before it"})
            continue
        arm = run(f"{kind} seed{seed}", args, data, best, cap, seed=seed,
                  unique=None if kind == "scratch" else args.pseudo_blocks, train_s=train_s, deadline=slot_end,
                  every_s=train_s / args.evals,
                  delink_at_s=args.pseudo_share * train_s if kind == "p2r" else None)
        record["arms"].append(arm)
        save()

    # ---- 3. outcome
    record["outcome"] = decide(record["arms"])
    return finish(record, out, cap, meta, save)


def finish(record: dict[str, Any], out: Path, cap: float, meta: dict[str, Any], save: Any) -> dict[str, Any]:
    """Table, outcome lines, PNG and the final JSON (also after an early stop)."""
    save()
    print("\n" + table(record["probes"], record["arms"]))
    o = record["outcome"]
    print(f"\nOutcome under the rule: {o['outcome']}" + (f" ({o['why']})" if "why" in o else ""))
    for s in o.get("per_seed", []):
        ratio = f"{s['ratio']:.2f}" if s["ratio"] is not None else "not reached"
        print(f"  seed {s['seed']}: time to scratch's mean final loss {o['target_val_loss']:.4f}: {ratio} "
              f"x scratch's time")
    if o.get("pseudo_phase_speedup_per_token") is not None:
        print(f"  pseudo phase tokens/s / scratch tokens/s: {o['pseudo_phase_speedup_per_token']:.2f}")
    plot(record["arms"], record["probes"], out.with_suffix(".png"),
         f"Pseudo-to-Real under a {cap / GB:.0f} GB GPU cap ({meta['device']}, {meta['git_rev']}): "
         f"{o['outcome']}")
    save()
    log(f"wrote {out} and {out.with_suffix('.png')}")
    return record


if __name__ == "__main__":
    main()
