"""MoE layer fwd+bwd time ÷ a dense SwiGLU FFN with equal active FLOPs (bf16, one GPU).

For each (d_model, experts, top_k, expert d_ff) the dense FFN has hidden size k·d_ff, so both do
18·T·D·k·F FLOPs per forward+backward. Also timed: a naive loop over experts with boolean-mask gathers (the
common reference implementation). Prints a table and writes benchmarks/results/moe_layer.json.

    python benchmarks/moe_layer.py [--tokens 16384] [--compile] [--profile] [--out benchmarks/results/moe_layer.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m6lit.model.block import SwiGLU  # noqa: E402
from m6lit.model.moe import MoELayer, init_moe_  # noqa: E402

CONFIGS = [
    # name, d_model, experts, top_k, expert d_ff
    ("coarse 8e top-2", 4096, 8, 2, 7168),
    ("mid 32e top-4", 2048, 32, 4, 1408),
    ("fine 128e top-8", 2048, 128, 8, 768),
]


class LoopMoE(nn.Module):
    """Reference: per-expert Python loop with boolean-mask token selection (host syncs, no grouping)."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        _, _, ids, gates = self.layer.router(x2)
        ex = self.layer.experts
        y = torch.zeros_like(x2, dtype=torch.float32)
        for e in range(ex.num_experts):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            h = x2[tok]
            h = F.linear(F.silu(F.linear(h, ex.w_gate[e])) * F.linear(h, ex.w_up[e]), ex.w_down[e])
            y.index_add_(0, tok, h.float() * gates[tok, slot, None])
        return y.to(x.dtype).view(shape)


def bench(fn, x: torch.Tensor, grad: torch.Tensor, iters: int, warmup: int = 3) -> float:
    """Median ms of forward+backward, timed with CUDA events."""
    for _ in range(warmup):
        out = fn(x)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)
    times = []
    for _ in range(iters):
        x.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(x)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def profile_top(fn, x: torch.Tensor, grad: torch.Tensor, top: int = 15) -> list[dict]:
    """The `top` CUDA kernels by total device time over 5 forward+backward passes (ms per pass)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        out = fn(x)
        (out[0] if isinstance(out, tuple) else out).backward(grad)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            out = fn(x)
            (out[0] if isinstance(out, tuple) else out).backward(grad)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    return [{"kernel": e.key[:90], "ms_per_pass": e.device_time_total / 5 / 1e3, "calls_per_pass": e.count / 5}
            for e in events[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--loop-iters", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd MoE and dense")
    parser.add_argument("--profile", action="store_true", help="record the top CUDA kernels of MoE and dense")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_layer.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("moe_layer.py needs a CUDA GPU (bf16 grouped_mm); nothing to measure on this machine")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    dt = torch.bfloat16
    rows = []
    for name, d, e, k, f in CONFIGS:
        moe = MoELayer(d, f, e, k).to(dev)
        init_moe_(moe, 0.02, 0.02)
        moe.experts.to(dt)
        dense = SwiGLU(d, k * f).to(dev, dt)
        for lin in (dense.w_gate, dense.w_up, dense.w_down):
            nn.init.normal_(lin.weight, std=0.02)
        x = torch.randn(args.tokens, d, device=dev, dtype=dt, requires_grad=True)
        grad = torch.randn(args.tokens, d, device=dev, dtype=dt)
        flops = 18 * args.tokens * d * k * f
        t_dense = bench(dense, x, grad, args.iters)
        t_moe = bench(moe, x, grad, args.iters)
        with torch.no_grad():
            _, aux = moe(x)
        load = aux.expert_counts.float()
        t_loop = bench(LoopMoE(moe), x, grad, args.loop_iters, warmup=1)
        row = {"config": name, "d_model": d, "experts": e, "top_k": k, "expert_d_ff": f, "tokens": args.tokens,
               "dense_ms": t_dense, "moe_ms": t_moe, "loop_ms": t_loop, "ratio": t_moe / t_dense,
               "loop_ratio": t_loop / t_dense, "dense_tflops": flops / t_dense / 1e9,
               "moe_tflops": flops / t_moe / 1e9, "max_over_mean_load": float(load.max() / load.mean())}
        if args.compile:
            c_dense = torch.compile(dense)
            c_moe = torch.compile(moe)
            row["dense_compiled_ms"] = bench(c_dense, x, grad, args.iters, warmup=5)
            row["moe_compiled_ms"] = bench(c_moe, x, grad, args.iters, warmup=5)
            row["compiled_ratio"] = row["moe_compiled_ms"] / row["dense_compiled_ms"]
        if args.profile:
            row["moe_profile"] = profile_top(moe, x, grad)
            row["dense_profile"] = profile_top(dense, x, grad)
            print(f"-- {name}: top MoE kernels (ms per fwd+bwd)")
            for item in row["moe_profile"]:
                print(f"  {item['ms_per_pass']:8.3f}  x{item['calls_per_pass']:<4.0f} {item['kernel']}")
        rows.append(row)
        print(f"done {name}: R={row['ratio']:.2f}", flush=True)
        del moe, dense, x, grad
        torch.cuda.empty_cache()

    header = f"{'config':<18}{'dense ms':>10}{'TF/s':>7}{'MoE ms':>9}{'TF/s':>7}{'R':>6}{'loop ms':>10}{'R loop':>8}"
    if args.compile:
        header += f"{'R compiled':>12}"
    print(header)
    for r in rows:
        line = (f"{r['config']:<18}{r['dense_ms']:>10.2f}{r['dense_tflops']:>7.0f}{r['moe_ms']:>9.2f}"
                f"{r['moe_tflops']:>7.0f}{r['ratio']:>6.2f}{r['loop_ms']:>10.1f}{r['loop_ratio']:>8.2f}")
        if args.compile:
            line += f"{r['compiled_ratio']:>12.2f}"
        print(line)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "dtype": "bfloat16", "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "iters": args.iters,
            "note": "R = MoE fwd+bwd time / dense SwiGLU (hidden k*d_ff) fwd+bwd time; median of CUDA-event timings"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
