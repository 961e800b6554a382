"""Demo caption accuracy per recipe variant: does the demo learn to describe its images within its CPU budget?

Each arm is `m6lit fit --config configs/demo.yaml` plus an overlay YAML (stacked `--config`, later wins), run as its
own process pinned to its own `--cores` CPU cores, so several arms run side by side on one many-core machine and each
sees what a `--cores`-core machine would give it. The script reads the `[step N] caption accuracy: ...` lines that
`m6lit.callbacks.CaptionAccuracy` prints at each validation, and reports per arm the wall time and the one-shape
accuracies (background, count, kind, colour, size, position, exact) at every validation.

    python benchmarks/demo_captions.py --arms demo en-caption --cores 2 --parallel 8

Writes benchmarks/results/demo_captions[-<tag>].json (stamped) and .png (one-shape accuracy against wall time,
one line per arm and attribute panel).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import ROOT, stamp  # noqa: E402

ATTRIBUTES = ("back", "coun", "kind", "colo", "size", "posi", "exac")
NAMES = {"back": "background", "coun": "count", "kind": "kind", "colo": "color", "size": "size",
         "posi": "position", "exac": "exact"}

_ONE_SHAPE_TRAIN = """
data:
  train:
    - {kind: demo, num_samples: 20000, seed: 0, max_shapes: 1, language: LANG, weight: W1}
    - {kind: demo, num_samples: 5000, seed: 10, language: LANG, weight: W2}
"""

#: arm name → overlay YAML on configs/demo.yaml ("" = the shipped demo as it is).
def _steps(n: int, every: int) -> str:
    return (f"trainer: {{max_steps: {n}, val_check_interval: {every}}}\n"
            f"pseudo_to_real: {{delink_step: {n // 2}}}\n")


_EN_ONE_SHAPE = ("data:\n  train:\n"
                 "    - {kind: demo, num_samples: 20000, seed: 0, max_shapes: 1, language: en, weight: 7}\n"
                 "    - {kind: demo, num_samples: 5000, seed: 10, language: en, weight: 1}\n"
                 "  task_mix: {caption: 1.0, denoise: 0.0, lm: 0.0}\n")

_CANDIDATE = ("data:\n  train:\n"
              "    - {kind: demo, num_samples: 20000, seed: 0, max_shapes: 1, weight: 7}\n"
              "    - {kind: demo, num_samples: 5000, seed: 10, weight: 1}\n"
              "  task_mix: {caption: 0.9, denoise: 0.1, lm: 0.0}\n  batch_size: BS\n"
              "model: {config: {n_heads: 8, moe_layers: [1, 3]}, optimizer: {init_args: {lr: LR}}}\n")

ARMS: dict[str, str] = {
    "demo": "",
    "demo-600": _steps(600, 150),
    "caption-only": "data: {task_mix: {caption: 1.0, denoise: 0.0, lm: 0.0}}\n",
    "en": _ONE_SHAPE_TRAIN.replace("LANG", "en").replace("W1", "3").replace("W2", "1"),
    "en-caption-600": _ONE_SHAPE_TRAIN.replace("LANG", "en").replace("W1", "3").replace("W2", "1")
    + "  task_mix: {caption: 1.0, denoise: 0.0, lm: 0.0}\n" + _steps(600, 150),
    "lr6e-3-600": "model: {optimizer: {init_args: {lr: 0.006}}}\n" + _steps(600, 150),
    "bs16-600": "data: {batch_size: 16}\n" + _steps(600, 150),
    "d96-600": "model: {config: {d_model: 96, n_heads: 4, d_ff: 288, expert_d_ff: 144}}\n" + _steps(600, 150),
    "demo-800": _steps(800, 200),
    "dense-800": "model: {config: {moe_layers: none}}\n" + _steps(800, 200),
    "heads8-800": "model: {config: {n_heads: 8}}\n" + _steps(800, 200),
    "en1-800": _EN_ONE_SHAPE + _steps(800, 200),
    "wide-600": "model: {config: {d_model: 192, n_heads: 6, d_ff: 576, expert_d_ff: 288}}\n" + _steps(600, 200),
    "deep-800": "model: {config: {num_layers: 6, num_unique_blocks: 3}}\n" + _steps(800, 200),
    "en1-heads8-dense-800": _EN_ONE_SHAPE.replace("data:\n", "data:\n", 1)
    + "model: {config: {n_heads: 8, moe_layers: none}}\n" + _steps(800, 200),
    "c-dense-1600": _EN_ONE_SHAPE + "model: {config: {n_heads: 8, moe_layers: none}}\n" + _steps(1600, 400),
    "c-moe-1600": _EN_ONE_SHAPE + "model: {config: {n_heads: 8}}\n" + _steps(1600, 400),
    "c-moe13-1600": _EN_ONE_SHAPE + "model: {config: {n_heads: 8, moe_layers: [1, 3]}}\n" + _steps(1600, 400),
    "c-h16-1600": _EN_ONE_SHAPE + "model: {config: {n_heads: 16, moe_layers: none}}\n" + _steps(1600, 400),
    "c-lr5e-3-1600": _EN_ONE_SHAPE + "model: {config: {n_heads: 8, moe_layers: none}, "
                     "optimizer: {init_args: {lr: 0.005}}}\n" + _steps(1600, 400),
    "c-both-1600": _EN_ONE_SHAPE.replace("language: en", "language: both")
    + "model: {config: {n_heads: 8, moe_layers: none}}\n" + _steps(1600, 400),
    "c-deep6-1600": _EN_ONE_SHAPE + "model: {config: {n_heads: 8, moe_layers: none, num_layers: 6, "
                    "num_unique_blocks: 3}}\n" + _steps(1600, 400),
    "c-bs16-2400": _EN_ONE_SHAPE + "  batch_size: 16\nmodel: {config: {n_heads: 8, moe_layers: none}}\n"
    + _steps(2400, 600),
    **{f"b{bs}-{n}-lr{lr}": _CANDIDATE.replace("BS", str(bs)).replace("LR", str(lr)) + _steps(n, n // 4)
       for bs, n, lr in ((32, 3000, 0.003), (64, 1500, 0.003), (128, 1000, 0.003), (128, 1000, 0.005),
                         (128, 1500, 0.005), (256, 600, 0.006))},
    **{f"cand-{name}": _CANDIDATE.replace("BS", str(bs)).replace("LR", str(lr)).replace("[1, 3]", moe)
       .replace("caption: 0.9, denoise: 0.1", mix) + _steps(n, n // 4)
       for name, bs, n, lr, moe, mix in (
           ("b128-1200-lr5e-3", 128, 1200, 0.005, "[1, 3]", "caption: 0.9, denoise: 0.1"),
           ("b128-1200-lr3e-3", 128, 1200, 0.003, "[1, 3]", "caption: 0.9, denoise: 0.1"),
           ("b128-1600-lr5e-3", 128, 1600, 0.005, "[1, 3]", "caption: 0.9, denoise: 0.1"),
           ("b64-2000-lr4e-3", 64, 2000, 0.004, "[1, 3]", "caption: 0.9, denoise: 0.1"),
           ("b128-1200-moe-all", 128, 1200, 0.005, "all", "caption: 0.9, denoise: 0.1"),
           ("b128-1200-caption-only", 128, 1200, 0.005, "[1, 3]", "caption: 1.0, denoise: 0.0"))},
    "d64-1200": "model: {config: {d_model: 64, n_heads: 4, d_ff: 192, expert_d_ff: 96}}\n" + _steps(1200, 300),
    "constant-lr": "model: {min_lr_ratio: 1.0}\n",
    "before-round6": "model: {config: {patch_centered: false, qk_norm: false}}\n",
    "no-qk-norm": "model: {config: {qk_norm: false}}\n",
}

_LINE = re.compile(r"\[step (\d+)\] caption accuracy: (.*)")


def parse_accuracy(text: str) -> list[dict[str, Any]]:
    """Every `[step N] caption accuracy:` line of a run's output → `{step, all: {...}, 1shape: {...}}`."""
    points = []
    for match in _LINE.finditer(text):
        point: dict[str, Any] = {"step": int(match.group(1))}
        for group in re.split(r"\s{2,}", match.group(2).strip()):
            name, *rest = group.split()
            point[name] = {NAMES[k]: float(v) for k, v in zip(rest[::2], rest[1::2])}
        points.append(point)
    return points


def run_arm(name: str, overlay: str, cores: list[int], workdir: Path, extra: list[str],
            timeout: float | None = None) -> dict[str, Any]:
    """Train one arm in its own process pinned to `cores`; its output goes to `workdir/<name>.log`."""
    armdir = workdir / name
    armdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "m6lit", "fit", "--config", str(ROOT / "configs" / "demo.yaml")]
    if overlay:
        path = armdir / "overlay.yaml"
        path.write_text(overlay)
        cmd += ["--config", str(path)]
    cmd += ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.enable_progress_bar", "false", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(len(cores)), "MKL_NUM_THREADS": str(len(cores)),
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=armdir, env=env, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=lambda: os.sched_setaffinity(0, cores))
        log, returncode = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        def text(out: bytes | str | None) -> str:
            return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")
        log, returncode = text(err.stdout) + text(err.stderr) + f"\n[killed after {timeout} s]", "timeout"
    wall = time.perf_counter() - start
    (workdir / f"{name}.log").write_text(log)
    if returncode != 0:
        print(f"[{name}] FAILED (exit {returncode}); last lines:\n" + "\n".join(log.splitlines()[-15:]),
              flush=True)
    points = parse_accuracy(log)
    last = points[-1]["1shape"] if points else {}
    print(f"[{name}] {wall:.0f} s, one-shape at the end: {last}", flush=True)
    return {"arm": name, "overlay": overlay, "cores": len(cores), "wall_s": round(wall, 1),
            "returncode": returncode, "points": points}


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [NAMES[a] for a in ATTRIBUTES if a not in ("back", "coun")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), sharey=True)
    for ax, attribute in zip(axes, panels):
        for result in results:
            points = [p for p in result["points"] if "1shape" in p]
            if points:
                steps = [p["step"] for p in points]
                ax.plot(steps, [p["1shape"][attribute] for p in points], marker="o",
                        label=f"{result['arm']} ({result['wall_s']:.0f} s)")
        ax.axhline(0.9, color="gray", lw=0.8, ls="--")
        ax.set_title(f"one-shape {attribute}")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("accuracy (greedy captions)")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), help=f"arms to run (of {', '.join(ARMS)})")
    parser.add_argument("--cores", type=int, default=2, help="CPU cores per arm (each arm pinned to its own)")
    parser.add_argument("--parallel", type=int, default=1, help="arms run side by side")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tag", default=None, help="name the outputs demo_captions-<tag>.json / .png")
    parser.add_argument("--workdir", type=Path, default=None, help="where runs and logs go (default: a temp dir)")
    parser.add_argument("--arm-timeout", type=float, default=None,
                        help="seconds after which an arm is stopped (its validations so far still count)")
    parser.add_argument("extra", nargs="*", help="arguments passed to every `m6lit fit` (after --)")
    args = parser.parse_args()
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; known: {list(ARMS)}")
    available = sorted(os.sched_getaffinity(0))
    if args.cores * args.parallel > len(available):
        parser.error(f"--cores {args.cores} x --parallel {args.parallel} needs {args.cores * args.parallel} cores; "
                     f"this process may use {len(available)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="demo_captions-"))
    slots = [available[i * args.cores:(i + 1) * args.cores] for i in range(args.parallel)]
    print(f"{len(args.arms)} arms, {args.parallel} at a time on {args.cores} cores each; logs in {workdir}", flush=True)
    free: list[list[int]] = list(slots)

    def job(name: str) -> dict[str, Any]:
        cores = free.pop()
        try:
            return run_arm(name, ARMS[name], cores, workdir, args.extra, args.arm_timeout)
        finally:
            free.append(cores)

    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(job, args.arms))

    print(f"\n{'arm':<18}{'wall s':>8}{'step':>6}" + "".join(f"{NAMES[a][:8]:>10}" for a in ATTRIBUTES))
    for result in results:
        last = result["points"][-1] if result["points"] else {"step": "-", "1shape": {}}
        row = last.get("1shape", {})
        print(f"{result['arm']:<18}{result['wall_s']:>8.0f}{last['step']:>6}"
              + "".join(f"{row.get(NAMES[a], float('nan')):>10.3f}" for a in ATTRIBUTES))
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"stamp": stamp(), "cores_per_arm": args.cores, "parallel": args.parallel, "extra": args.extra,
              "goal": "one-shape accuracy >= 0.9 on every attribute", "results": results}
    stem = "demo_captions" + (f"-{args.tag}" if args.tag else "")
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    plot(results, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
