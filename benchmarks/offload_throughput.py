"""Selective CPU offload throughput on one GPU, all cases in one run (only same-run ratios count), bf16-mixed.

Cases on one ~2.6B-parameter dense model (d_model 2560, 32 blocks, SwiGLU d_ff 6912, vocab 32000, 4x2048 tokens),
each with gradient clipping off and at 1.0:
  a  all resident (Lightning's single-device strategy)
  b  every other block streamed (SelectiveOffloadStrategy, model.blocks.[1,3,...,31]): optimizer_overlap exact,
     backward and delayed (delay_warmup_steps 1), and with clipping also exact with a GPU step window (`--window`)
     and with the balanced window (`gpu_step_window: auto`)
  c  every block streamed (model.blocks.[0-31]): the same modes
  d  PyTorch FSDP2 fully_shard per block + root with CPUOffloadPolicy(pin_memory=True), world size 1
  e  the >=12B recipe: the model of configs/offload-12b.yaml (if present; else d_model 5120, 38 blocks, ~12.2B),
     placed by gpu_memory_budget, block activation checkpointing when M6Config has it, one large micro-batch, exact
     mode with the GPU step window the plan leaves (`gpu_step_window: auto`)
Per case: tokens/s, ratio to (a) at the same clipping, MFU (6NT over 989 and over the measured 790 TFLOP/s), the
time the GPU waited for the host engine (exposed host time), copy stall, PCIe bytes, engine busy time, how often
clipping scaled the gradients, peak GPU memory, host RSS, pinned bytes, and for (e) the plan's estimates beside the
measured figures; per case the engine's seconds per kernel phase (upcast, clip, Adam, downcast, ...), and once
per run a probe of those kernels' rates on the host at the engine's thread count (what bounds the engine). Writes
benchmarks/results/offload_throughput.json (stamped with git revision, torch version and
device by this script) and a PNG, and prints a table.

    python benchmarks/offload_throughput.py            # everything, one H200 (~7 min)
    python benchmarks/offload_throughput.py --quick    # a tiny version on the CPU in seconds (checks the script)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m6lit.model import M6Config, M6Model, lm_loss
from m6lit.strategies.host_engine import PHASES, HostEngine
from m6lit.strategies.sizes import format_bytes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import stamp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "offload_throughput.json"
RECIPE = ROOT / "configs" / "offload-12b.yaml"
PEAK_BF16 = 989e12  # H200 SXM dense bf16 datasheet figure
MEASURED_BF16 = 790e12  # bf16 matmul rate measured on the H200 on random data


def model_config(d_model: int = 2560, layers: int = 32, heads: int = 20, d_ff: int = 6912, seq: int = 2048,
                 vocab: int = 32000) -> M6Config:
    return M6Config(vocab_size=vocab, d_model=d_model, n_heads=heads, d_ff=d_ff, num_layers=layers,
                    moe_layers="none", max_seq_len=seq, image_size=32, patch_size=8, tie_embeddings=True)


def batches(config: M6Config, batch: int, n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(2, config.vocab_size, (batch, config.max_seq_len), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool), "labels": ids.clone(),
                    "prefix_len": torch.zeros(batch, dtype=torch.long)})
    return out


class _Cycle(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, torch.Tensor]], length: int) -> None:
        self.items, self.length = items, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i % len(self.items)]


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def host_rss() -> tuple[int, int]:
    """(current, peak) resident set size of this process in bytes."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) * 1024
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def recipe_config(quick: bool) -> tuple[M6Config, int, str]:
    """The (e) model, its micro-batch and where its shape came from."""
    if quick:
        return model_config(d_model=64, layers=4, heads=4, d_ff=128, seq=32, vocab=256), 2, "quick"
    fields = {f.name for f in dataclasses.fields(M6Config)}
    source = "default d_model 5120, 38 layers"
    overrides: dict = {}
    if RECIPE.is_file():
        import yaml

        from m6lit.model.flavors import flavor_values

        recipe = yaml.safe_load(RECIPE.read_text()) or {}
        overrides = flavor_values(recipe["flavor"]) if recipe.get("flavor") else {}  # the recipe's named model
        overrides.update(((recipe.get("model") or {}).get("config") or {}))
        source = str(RECIPE.relative_to(ROOT))
    config = model_config(d_model=5120, layers=38, heads=40, d_ff=13824)
    values = {f: getattr(config, f) for f in fields}
    values.update({k: v for k, v in overrides.items() if k in fields})
    if "activation_checkpointing" in fields and "activation_checkpointing" not in overrides:
        values["activation_checkpointing"] = "all"
    config = M6Config(**values)
    checkpointed = getattr(config, "activation_checkpointing", None) is not None
    batch = 16 if checkpointed else 2  # one large micro-batch needs block checkpointing
    return config, batch, source



def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0


def _cleanup() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def lightning_case(name: str, config: M6Config, batch: int, strategy_kwargs: dict | None, steps: int, warmup: int,
                   clip: float | None) -> dict:
    """Train `warmup + steps` optimizer steps through Lightning; time the last `steps`."""
    import lightning as L

    from m6lit.module import M6LitModule
    from m6lit.strategies import SelectiveOffloadStrategy

    _cleanup()
    torch.manual_seed(0)
    def adamw(p):
        opt = torch.optim.AdamW(p, lr=1e-4, betas=(0.9, 0.95), fused=True)
        opt._step_supports_amp_scaling = False  # bf16 has no scaler: Lightning may clip a fused AdamW's gradients
        return opt

    with torch.device(DEVICE):
        module = M6LitModule(config, warmup_steps=1, optimizer=adamw)
    params = sum(p.numel() for p in module.parameters())
    times: list[float] = []
    peak: list[int] = []
    norms: list[float] = []
    extra: dict = {}

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, b, batch_idx) -> None:
            _sync()
            self.t0 = time.perf_counter()
            if trainer.global_step == warmup:
                _cleanup()

        def on_train_batch_end(self, trainer, pl_module, outputs, b, batch_idx) -> None:
            _sync()
            if trainer.global_step > warmup:
                times.append(time.perf_counter() - self.t0)
                peak.append(_peak())
                norm = trainer.callback_metrics.get("train/grad_norm")
                if norm is not None:
                    norms.append(float(norm))
            extra["host_rss_bytes"] = host_rss()[0]  # while this case's host buffers are alive
            streamer = getattr(trainer.strategy, "streamer", None)
            if streamer is not None:
                extra["pinned_bytes"] = streamer.pinned_bytes()
                extra["host_buffer_bytes"] = streamer.host_bytes()

    strategy = SelectiveOffloadStrategy(**strategy_kwargs) if strategy_kwargs is not None else "auto"
    trainer = L.Trainer(max_steps=warmup + steps, accelerator="gpu" if DEVICE == "cuda" else "cpu", devices=1,
                        precision="bf16-mixed", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, strategy=strategy, callbacks=[Timer()], num_sanity_val_steps=0,
                        limit_val_batches=0, gradient_clip_val=clip)
    data = _Cycle(batches(config, batch), warmup + steps)
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)
    t_setup = time.perf_counter()
    trainer.fit(module, loader)
    wall = time.perf_counter() - t_setup
    tokens = batch * config.max_seq_len
    step_s = statistics.median(times)
    row = {"case": name, "params": params, "tokens_per_step": tokens, "step_s": step_s, "steps_timed": len(times),
           "step_times": times, "tokens_per_s": tokens / step_s, "peak_gpu_bytes": max(peak),
           "mfu": 6 * params * tokens / step_s / PEAK_BF16, "mfu_measured_peak": 6 * params * tokens / step_s /
           MEASURED_BF16, "wall_s": wall, "clip": clip, "host_rss_peak_bytes": host_rss()[1],
           "clip_trigger_rate": (sum(n > clip for n in norms) / len(norms)) if clip and norms else 0.0, **extra}
    if isinstance(strategy, SelectiveOffloadStrategy):
        stats = strategy.step_stats[-len(times):]
        for key in ("h2d_bytes", "d2h_bytes", "stall_s", "host_wait_s", "engine_wait_s", "engine_busy_s",
                    "refresh_s", "optimizer_s", "fetches", *(f"engine_{p}_s" for p in PHASES)):
            row[key] = statistics.mean(s.get(key, 0.0) for s in stats)
        row["pcie_bytes"] = row["h2d_bytes"] + row["d2h_bytes"]
        row["redo_units"] = strategy.redo_units
        row["speculated_units"] = strategy.speculated_units
        plan = strategy.plan
        w = strategy.gpu_step_window
        row["mode"] = strategy.optimizer_overlap + (f"+window {format_bytes(w) if isinstance(w, int) else w}"
                                                     if w else "")
        row["window_units"] = strategy.window_units
        row["window_params"] = strategy.window_params
        row["window_scores"] = dict(strategy.window_scores)
        row["offloaded_params"] = plan.estimate.offloaded_params if plan else None
        row["estimated_gpu_bytes"] = plan.estimate.gpu_total if plan else None
        row["estimated_host_bytes"] = plan.estimate.host_total if plan else None
        row["estimated_pinned_bytes"] = plan.estimate.pinned if plan else None
    del trainer, module
    _cleanup()
    return row


def fsdp2_case(config: M6Config, batch: int, steps: int, warmup: int, clip: float | None) -> dict:
    """FSDP2 with CPU offload on one GPU (world size 1), same model and batch, raw training loop."""
    import torch.distributed as dist
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        fully_shard,
    )

    _cleanup()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = M6Model(config)
    params = sum(p.numel() for p in model.parameters())
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=True)
    for block in model.blocks:
        fully_shard(block, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mp_policy=mp, offload_policy=offload)
    _cleanup()
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
        fused = True
    except Exception:  # noqa: BLE001 - fall back to what this build supports on CPU DTensors
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), foreach=True)
        fused = False
    data = [{k: v.cuda() for k, v in b.items()} for b in batches(config, batch)]
    times: list[float] = []
    norms: list[torch.Tensor] = []
    for step in range(warmup + steps):
        b = data[step % len(data)]
        if step == warmup:
            torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(b)
        loss = lm_loss(out.logits, b["labels"]) + out.aux_loss
        loss.backward()
        if clip:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    tokens = batch * config.max_seq_len
    step_s = statistics.median(times)
    row = {"case": "d", "params": params, "tokens_per_step": tokens, "step_s": step_s, "steps_timed": len(times),
           "step_times": times, "tokens_per_s": tokens / step_s, "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
           "mfu": 6 * params * tokens / step_s / PEAK_BF16, "mfu_measured_peak": 6 * params * tokens / step_s /
           MEASURED_BF16, "fused_optimizer": fused, "clip": clip, "host_rss_bytes": host_rss()[0],
           "host_rss_peak_bytes": host_rss()[1],
           "clip_trigger_rate": sum(float(n.full_tensor() if hasattr(n, "full_tensor") else n) > clip
                                    for n in norms[warmup:]) / max(len(norms[warmup:]), 1) if clip else 0.0}
    del model, optimizer
    _cleanup()
    return row


def host_probe(n: int) -> dict:
    """Rates of the engine's kernels on `n`-element fp32/bf16 tensors, on a thread with the engine's default thread
    count, as the engine runs them: the bf16 -> fp32 gradient upcast, the clip multiply, the fused AdamW step and the
    fp32 -> bf16 stream copy (elements per second and the DRAM bytes they move)."""
    import threading

    from torch.optim.adam import adam

    threads = HostEngine().threads
    out: dict = {"threads": threads, "elements": n}

    def run() -> None:
        torch.set_num_threads(threads)
        master, grad, m, v = torch.randn(n), torch.randn(n), torch.zeros(n), torch.zeros(n)
        low, coef, step = torch.randn(n).bfloat16(), torch.tensor(0.7), torch.zeros(())

        def adamw() -> None:
            adam([master], [grad], [m], [v], [], [step], foreach=False, capturable=False, differentiable=False,
                 fused=True, grad_scale=None, found_inf=None, has_complex=False, decoupled_weight_decay=True,
                 amsgrad=False, beta1=0.9, beta2=0.95, lr=1e-4, weight_decay=0.1, eps=1e-8, maximize=False)

        kernels = {"upcast": (lambda: grad.copy_(low), 6), "clip": (lambda: grad.mul_(coef), 8),
                   "adam": (adamw, 28), "downcast": (lambda: low.copy_(master), 6),
                   "copy_fp32": (lambda: grad.copy_(master), 8)}
        for name, (fn, nbytes) in kernels.items():
            fn()
            t0 = time.perf_counter()
            reps = 5
            for _ in range(reps):
                fn()
            dt = (time.perf_counter() - t0) / reps
            out[name] = {"ns_per_element": dt / n * 1e9, "gb_per_s": n * nbytes / dt / 1e9}
        out["exact_step_ns_per_param"] = sum(out[k]["ns_per_element"] for k in ("upcast", "clip", "adam", "downcast"))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return out


def probe_table(probe: dict) -> str:
    lines = [f"host kernels ({probe['threads']} threads, {probe['elements'] / 1e6:.0f} M elements): "
             + ", ".join(f"{k} {probe[k]['ns_per_element']:.3f} ns/elem ({probe[k]['gb_per_s']:.0f} GB/s)"
                         for k in ("upcast", "clip", "adam", "downcast", "copy_fp32")),
             f"  => one exact step with clipping of a bf16-streamed parameter: {probe['exact_step_ns_per_param']:.3f} "
             f"ns/param ({1 / probe['exact_step_ns_per_param']:.2f} G params/s)"]
    return "\n".join(lines)


def phase_table(results: dict) -> str:
    """Where each case's engine time goes (seconds per step) and its rate per offloaded parameter."""
    lines = [f"{'engine profile (s/step)':<34} {'busy':>6} " + " ".join(f"{p:>10}" for p in PHASES) + f" {'ns/param':>8}"]
    for name, r in results.items():
        if not r.get("engine_busy_s"):
            continue
        stepped = (r.get("offloaded_params") or 0) - (r.get("window_params") or 0)
        rate = f"{r['engine_busy_s'] / stepped * 1e9:>8.3f}" if stepped > 0 else f"{'-':>8}"
        lines.append(f"{name:<34} {r['engine_busy_s']:>6.3f} "
                     + " ".join(f"{r.get(f'engine_{p}_s', 0.0):>10.3f}" for p in PHASES) + f" {rate}")
    return "\n".join(lines)


LABELS = {"a": "(a) all resident", "b": "(b) every other block streamed", "c": "(c) all blocks streamed",
          "d": "(d) FSDP2 + CPUOffloadPolicy", "e": "(e) >=12B recipe"}


def key(case: str, mode: str | None, clip: float | None) -> str:
    return f"{case}:{mode or '-'}:clip={clip or 0}"


def table(results: dict) -> str:
    header = (f"{'case':<32} {'mode':<8} {'clip':>4} {'params':>7} {'tok/s':>8} {'vs a':>5} {'MFU989':>6} "
              f"{'MFU790':>6} {'exposed':>7} {'stall':>6} {'engine':>6} {'PCIe GB':>7} {'clip%':>5} {'GPU GB':>6} "
              f"{'RSS GB':>6} {'pin GB':>6}")
    lines = [header]
    for name, r in results.items():
        if "error" in r or "skipped" in r:
            lines.append(f"{name}: {'FAILED ' + r['error'][:160] if 'error' in r else 'skipped: ' + r['skipped']}")
            continue
        base = results.get(key("a", None, r.get("clip")), {}).get("tokens_per_s")
        ratio = f"{r['tokens_per_s'] / base:.2f}" if base else "-"
        lines.append(
            f"{LABELS[r['case']]:<32} {r.get('mode') or '-':<8} {r.get('clip') or 0:>4} {r['params'] / 1e9:>6.2f}B "
            f"{r['tokens_per_s']:>8.0f} {ratio:>5} {r['mfu']:>6.1%} {r['mfu_measured_peak']:>6.1%} "
            f"{r.get('engine_wait_s', 0.0):>7.3f} {r.get('stall_s', 0.0):>6.3f} {r.get('engine_busy_s', 0.0):>6.3f} "
            f"{r.get('pcie_bytes', 0.0) / 1e9:>7.2f} {r.get('clip_trigger_rate', 0.0):>5.0%} "
            f"{r['peak_gpu_bytes'] / 1e9:>6.1f} {r.get('host_rss_bytes', 0) / 1e9:>6.1f} "
            f"{r.get('pinned_bytes', 0) / 1e9:>6.2f}")
        if r["case"] == "e" and r.get("estimated_gpu_bytes"):
            lines.append(f"    plan: GPU {r['estimated_gpu_bytes'] / 1e9:.1f} GB (measured peak "
                         f"{r['peak_gpu_bytes'] / 1e9:.1f}), host {r['estimated_host_bytes'] / 1e9:.1f} GB (measured "
                         f"RSS {r['host_rss_bytes'] / 1e9:.1f}), pinned {r['estimated_pinned_bytes'] / 1e9:.2f}"
                         f" GB (measured {r.get('pinned_bytes', 0) / 1e9:.2f}); shape from {r.get('shape_from')}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, r) for name, r in results.items() if "tokens_per_s" in r]
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    names = [name.replace(":clip=", "\nclip ") for name, _ in rows]
    axes[0].bar(range(len(rows)), [r["tokens_per_s"] for _, r in rows], color="tab:blue")
    axes[0].set_ylabel("tokens / s")
    axes[1].bar(range(len(rows)), [r["mfu"] * 100 for _, r in rows], color="tab:green")
    axes[1].set_ylabel("MFU (% of 989 TFLOP/s)")
    for ax in axes:
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=70, fontsize=6)
    fig.suptitle(f"offload throughput ({results_device(results)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def results_device(results: dict) -> str:
    return next((r.get("device", "?") for r in results.values()), "?")


def runs(layers: int, quick: bool) -> list[tuple[str, str | None, float | None]]:
    """(case, mode, clip) in the order they run: the baselines, the 12B recipe and the cases the goals compare (so
    the time budget never skips them), then the rest."""
    first: list[tuple[str, str | None, float | None]] = [
        ("a", None, None), ("a", None, 1.0), ("e", "exact", 1.0), ("b", "exact", 1.0), ("b", "window-auto", 1.0),
        ("c", "exact", 1.0), ("c", "window-auto", 1.0), ("d", None, 1.0)]
    rest = [(case, mode, clip) for clip in (None, 1.0) for case in "bcd"
            for mode in ((None,) if case == "d" else ("exact", "backward", "delayed") + (("window",) if clip else ()))]
    return first + [r for r in rest if r not in first]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--e_budget", default="130GB")
    parser.add_argument("--window", default="60GB", help="gpu_step_window of the (b)/(c) 'window' runs")
    parser.add_argument("--only", default="abcde", help="cases to run (default all)")
    parser.add_argument("--keys", nargs="+", default=None, help="only these runs, by key (e.g. c:window-auto:clip=1.0)")
    parser.add_argument("--search_warmup", type=int, default=12,
                        help="warm-up steps of the window-auto runs (gpu_step_window auto tries 5 sizes, 2 steps each)")
    parser.add_argument("--time_budget", type=float, default=540.0,
                        help="seconds; a case that would start later than this minus 45 s is skipped and recorded")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="a tiny model on the CPU in seconds (checks the script)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.batch = 1, 1, 2
    out = args.out or (RESULTS.with_name("offload_throughput_quick.json") if args.quick else RESULTS)
    config = model_config(d_model=64, layers=4, heads=4, d_ff=128, seq=32, vocab=256) if args.quick else model_config()
    layers = config.num_layers
    plans = {"b": [f"model.blocks.[{','.join(str(i) for i in range(1, layers, 2))}]"],
             "c": [f"model.blocks.[0-{layers - 1}]"]}
    results: dict = {}
    started = time.perf_counter()
    meta = stamp()
    probe = host_probe(1 << 20 if args.quick else 1 << 27)
    print(probe_table(probe), flush=True)
    todo = [r for r in runs(layers, args.quick) if r[0] in args.only and (args.keys is None or key(*r) in args.keys)]
    for n, (case, mode, clip) in enumerate(todo):
        name = key(case, mode, clip)
        if time.perf_counter() - started > args.time_budget - 45 and not args.quick:
            results[name] = {"case": case, "skipped": f"time budget {args.time_budget:.0f} s spent", "mode": mode}
            continue
        print(f"--- [{n + 1}/{len(todo)}] {name} ({time.perf_counter() - started:.0f} s so far)", flush=True)
        try:
            if case == "a":
                row = lightning_case(case, config, args.batch, None, args.steps, args.warmup, clip)
            elif case in plans:
                window = {"optimizer_overlap": "exact", "gpu_step_window": "auto" if mode == "window-auto" else
                          args.window} if mode.startswith("window") else {"optimizer_overlap": mode,
                                                                          "delay_warmup_steps": 1}
                warmup = args.search_warmup if mode == "window-auto" else args.warmup
                row = lightning_case(case, config, args.batch, {"offload": plans[case], "prefetch": args.prefetch,
                                                                **window},
                                     args.steps, warmup, clip)
            elif case == "d":
                if DEVICE != "cuda":
                    row = {"case": case, "skipped": "FSDP2 + CPUOffloadPolicy needs CUDA"}
                else:
                    row = fsdp2_case(config, args.batch, args.steps, args.warmup, clip)
            else:
                big, batch, source = recipe_config(args.quick)
                budget = None if args.quick else args.e_budget
                kwargs = {"gpu_memory_budget": budget, "prefetch": args.prefetch, "optimizer_overlap": mode,
                          "micro_batch_tokens": batch * big.max_seq_len, "gpu_step_window": "auto"} if budget else {
                          "offload": ["model.blocks.[1-2]"], "optimizer_overlap": mode}
                row = lightning_case("e", big, batch, kwargs, args.steps, args.warmup, clip)
                row.update({"gpu_memory_budget": budget, "shape_from": source,
                            "activation_checkpointing": getattr(big, "activation_checkpointing", None)})
        except Exception as err:  # noqa: BLE001 - record the failure and go on with the other cases
            traceback.print_exc()
            row = {"case": case, "error": f"{type(err).__name__}: {err}"}
            _cleanup()
        row.update({"device": meta["device"], "torch": meta["torch"], "mode": row.get("mode", mode)})
        results[name] = row
        print(json.dumps({k: v for k, v in row.items() if k != "step_times"}, default=str), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**meta, "total_s": time.perf_counter() - started, "host_probe": probe,
                                   "cases": results}, indent=1, default=str))
    plot(results, out.with_suffix(".png"))
    print(table(results))
    print(phase_table(results))
    print(probe_table(probe))
    print(f"total {time.perf_counter() - started:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
