"""Selective CPU offload throughput on one GPU: tokens/s and peak GPU memory, bf16-mixed.

Cases on one ~2.6B-parameter dense model (d_model 2560, 32 blocks, SwiGLU d_ff 6912, vocab 32000, 4×2048 tokens):
  a  all resident (Lightning's single-device strategy)
  b  every other block streamed (SelectiveOffloadStrategy, model.blocks.[1,3,...,31])
  c  every block streamed (model.blocks.[0-31])
  d  PyTorch FSDP2 fully_shard per block + root with CPUOffloadPolicy(pin_memory=True), bf16 params, fused AdamW
and
  e  a larger model placed by the automatic plan (gpu_memory_budget) on 1 GPU + host memory.
Each case runs `--warmup` steps, then times `--steps` steps (synchronised per step); offload cases also report the
strategy's per-step counters (H2D/D2H bytes, time the compute waited for copies, host-side optimizer time).
Results merge into benchmarks/results/offload_throughput.json (a rerun of some cases keeps the others); a PNG and
a table are written from the merged file.

    python benchmarks/offload_throughput.py --cases abcd [--steps 4] [--warmup 2]
    python benchmarks/offload_throughput.py --cases e --e_layers 32 --e_d_model 5120 --e_budget 130GB
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m6lit.model import M6Config, M6Model, lm_loss

RESULTS = Path(__file__).resolve().parent / "results" / "offload_throughput.json"
PEAK_BF16 = 989e12  # H200 SXM dense bf16 datasheet figure (a lead); 790e12 was measured on random data


def model_config(d_model: int = 2560, layers: int = 32, heads: int = 20, d_ff: int = 6912, seq: int = 2048) -> M6Config:
    return M6Config(vocab_size=32000, d_model=d_model, n_heads=heads, d_ff=d_ff, num_layers=layers,
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
                   accumulate: int = 1) -> dict:
    """Train `warmup + steps` optimizer steps through Lightning; time the last `steps`."""
    import lightning as L

    from m6lit.module import M6LitModule
    from m6lit.strategies import SelectiveOffloadStrategy

    _cleanup()
    torch.manual_seed(0)
    with torch.device(DEVICE):
        module = M6LitModule(config, warmup_steps=1,
                             optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4, betas=(0.9, 0.95), fused=True))
    params = sum(p.numel() for p in module.parameters())
    times: list[float] = []
    peak: list[int] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, b, batch_idx) -> None:
            if batch_idx % accumulate == 0:
                _sync()
                self.t0 = time.perf_counter()
                if trainer.global_step == warmup:
                    _cleanup()

        def on_train_batch_end(self, trainer, pl_module, outputs, b, batch_idx) -> None:
            if (batch_idx + 1) % accumulate == 0:
                _sync()
                if trainer.global_step > warmup:
                    times.append(time.perf_counter() - self.t0)
                    peak.append(_peak())

    strategy = SelectiveOffloadStrategy(**strategy_kwargs) if strategy_kwargs is not None else "auto"
    trainer = L.Trainer(max_steps=warmup + steps, accelerator="gpu" if DEVICE == "cuda" else "cpu", devices=1, precision="bf16-mixed", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        strategy=strategy, callbacks=[Timer()], accumulate_grad_batches=accumulate,
                        num_sanity_val_steps=0, limit_val_batches=0)
    data = _Cycle(batches(config, batch), (warmup + steps) * accumulate)
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)
    t_setup = time.perf_counter()
    trainer.fit(module, loader)
    wall = time.perf_counter() - t_setup
    tokens = batch * config.max_seq_len * accumulate
    step_s = statistics.median(times)
    row = {"case": name, "params": params, "tokens_per_step": tokens, "step_s": step_s, "steps_timed": len(times),
           "step_times": times, "tokens_per_s": tokens / step_s, "peak_gpu_bytes": max(peak),
           "mfu": 6 * params * tokens / step_s / PEAK_BF16, "wall_s": wall, "accumulate_grad_batches": accumulate}
    if isinstance(strategy, SelectiveOffloadStrategy):
        stats = strategy.step_stats[-len(times):]
        for key in ("h2d_bytes", "d2h_bytes", "stall_s", "host_wait_s", "accumulate_s", "refresh_s", "optimizer_s",
                    "fetches"):
            row[key] = statistics.mean(s[key] for s in stats)
        plan = strategy.plan
        row["offloaded_params"] = plan.estimate.offloaded_params if plan else None
        row["offload"] = plan.offload if plan else None
        row["estimated_gpu_bytes"] = plan.estimate.gpu_total if plan else None
    del trainer, module
    _cleanup()
    return row


def fsdp2_case(config: M6Config, batch: int, steps: int, warmup: int) -> dict:
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
    times = []
    for step in range(warmup + steps):
        b = data[step % len(data)]
        if step == warmup:
            torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(b)
        loss = lm_loss(out.logits, b["labels"]) + out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    tokens = batch * config.max_seq_len
    step_s = statistics.median(times)
    row = {"case": "d", "params": params, "tokens_per_step": tokens, "step_s": step_s, "steps_timed": len(times),
           "step_times": times, "tokens_per_s": tokens / step_s, "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
           "mfu": 6 * params * tokens / step_s / PEAK_BF16, "fused_optimizer": fused}
    del model, optimizer
    _cleanup()
    return row


def host_case(numel: int = 1_268_858_880, pieces: int = 16) -> dict:
    """Host-side ceilings for the offloaded state: fused CPU AdamW, the bf16→fp32 gradient upcast, the fp32→bf16
    stream-copy cast and a gradient norm, each over `numel` parameters in `pieces` tensors (median of 3)."""
    n = numel // pieces
    p = [torch.randn(n) for _ in range(pieces)]
    g = [torch.randn(n) for _ in range(pieces)]
    b = [torch.empty(n, dtype=torch.bfloat16) for _ in range(pieces)]
    params = [torch.nn.Parameter(t) for t in p]
    for q, gr in zip(params, g):
        q.grad = gr
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    opt.step()

    def timed(fn) -> float:
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        return statistics.median(runs)

    total = n * pieces
    adam = timed(opt.step)
    up = timed(lambda: [x.copy_(y) for x, y in zip(g, b)])
    down = timed(lambda: [y.copy_(x) for x, y in zip(p, b)])
    norm = timed(lambda: torch.nn.utils.get_total_norm(g))
    row = {"case": "h", "params": total, "threads": torch.get_num_threads(),
           "adamw_params_per_s": total / adam, "upcast_params_per_s": total / up,
           "downcast_params_per_s": total / down, "norm_params_per_s": total / norm}
    return row


LABELS = {"h": "host ceilings", "a": "(a) all resident", "b": "(b) every other block streamed", "c": "(c) all blocks streamed",
          "d": "(d) FSDP2 + CPUOffloadPolicy", "e": "(e) auto plan, larger model"}


def table(results: dict) -> str:
    rows = [results[k] for k in "abcde" if k in results and "error" not in results[k]]
    base = results.get("a", {}).get("tokens_per_s")
    header = (f"{'case':<34} {'params':>7} {'tok/step':>8} {'step s':>7} {'tok/s':>8} {'vs a':>5} {'MFU':>5} "
              f"{'peak GPU':>9} {'stall s':>7} {'opt s':>6}")
    lines = [header]
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base:.2f}" if base else "-"
        lines.append(f"{LABELS[r['case']]:<34} {r['params'] / 1e9:>6.2f}B {r['tokens_per_step']:>8} "
                     f"{r['step_s']:>7.3f} {r['tokens_per_s']:>8.0f} {ratio:>5} {r['mfu']:>5.1%} "
                     f"{r['peak_gpu_bytes'] / 1e9:>7.1f}GB {r.get('stall_s', float('nan')):>7.3f} "
                     f"{r.get('optimizer_s', float('nan')):>6.3f}")
        if "accumulate_s" in r:
            lines.append(f"    host per step: wait for gradient copies {r['host_wait_s']:.3f} s, accumulate "
                         f"{r['accumulate_s']:.3f} s, bf16 re-copy {r['refresh_s']:.3f} s, norm+clip+optimizer "
                         f"{r['optimizer_s']:.3f} s; H2D {r['h2d_bytes'] / 1e9:.2f} GB, D2H {r['d2h_bytes'] / 1e9:.2f} GB")
    if "h" in results and "error" not in results["h"]:
        h = results["h"]
        lines.append(f"host ({h['threads']} threads): fused CPU AdamW {h['adamw_params_per_s'] / 1e9:.2f} G params/s, "
                     f"bf16→fp32 {h['upcast_params_per_s'] / 1e9:.2f} G/s, fp32→bf16 "
                     f"{h['downcast_params_per_s'] / 1e9:.2f} G/s, grad norm {h['norm_params_per_s'] / 1e9:.2f} G/s")
    for k in "abcdeh":
        if k in results and "error" in results[k]:
            lines.append(f"{LABELS[k]}: FAILED {results[k]['error'][:200]}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [results[k] for k in "abcde" if k in results and "error" not in results[k]]
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [LABELS[r["case"]].split(")")[0] + ")" for r in rows]
    axes[0].bar(names, [r["tokens_per_s"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("tokens / s")
    axes[0].set_title("throughput (bf16-mixed, 1 H200)")
    axes[1].bar(names, [r["peak_gpu_bytes"] / 1e9 for r in rows], color="tab:orange")
    axes[1].set_ylabel("peak GPU memory (GB)")
    axes[1].set_title("peak GPU memory")
    for ax, key in ((axes[0], "tokens_per_s"), (axes[1], "peak_gpu_bytes")):
        for i, r in enumerate(rows):
            value = r[key] if key == "tokens_per_s" else r[key] / 1e9
            ax.text(i, value, f"{value:,.0f}" if key == "tokens_per_s" else f"{value:.0f}", ha="center",
                    va="bottom", fontsize=8)
    fig.suptitle(", ".join(f"{n}: {r['params'] / 1e9:.1f}B" for n, r in zip(names, rows)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="abcd")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--e_d_model", type=int, default=5120)
    parser.add_argument("--e_layers", type=int, default=32)
    parser.add_argument("--e_batch", type=int, default=2)
    parser.add_argument("--e_budget", default="130GB")
    parser.add_argument("--e_accumulate", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on any device (checks the script itself)")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results = results.get("cases", results) if isinstance(results, dict) else {}
    config = model_config(d_model=64, layers=4, heads=4, d_ff=128, seq=64) if args.tiny else model_config()
    layers = config.num_layers
    plans = {"a": None, "b": {"offload": [f"model.blocks.[{','.join(str(i) for i in range(1, layers, 2))}]"],
                              "prefetch": args.prefetch},
             "c": {"offload": [f"model.blocks.[0-{layers - 1}]"], "prefetch": args.prefetch}}
    for case in args.cases:
        print(f"--- case {case}", flush=True)
        try:
            if case in plans:
                row = lightning_case(case, config, args.batch, plans[case], args.steps, args.warmup)
            elif case == "d":
                row = fsdp2_case(config, args.batch, args.steps, args.warmup)
            elif case == "h":
                row = host_case(4096 * 16 if args.tiny else 1_268_858_880)
            elif case == "e":
                big = config if args.tiny else model_config(
                    d_model=args.e_d_model, layers=args.e_layers, heads=args.e_d_model // 128,
                    d_ff=int(args.e_d_model * 2.7) // 256 * 256)
                row = lightning_case("e", big, args.e_batch, {"gpu_memory_budget": args.e_budget,
                                                               "prefetch": args.prefetch,
                                                               "micro_batch_tokens": args.e_batch * big.max_seq_len},
                                     args.steps, args.warmup, accumulate=args.e_accumulate)
                row["gpu_memory_budget"] = args.e_budget
            else:
                raise ValueError(f"unknown case {case!r}")
        except Exception as err:  # noqa: BLE001 - record the failure and go on with the other cases
            traceback.print_exc()
            row = {"case": case, "error": f"{type(err).__name__}: {err}"}
            _cleanup()
        row["device"] = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
        row["torch"] = torch.__version__
        results[case] = row
        print(json.dumps({k: v for k, v in row.items() if k != "step_times"}, default=str), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"host": platform.node(), "cases": results}, indent=1, default=str))
    plot(results, args.out.with_suffix(".png"))
    print(table(results))


if __name__ == "__main__":
    main()
