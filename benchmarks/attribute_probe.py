"""Do M6 features carry the demo scenes' attributes? Linear-probe accuracy per attribute, three feature sources.

Features of one-shape demo scenes (`m6lit.model.features.multimodal_features`, image modality, mean pooling) from
(1) the trained demo model, (2) a randomly initialised model of the same shape, and (3) the raw pixels. For each
attribute (background, kind, colour, size, position) a multinomial logistic regression is fitted on the training
scenes' standardised features and scored on held-out scenes (top-1 accuracy; chance = 1 / number of values).

    python benchmarks/attribute_probe.py                         # trains the demo first (configs/demo.yaml)
    python benchmarks/attribute_probe.py --backbone checkpoints/last.ckpt

Writes benchmarks/results/attribute_probe.json (stamped) and attribute_probe.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import ROOT, stamp  # noqa: E402

sys.path.insert(0, str(ROOT))
from m6lit.data.demo import DEMO_ATTRIBUTES, DemoImageText, scene_labels  # noqa: E402
from m6lit.data.tasks import image_to_tensor  # noqa: E402
from m6lit.model import M6Model  # noqa: E402
from m6lit.model.features import multimodal_features  # noqa: E402
from m6lit.tagger import load_backbone  # noqa: E402


def scenes(num: int, seed: int, image_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pixels [N, 3, S, S] of one-shape demo scenes and each attribute's value index [N]."""
    data = DemoImageText(num, seed=seed, image_size=image_size, max_shapes=1)
    pixels, labels = [], {a: [] for a in DEMO_ATTRIBUTES}
    for i in range(num):
        sample = data[i]
        pixels.append(image_to_tensor(sample["image"], image_size))
        for attribute, values in scene_labels(data.scene(i)).items():
            labels[attribute].append(DEMO_ATTRIBUTES[attribute].index(values[0]))
    return torch.stack(pixels), {a: torch.tensor(v) for a, v in labels.items()}


@torch.no_grad()
def model_features(model: M6Model, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([multimodal_features(model, pixel_values=pixels[i:i + batch_size], modality="image")
                      for i in range(0, len(pixels), batch_size)])


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
          classes: int, steps: int = 300, weight_decay: float = 1e-4) -> float:
    """Top-1 test accuracy of a multinomial logistic regression (full-batch L-BFGS) on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(0)
    linear = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train_x), train_y)
        loss = loss + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((linear(test_x).argmax(1) == test_y).float().mean())


def train_demo(workdir: Path) -> Path:
    """Run the demo recipe (`m6lit fit --config configs/demo.yaml`) in `workdir`; its last checkpoint."""
    print(f"training the demo in {workdir} (configs/demo.yaml) ...", flush=True)
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run([sys.executable, "-m", "m6lit", "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
                    "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"],
                   cwd=workdir, env=env, check=True)
    return workdir / "checkpoints" / "last.ckpt"


def plot(results: dict[str, dict[str, float]], chance: dict[str, float], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attributes = list(chance)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(results)
    for k, (name, row) in enumerate(results.items()):
        ax.bar([i + k * width for i in range(len(attributes))], [row[a] for a in attributes], width, label=name)
    ax.scatter([i + 0.4 - width / 2 for i in range(len(attributes))], [chance[a] for a in attributes], marker="_",
               s=400, color="black", label="chance", zorder=3)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(attributes))], attributes)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("linear-probe top-1 accuracy")
    ax.set_title("one-shape demo scenes: what the features carry")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", type=Path, default=None, help="trained demo checkpoint (default: train one)")
    parser.add_argument("--train", type=int, default=2000, help="scenes the probes are fitted on")
    parser.add_argument("--test", type=int, default=1000, help="held-out scenes they are scored on")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    start = time.perf_counter()
    backbone = args.backbone or train_demo(Path(tempfile.mkdtemp(prefix="attribute_probe-")))
    trained = load_backbone(backbone)
    torch.manual_seed(0)
    random_init = M6Model(trained.config)
    size = trained.config.image_size
    train_px, train_y = scenes(args.train, seed=100, image_size=size)
    test_px, test_y = scenes(args.test, seed=101, image_size=size)
    sources = {"trained demo model": (model_features(trained, train_px), model_features(trained, test_px)),
               "random init (same shape)": (model_features(random_init, train_px),
                                            model_features(random_init, test_px)),
               "raw pixels": (train_px.flatten(1), test_px.flatten(1))}
    chance = {a: 1 / len(v) for a, v in DEMO_ATTRIBUTES.items()}
    results: dict[str, dict[str, float]] = {}
    for name, (train_x, test_x) in sources.items():
        results[name] = {a: probe(train_x, train_y[a], test_x, test_y[a], len(DEMO_ATTRIBUTES[a]))
                         for a in DEMO_ATTRIBUTES}
    print(f"\n{'features':<26}{'dim':>6}" + "".join(f"{a:>12}" for a in DEMO_ATTRIBUTES))
    print(f"{'chance':<26}{'':>6}" + "".join(f"{chance[a]:>12.3f}" for a in DEMO_ATTRIBUTES))
    for name, row in results.items():
        print(f"{name:<26}{sources[name][0].shape[1]:>6}" + "".join(f"{row[a]:>12.3f}" for a in DEMO_ATTRIBUTES))
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"stamp": stamp(), "backbone": str(backbone), "train_scenes": args.train, "test_scenes": args.test,
              "modality": "image", "pooling": "mean", "chance": chance, "results": results,
              "dims": {name: int(x[0].shape[1]) for name, x in sources.items()},
              "wall_s": round(time.perf_counter() - start, 1)}
    (args.out / "attribute_probe.json").write_text(json.dumps(record, indent=1))
    plot(results, chance, args.out / "attribute_probe.png")
    print(f"wrote {args.out / 'attribute_probe.json'} and attribute_probe.png")


if __name__ == "__main__":
    main()
