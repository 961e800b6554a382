"""Data pipeline throughput: samples/s of the training loader beside the rate the model consumes them.

The real path: `ImageTextDataModule` (task building, tokenization, span corruption, image decode + resize +
normalise, collate) → its training `StatefulDataLoader`, for three sources written to a temporary directory from the
demo scenes: the procedural `demo` source, a `jsonl` manifest of JPEG files and `webdataset` tar shards of the same
JPEGs (stored at 256 px, so the resize + center-crop to `--image-size` runs as it does on real data). For each
source and worker count the loader's first batch (worker start-up) is timed apart, then `--batches` batches.

The model's consumption rate is what a GPU at `--mfu` of `--peak` FLOP/s needs, from the model's own FLOPs formula
(`m6lit.model.flops`) on the measured mean text length plus the image patches, for the configs named by `--models`
(`real`: configs/p2r-giant.yaml's Real Giant, `dense1b`: the dense ~1.3 B model of benchmarks/train_throughput.py).
It runs on the CPU; the loader results depend on the host's cores, so read them per worker.

    python benchmarks/data_throughput.py [--workers 0 2 8] [--batches 20] [--batch-size 32] [--image-size 224]
    python benchmarks/data_throughput.py --quick      # tiny run that checks the script (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m6lit.data import ImageTextDataModule  # noqa: E402
from m6lit.data.demo import DemoImageText  # noqa: E402
from m6lit.data.sources import SourceSpec  # noqa: E402
from m6lit.model import M6Config  # noqa: E402
from m6lit.model.flops import training_flops  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import stamp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STORED_SIDE = 256


def model_configs() -> dict[str, M6Config]:
    """The models whose consumption rate the loader must meet (224 px, patch 16: 196 patches per image)."""
    common = dict(vocab_size=384, image_size=224, patch_size=16, max_seq_len=512)
    real = M6Config(d_model=1024, n_heads=16, d_ff=4096, num_layers=24, moe_layers=2, num_experts=8, top_k=2,
                    expert_d_ff=2048, **common)
    dense = M6Config(d_model=2048, n_heads=16, d_ff=5632, num_layers=24, moe_layers="none", **common)
    return {"real": real, "dense1b": dense}


def write_sources(root: Path, n: int) -> dict[str, SourceSpec]:
    """Demo scenes as JPEG files behind a JSONL manifest and as WebDataset shards (same images and captions)."""
    import webdataset as wds

    demo = DemoImageText(n, seed=0, image_size=STORED_SIDE)
    images = root / "images"
    images.mkdir(parents=True)
    shards = root / "shards"
    shards.mkdir()
    per_shard = max(1, n // 4)
    with open(root / "train.jsonl", "w") as manifest:
        sink = None
        for i in range(n):
            sample = demo[i]
            path = images / f"{i:06d}.jpg"
            sample["image"].save(path, quality=90)
            manifest.write(json.dumps({"image": f"images/{path.name}", "text": sample["text"]}) + "\n")
            if i % per_shard == 0:
                if sink is not None:
                    sink.close()
                sink = wds.TarWriter(str(shards / f"shard-{i // per_shard:06d}.tar"))
            sink.write({"__key__": f"{i:06d}", "jpg": path.read_bytes(), "txt": sample["text"]})
        sink.close()
    return {"demo": SourceSpec(kind="demo", num_samples=n, seed=0),
            "jsonl": SourceSpec(kind="jsonl", path=str(root / "train.jsonl")),
            "webdataset": SourceSpec(kind="webdataset", path=str(shards))}


def measure(spec: SourceSpec, workers: int, batch_size: int, batches: int, image_size: int) -> dict[str, Any]:
    """Loader start-up (first batch) and steady samples/s over `batches` batches."""
    data = ImageTextDataModule(train=[spec], batch_size=batch_size, num_workers=workers, image_size=image_size,
                               seed=0)
    data.setup("fit")
    loader = data.train_dataloader()
    start = time.perf_counter()
    it = iter(loader)
    first = next(it)
    startup = time.perf_counter() - start
    samples = text = 0
    start = time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        samples += batch["input_ids"].shape[0]
        text += int(batch["attention_mask"].sum())
    elapsed = time.perf_counter() - start
    del it, loader
    assert tuple(first["pixel_values"].shape[-2:]) == (image_size, image_size)
    return {"source": spec.kind, "workers": workers, "batch_size": batch_size, "batches": batches,
            "startup_s": startup, "samples_per_s": samples / elapsed,
            "samples_per_s_per_worker": samples / elapsed / max(1, workers),
            "mean_text_tokens": text / max(1, samples),
            "image_fraction": float(first["image_mask"].float().mean()) if "image_mask" in first else 0.0}


def consumption(configs: dict[str, M6Config], text_tokens: float, image_fraction: float, mfu: float,
                peak: float) -> dict[str, float]:
    """Samples/s each model takes at `mfu` of `peak`: FLOPs per sample from the model's formula."""
    out = {}
    for name, config in configs.items():
        patches = image_fraction * config.num_patches
        width = text_tokens + config.num_patches
        per_sample = training_flops(config, round(text_tokens), round(patches), round(width))
        out[name] = mfu * peak / per_sample
    return out


def table(rows: list[dict[str, Any]], need: dict[str, float]) -> str:
    names = list(need)
    head = f"{'source':<11} {'workers':>7} {'start s':>7} {'samples/s':>10} {'/worker':>8} " + " ".join(
        f"{'x ' + n:>12}" for n in names)
    lines = [head, "-" * len(head)]
    for r in rows:
        ratios = " ".join(f"{r['samples_per_s'] / need[n]:>12.2f}" for n in names)
        lines.append(f"{r['source']:<11} {r['workers']:>7} {r['startup_s']:>7.2f} {r['samples_per_s']:>10.1f} "
                     f"{r['samples_per_s_per_worker']:>8.1f} {ratios}")
    lines.append("model needs (samples/s): " + ", ".join(f"{n} {v:.0f}" for n, v in need.items()))
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], need: dict[str, float], meta: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for source in sorted({r["source"] for r in rows}):
        pts = sorted((r["workers"], r["samples_per_s"]) for r in rows if r["source"] == source)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=source)
    for (name, value), style in zip(need.items(), ("--", ":")):
        ax.axhline(value, color="gray", linestyle=style, label=f"{name} needs {value:.0f}/s")
    ax.set_xlabel("loader workers")
    ax.set_ylabel("samples/s")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"loader throughput at {meta['image_size']} px, batch {meta['batch_size']}", fontsize=9)
    fig.text(0.01, 0.01, f"{meta['git_rev']} · torch {meta['torch']} · {meta['device']}", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="default: 0 2 8 (--quick: 0 1)")
    parser.add_argument("--sources", nargs="+", default=["demo", "jsonl", "webdataset"])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=2048, help="samples written per source")
    parser.add_argument("--mfu", type=float, default=0.4, help="MFU the GPU is assumed to reach")
    parser.add_argument("--peak", type=float, default=989e12, help="GPU peak FLOP/s (H200 dense bf16)")
    parser.add_argument("--out", type=Path, default=RESULTS / "data_throughput.json")
    parser.add_argument("--quick", action="store_true", help="a tiny run that checks the script")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.batch_size, args.samples = 2, 4, 16
    if args.workers is None:
        args.workers = [0, 1] if args.quick else [0, 2, 8]
    torch.set_num_threads(1)  # the main process is one loader consumer, like the training process's loader side
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        specs = write_sources(Path(tmp), args.samples)
        for source in args.sources:
            for workers in args.workers:
                row = measure(specs[source], workers, args.batch_size, args.batches, args.image_size)
                print(json.dumps(row), flush=True)
                rows.append(row)
    text = sum(r["mean_text_tokens"] for r in rows) / len(rows)
    image_fraction = sum(r["image_fraction"] for r in rows) / len(rows)
    need = consumption(model_configs(), text, image_fraction, args.mfu, args.peak)
    meta = {**stamp(), "image_size": args.image_size, "batch_size": args.batch_size, "mfu": args.mfu,
            "peak_flops": args.peak, "quick": args.quick}
    result = {"meta": meta, "model_samples_per_s": need, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(rows, need, meta, args.out.with_suffix(".png"))
    print(table(rows, need))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
