"""Training throughput end to end on one GPU: the real Trainer path against a plain-PyTorch GPT anchor.

Cases (same tokens per optimizer step: `--batch` rows of `--seq` text tokens, fully causal, bf16-mixed):
  dense    ~1.3 B dense M6 model (d_model 2048, 24 layers, 16 heads of 128, SwiGLU 5632, vocab 32000)
  moe      the same trunk with MoE on every other layer (8 experts, top-2, expert width 2816: ~1.2 B active of
           ~2.5 B parameters), the Real Giant
  pseudo   that MoE model as a Pseudo Giant: its 24 layers on 2 shared blocks (one dense, one MoE), with the
           PseudoToReal callback attached (delink after the run)
  gpt      a plain-PyTorch GPT of the dense shapes: SDPA with is_causal (FlashAttention), fused AdamW, no Lightning
  dense_compiled   optional: the dense case with `compile_blocks=True`
  images   optional: the dense model on demo image-text batches at 224 px through ImageTextDataModule (8 workers)
The M6 cases run M6LitModule + a LightningDataModule + callbacks under `Trainer(precision="bf16-mixed")` with the
module's default AdamW (lr 3e-4, wd 0.1); the anchor uses `AdamW(fused=True)` with the same settings.

Per case: `--warmup` steps, then `--steps` timed steps between two synchronisations; CUDA events recorded in the
hooks (no sync) split a step into forward, backward, optimizer and the rest (data, logging, hooks). MFU uses the
model's FLOPs formula (`m6lit.model.flops`, attention included, active parameters for MoE) against 989 TFLOP/s (H200
dense bf16 datasheet) and 790 TFLOP/s (a measured 8192³ bf16 matmul on the H200). Results go to
benchmarks/results/train_throughput.json (stamped with git revision, torch version and device) with a PNG; the run
stops starting new cases after `--budget` seconds.

    python benchmarks/train_throughput.py                     # H200: gpt dense moe pseudo, < 4 min
    python benchmarks/train_throughput.py --cases dense gpt dense_compiled images
    python benchmarks/train_throughput.py --quick             # tiny shapes on the CPU (checks the script)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m6lit.model import M6Config  # noqa: E402
from m6lit.model.flops import training_flops, training_flops_per_token  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import stamp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PEAK_DATASHEET = 989e12
PEAK_MEASURED = 790e12
DEFAULT_CASES = ("gpt", "dense", "moe", "pseudo")
ALL_CASES = DEFAULT_CASES + ("dense_compiled", "images")


# ------------------------------------------------------------------------------------------------ shapes
def configs(quick: bool, seq: int) -> dict[str, M6Config]:
    if quick:
        trunk = dict(vocab_size=256, d_model=64, n_heads=4, d_ff=176, num_layers=4, max_seq_len=seq,
                     image_size=32, patch_size=8)
        expert = 88
    else:
        trunk = dict(vocab_size=32000, d_model=2048, n_heads=16, d_ff=5632, num_layers=24, max_seq_len=max(seq, 512),
                     image_size=224, patch_size=16)
        expert = 2816
    moe = dict(trunk, moe_layers=2, num_experts=8, top_k=2, expert_d_ff=expert)
    return {"dense": M6Config(**trunk, moe_layers="none"), "moe": M6Config(**moe),
            "pseudo": M6Config(**moe, num_unique_blocks=2, sharing_layout="cycle")}


# ------------------------------------------------------------------------------------------------ timing
class StepClock:
    """CUDA events (or host clocks on the CPU) at the step's phase boundaries; read once at the end."""

    PHASES = ("start", "backward", "after_backward", "optimizer", "end")

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.steps: list[dict[str, Any]] = []

    def mark(self, phase: str) -> None:
        if phase == "start":
            self.steps.append({})
        if not self.steps:
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.steps[-1][phase] = event
        else:
            self.steps[-1][phase] = time.perf_counter()

    def breakdown(self, skip: int) -> dict[str, float]:
        """Mean seconds per phase over the steps after the first `skip`: forward (start → backward), backward,
        optimizer (from on_before_optimizer_step, clipping and hooks included, to the batch end) and other (the
        gap to the next step's start: data, logging, hooks)."""
        def span(a: Any, b: Any) -> float:
            return a.elapsed_time(b) / 1e3 if self.cuda else b - a

        rows = self.steps[skip:]
        out = {"forward_s": 0.0, "backward_s": 0.0, "optimizer_s": 0.0, "other_s": 0.0}
        n = 0
        for i, s in enumerate(rows[:-1]):
            if not all(p in s for p in ("start", "backward", "after_backward", "end")):
                continue
            n += 1
            out["forward_s"] += span(s["start"], s["backward"])
            out["backward_s"] += span(s["backward"], s["after_backward"])
            out["optimizer_s"] += span(s.get("optimizer", s["after_backward"]), s["end"])
            out["other_s"] += span(s["end"], rows[i + 1]["start"])
        return {k: v / max(n, 1) for k, v in out.items()}


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ M6 cases
def text_batches(vocab: int, batch: int, seq: int, n: int = 4) -> list[dict[str, torch.Tensor]]:
    """`n` distinct fully causal text batches of the contract (host tensors, cycled)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(2, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool),
                    "labels": ids.clone(), "prefix_len": torch.zeros(batch, dtype=torch.long)})
    return out


def m6_case(name: str, config: M6Config, args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, Dataset

    from m6lit.callbacks import PseudoToReal
    from m6lit.module import M6LitModule

    total_steps = args.warmup + args.steps
    clock = StepClock(cuda)
    marks: dict[str, Any] = {}

    class Timing(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == args.warmup:
                _sync(cuda)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                marks["t0"] = time.perf_counter()
            clock.mark("start")

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            clock.mark("backward")

        def on_after_backward(self, trainer, pl_module) -> None:
            clock.mark("after_backward")

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            clock.mark("optimizer")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            clock.mark("end")
            if batch_idx == total_steps - 1:
                _sync(cuda)
                marks["t1"] = time.perf_counter()

    class Cycle(Dataset):
        def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
            self.items = items

        def __len__(self) -> int:
            return total_steps + 1

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return self.items[i % len(self.items)]

    class TextData(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            items = text_batches(config.vocab_size, args.batch, args.seq)
            return DataLoader(Cycle(items), batch_size=None, shuffle=False, pin_memory=cuda)

    if name == "images":
        from m6lit.data import ImageTextDataModule
        from m6lit.data.sources import SourceSpec

        data: L.LightningDataModule = ImageTextDataModule(
            train=[SourceSpec(kind="demo", num_samples=100_000)], batch_size=args.image_batch,
            num_workers=0 if args.quick else 8, image_size=config.image_size, max_text_len=224)
        config = M6Config.from_dict({**config.to_dict(), "vocab_size": data.vocab_size,
                                     "max_seq_len": max(config.max_seq_len, 224 + config.num_patches)})
    else:
        data = TextData()
    callbacks: list[L.Callback] = [Timing()]
    if name == "pseudo":
        callbacks.append(PseudoToReal(delink_step=10 * total_steps))
    torch.manual_seed(0)
    build = time.perf_counter()
    # built on the GPU directly (initialising billions of parameters on the host costs tens of seconds); Lightning's
    # move to the device is then a no-op
    with torch.device("cuda" if cuda else "cpu"):
        module = M6LitModule(config, warmup_steps=10, compile_blocks=name == "dense_compiled",
                             peak_flops=PEAK_DATASHEET if cuda else None)
    params = module.model.num_parameters(unique=True)
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(max_steps=total_steps, accelerator="cuda" if cuda else "cpu", devices=1,
                            precision="bf16-mixed", logger=CSVLogger(logs), callbacks=callbacks,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            log_every_n_steps=10, num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(module, data)
    wall = time.perf_counter() - build
    elapsed = marks["t1"] - marks["t0"]
    step_s = elapsed / args.steps
    if name == "images":
        tokens_per_step = None  # varies per batch: use the module's own window
        tokens_per_s = float(trainer.callback_metrics.get("train/tokens_per_sec", float("nan")))
        flops_per_s = float(trainer.callback_metrics.get("train/mfu", float("nan"))) * PEAK_DATASHEET
    else:
        tokens_per_step = args.batch * args.seq
        tokens_per_s = tokens_per_step / step_s
        flops_per_s = training_flops(config, tokens_per_step, 0, args.seq) / step_s
    row = {"case": name, "kind": "m6lit Trainer", "params": params,
           "active_params_per_token": training_flops_per_token(config, args.seq) / 6,
           "tokens_per_step": tokens_per_step, "step_s": step_s, "tokens_per_s": tokens_per_s,
           "mfu_989": flops_per_s / PEAK_DATASHEET, "mfu_790": flops_per_s / PEAK_MEASURED,
           "logged_tokens_per_sec": float(trainer.callback_metrics.get("train/tokens_per_sec", float("nan"))),
           "logged_mfu": float(trainer.callback_metrics.get("train/mfu", float("nan"))),
           "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
           "wall_s": wall, **clock.breakdown(args.warmup)}
    del trainer, module
    return row


# ------------------------------------------------------------------------------------------------ anchor
class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.w_gate, self.w_up = nn.Linear(d, d_ff, bias=False), nn.Linear(d, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, S, Dh]
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        h = self.n2(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


class GPT(nn.Module):
    """Plain causal GPT with the dense case's shapes (learned positions, tied head)."""

    def __init__(self, c: M6Config) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(c.vocab_size, c.d_model), nn.Embedding(c.max_seq_len, c.d_model)
        self.blocks = nn.ModuleList(GPTBlock(c.d_model, c.n_heads, c.d_ff) for _ in range(c.num_layers))
        self.norm = nn.RMSNorm(c.d_model, eps=1e-6)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.head.weight = self.tok.weight
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def gpt_case(config: M6Config, args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    build = time.perf_counter()
    with device:
        model = GPT(config)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
    batches = [b["input_ids"].to(device) for b in text_batches(config.vocab_size, args.batch, args.seq)]
    clock = StepClock(cuda)
    t0 = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            _sync(cuda)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        ids = batches[step % len(batches)]
        clock.mark("start")
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        clock.mark("backward")
        loss.backward()
        clock.mark("after_backward")
        clock.mark("optimizer")
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.mark("end")
    _sync(cuda)
    step_s = (time.perf_counter() - t0) / args.steps
    tokens_per_step = args.batch * args.seq
    flops_per_s = training_flops(config, tokens_per_step, 0, args.seq) / step_s
    row = {"case": "gpt", "kind": "plain PyTorch", "params": params,
           "active_params_per_token": training_flops_per_token(config, args.seq) / 6,
           "tokens_per_step": tokens_per_step, "step_s": step_s, "tokens_per_s": tokens_per_step / step_s,
           "mfu_989": flops_per_s / PEAK_DATASHEET, "mfu_790": flops_per_s / PEAK_MEASURED,
           "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
           "wall_s": time.perf_counter() - build, **clock.breakdown(args.warmup)}
    del model, opt, batches
    return row


# ------------------------------------------------------------------------------------------------ report
def table(rows: list[dict[str, Any]]) -> str:
    anchor = next((r for r in rows if r.get("case") == "gpt" and "error" not in r), None)
    head = (f"{'case':<15} {'params':>7} {'tok/s':>9} {'x gpt':>6} {'MFU989':>7} {'MFU790':>7} {'peak GB':>8} "
            f"{'fwd ms':>7} {'bwd ms':>7} {'opt ms':>7} {'other':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']:<15} ERROR {r['error']}")
            continue
        ratio = f"{r['tokens_per_s'] / anchor['tokens_per_s']:.2f}" if anchor else "-"
        peak = f"{r['peak_memory_bytes'] / 1e9:.1f}" if r.get("peak_memory_bytes") else "-"
        lines.append(f"{r['case']:<15} {r['params'] / 1e9:>6.2f}B {r['tokens_per_s']:>9.0f} {ratio:>6} "
                     f"{r['mfu_989']:>7.1%} {r['mfu_790']:>7.1%} {peak:>8} {r['forward_s'] * 1e3:>7.1f} "
                     f"{r['backward_s'] * 1e3:>7.1f} {r['optimizer_s'] * 1e3:>7.1f} {r['other_s'] * 1e3:>6.1f}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    names = [r["case"] for r in ok]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].bar(names, [r["mfu_989"] * 100 for r in ok])
    axes[0].set_ylabel("MFU % (989 TFLOP/s basis)")
    axes[1].bar(names, [r["tokens_per_s"] for r in ok], color="tab:green")
    axes[1].set_ylabel("tokens/s")
    bottom = [0.0] * len(ok)
    for key, color in (("forward_s", "tab:blue"), ("backward_s", "tab:orange"), ("optimizer_s", "tab:red"),
                       ("other_s", "tab:gray")):
        values = [r[key] * 1e3 for r in ok]
        axes[2].bar(names, values, bottom=bottom, color=color, label=key[:-2])
        bottom = [b + v for b, v in zip(bottom, values)]
    axes[2].set_ylabel("ms per step")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"train throughput · {meta['device']} · torch {meta['torch']} · {meta['git_rev']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), choices=ALL_CASES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--image-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--budget", type=float, default=170.0, help="seconds after which no new case starts")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (checks the script)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    if args.quick:
        args.batch, args.seq, args.steps, args.warmup, args.image_batch = 2, 32, 2, 1, 4
    out = args.out or RESULTS / ("train_throughput_quick.json" if args.quick else "train_throughput.json")
    shapes = configs(args.quick, args.seq)
    meta = {**stamp(), "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
            "precision": "bf16-mixed", "quick": args.quick}
    print(json.dumps(meta), flush=True)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for case in args.cases:
        if time.perf_counter() - start > args.budget:
            rows.append({"case": case, "error": f"not run: the {args.budget:.0f} s budget was spent"})
            continue
        print(f"--- {case}", flush=True)
        try:
            if case == "gpt":
                row = gpt_case(shapes["dense"], args, cuda)
            else:
                row = m6_case(case, shapes["dense" if case in ("dense_compiled", "images") else case], args, cuda)
        except Exception as err:  # noqa: BLE001 - record the failure, run the other cases
            traceback.print_exc()
            row = {"case": case, "error": f"{type(err).__name__}: {err}"}
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    meta["total_s"] = time.perf_counter() - start
    result = {"meta": meta, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    plot(rows, meta, out.with_suffix(".png"))
    print(table(rows))
    print(f"wrote {out} and {out.with_suffix('.png')} in {meta['total_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
