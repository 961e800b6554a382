"""Text → image on the demo scenes, end to end in one command (one H200, at most about 9 minutes; `--quick`: CPU, tiny).

1. Train the VQ image tokenizer (m6lit.model.image_tokenizer; 48 px, f=4 → a 12x12 code grid aligned with the
   scenes' 3x3 cells) until its reconstructions of held-out scenes parse exactly (`--tokenizer_stop_at`) or
   `--tokenizer_seconds` have passed; the held-out curve goes to the JSON and the plot.
2. Train an M6 model on the generate task (caption → BOI + codes + EOI, caption dropped 10 % for guidance) and the
   caption task (image patches → caption, used for self-reranking), loss averaged per task, for `--train_seconds`.
3. Score generated images with a deterministic render-and-compare scene parser (background, cell occupancy, colour,
   shape, size, exact scene) against three controls: unconditional samples, shuffled prompts (each image scored
   against another prompt's scene) and tokenizer reconstructions (the ceiling; gate: they parse >= 0.99); a guidance
   sweep; reranking on vs off; FID/KID (torchmetrics) with a feature network trained here on demo images.

Prints a table, writes benchmarks/results/text_to_image.json (stamped with git revision, torch, device),
text_to_image.png (metrics) and text_to_image_grid.png (prompts and images).

    python benchmarks/text_to_image.py            # H200
    python benchmarks/text_to_image.py --quick    # CPU smoke run, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from m6lit.data.demo import BACKGROUNDS, COLORS, SHAPES, SIZES, DemoImageText, DemoScene, DemoShape, render_scene  # noqa: E402
from m6lit.data.tasks import PROMPTS, TASKS, collate, image_to_tensor  # noqa: E402
from m6lit.data.tokenizer import load_tokenizer  # noqa: E402
from m6lit.model import M6Config, M6Model  # noqa: E402
from m6lit.model.image_generation import caption_log_likelihood, generate_image_codes, pad_prompts  # noqa: E402
from m6lit.model.image_tokenizer import ImageTokenizer, tokenizer_config  # noqa: E402
from m6lit.model.image_vocab import ImageVocab  # noqa: E402
from m6lit.model.task_loss import per_task_loss  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import stamp  # noqa: E402

SIZE = 48
PALETTE = [*BACKGROUNDS, *COLORS]  # names; backgrounds first
PALETTE_RGB = torch.tensor([BACKGROUNDS.get(n, COLORS.get(n))[0] for n in PALETTE], dtype=torch.float32)  # type: ignore[index]
N_BG = len(BACKGROUNDS)


# ------------------------------------------------------------------------------------------------ scene parser
def _to_rgb(image: Tensor) -> Tensor:
    """[3, S, S] in [-1, 1] → [S, S, 3] in [0, 255]."""
    return ((image.float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).cpu()


_TEMPLATES: dict[tuple[str, str, int], Tensor] = {}


def _template(kind: str, size: str, cell: int) -> Tensor:
    """Foreground mask [S, S] of one shape drawn alone (render-and-compare reference)."""
    key = (kind, size, cell)
    if key not in _TEMPLATES:
        scene = DemoScene("black", (DemoShape(kind, "red", size, cell),), "en", 0, False)
        rgb = torch.from_numpy(np.asarray(render_scene(scene, SIZE), dtype=np.float32))
        _TEMPLATES[key] = rgb.sum(-1) > 0
    return _TEMPLATES[key]


def parse_scene(image: Tensor) -> tuple[str, dict[int, tuple[str, str, str]]]:
    """(background, {cell: (kind, colour, size)}) read from an image [3, S, S] in [-1, 1]."""
    rgb = _to_rgb(image)
    labels = torch.cdist(rgb.reshape(-1, 3), PALETTE_RGB).argmin(1).view(SIZE, SIZE)  # nearest palette colour
    bg_counts = torch.bincount(labels.flatten(), minlength=len(PALETTE))[:N_BG]
    background = PALETTE[int(bg_counts.argmax())]
    cell_px = SIZE // 3
    shapes: dict[int, tuple[str, str, str]] = {}
    for cell in range(9):
        r, c = divmod(cell, 3)
        window = (slice(r * cell_px, (r + 1) * cell_px), slice(c * cell_px, (c + 1) * cell_px))
        fg = labels >= N_BG
        cell_fg = torch.zeros_like(fg)
        cell_fg[window] = fg[window]
        if int(cell_fg.sum()) < 8:
            continue
        colour = PALETTE[int(torch.bincount(labels[cell_fg], minlength=len(PALETTE))[N_BG:].argmax()) + N_BG]
        best, best_iou = ("circle", "small"), -1.0
        for kind in SHAPES:
            for size in SIZES:
                t = _template(kind, size, cell)
                iou = float((t & cell_fg).sum()) / max(float((t | cell_fg).sum()), 1.0)
                if iou > best_iou:
                    best, best_iou = (kind, size), iou
        shapes[cell] = (best[0], colour, best[1])
    return background, shapes


def scene_target(scene: DemoScene) -> tuple[str, dict[int, tuple[str, str, str]]]:
    return scene.background, {s.cell: (s.kind, s.color, s.size) for s in scene.shapes}


def score(images: Tensor, scenes: list[DemoScene]) -> dict[str, float]:
    """Per-attribute accuracy and exact-scene rate of parsed images against their scenes."""
    totals = {k: 0.0 for k in ("background", "cell", "color", "shape", "size", "exact")}
    attr_n = 0
    for image, scene in zip(images, scenes):
        bg, want = scene_target(scene)
        got_bg, got = parse_scene(image)
        totals["background"] += float(got_bg == bg)
        totals["cell"] += sum(float((c in got) == (c in want)) for c in range(9)) / 9
        for cell, (kind, colour, size) in want.items():
            attr_n += 1
            if cell in got:
                totals["shape"] += float(got[cell][0] == kind)
                totals["color"] += float(got[cell][1] == colour)
                totals["size"] += float(got[cell][2] == size)
        totals["exact"] += float(got_bg == bg and got == want)
    n = max(len(scenes), 1)
    return {k: v / (max(attr_n, 1) if k in ("color", "shape", "size") else n) for k, v in totals.items()}


# ------------------------------------------------------------------------------------------------ feature network
class SceneFeatures(nn.Module):
    """A small CNN trained here to read background and per-cell colour; its pooled features feed FID/KID."""

    num_features = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
                                  nn.Conv2d(64, 128, 3, 2, 1), nn.GELU(), nn.AdaptiveAvgPool2d(3), nn.Flatten(),
                                  nn.Linear(128 * 9, 128), nn.GELU())
        self.head = nn.Linear(128, N_BG + 9 * (len(COLORS) + 1))

    def forward(self, images: Tensor) -> Tensor:
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1
        if images.shape[-1] != SIZE:
            images = F.interpolate(images.float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        return self.body(images.float())


def feature_labels(scenes: list[DemoScene]) -> Tensor:
    rows = []
    for s in scenes:
        cells = [0] * 9
        for shape in s.shapes:
            cells[shape.cell] = 1 + list(COLORS).index(shape.color)
        rows.append([list(BACKGROUNDS).index(s.background), *cells])
    return torch.tensor(rows)


def train_features(pixels: Tensor, scenes: list[DemoScene], steps: int, device: str) -> SceneFeatures:
    net = SceneFeatures().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    labels = feature_labels(scenes).to(device)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        idx = torch.randint(0, len(scenes), (min(256, len(scenes)),), generator=gen)
        logits = net.head(net(pixels[idx].to(device)))
        bg, cells = logits[:, :N_BG], logits[:, N_BG:].view(-1, 9, len(COLORS) + 1)
        loss = F.cross_entropy(bg, labels[idx, 0]) + F.cross_entropy(cells.reshape(-1, len(COLORS) + 1),
                                                                     labels[idx, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def fid_kid(net: SceneFeatures, real: Tensor, fake: Tensor, device: str) -> dict[str, float]:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(len(real), len(fake))
    fid = FrechetInceptionDistance(feature=net, normalize=False).to(device)
    kid = KernelInceptionDistance(feature=net, subsets=10, subset_size=max(2, min(100, n // 2)),
                                  normalize=False).to(device)
    with torch.no_grad():
        for metric in (fid, kid):
            metric.update(real[:n].to(device), real=True)
            metric.update(fake[:n].clamp(-1, 1).to(device), real=False)
    kid_mean, _ = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean)}


# ------------------------------------------------------------------------------------------------ training
def train_tokenizer(pixels: Tensor, args: argparse.Namespace, device: str,
                    held_out: tuple[Tensor, list[DemoScene]]) -> tuple[ImageTokenizer, dict[str, Any]]:
    """Train until the held-out reconstructions parse exactly at `--tokenizer_stop_at` or the time is up; the
    held-out scenes (not the eval scenes) are scored every `--tokenizer_check_seconds` of training."""
    torch.manual_seed(0)
    config = tokenizer_config(SIZE, args.codebook_size, embed_dim=8, base_channels=args.tok_channels,
                              channel_multiplier=(1, 2, 2), num_res_blocks=args.tok_res_blocks,
                              latent_channels=args.tok_channels)
    tok = ImageTokenizer(config, decay=0.99, kmeans_init=True, threshold_ema_dead_code=2.0).to(device)
    opt = torch.optim.Adam([p for p in tok.parameters() if p.requires_grad], lr=1e-3, betas=(0.5, 0.9))
    gen = torch.Generator().manual_seed(1)
    start, scoring, step, history, loss = time.perf_counter(), 0.0, 0, [], torch.zeros(())
    next_check = args.tokenizer_check_seconds
    while True:
        trained = time.perf_counter() - start - scoring  # training time only (scoring syncs the device)
        done = step >= args.tokenizer_steps or trained >= args.tokenizer_seconds
        if step and (done or trained >= next_check):
            tick = time.perf_counter()
            tok.eval()
            parsed = score(decode_all(tok, encode_all(tok, held_out[0], device), device), held_out[1])
            tok.train()
            history.append({"step": step, "seconds": trained, "loss": float(loss.detach()), **parsed})
            print(f"  tokenizer step {step} ({trained:.0f} s): loss {float(loss):.4f}, held-out reconstructions "
                  f"parse exactly {parsed['exact']:.3f} (colour {parsed['color']:.3f}, shape {parsed['shape']:.3f})",
                  flush=True)
            scoring += time.perf_counter() - tick
            next_check = trained + args.tokenizer_check_seconds
            if done or parsed["exact"] >= args.tokenizer_stop_at:
                break
        x = pixels[torch.randint(0, len(pixels), (args.tok_batch,), generator=gen)].to(device)
        out = tok(x)
        loss = F.l1_loss(out.reconstruction, x) + F.mse_loss(out.reconstruction, x) + out.commitment_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    tok.eval()
    return tok, {"steps": step, "seconds": trained, "final_loss": float(loss.detach()),
                 "params": sum(p.numel() for p in tok.parameters()), "history": history}


def encode_all(tok: ImageTokenizer, pixels: Tensor, device: str, batch: int = 512) -> Tensor:
    return torch.cat([tok.encode(pixels[i:i + batch].to(device)).cpu() for i in range(0, len(pixels), batch)])


def decode_all(tok: ImageTokenizer, codes: Tensor, device: str, batch: int = 256) -> Tensor:
    return torch.cat([tok.decode(codes[i:i + batch].to(device)).float().clamp(-1, 1).cpu()
                      for i in range(0, len(codes), batch)])


def make_examples(idx: list[int], captions: list[list[int]], codes: Tensor, pixels: Tensor, vocab: ImageVocab,
                  prompts: dict[str, list[int]], eos: int, rng: random.Random, generate_share: float,
                  dropout: float) -> list[dict[str, Any]]:
    """Examples in the shape m6lit's ExampleBuilder makes (generate or caption), for `collate`."""
    out = []
    for i in idx:
        if rng.random() < generate_share:
            prefix = prompts["generate"] + ([] if rng.random() < dropout else captions[i])
            target = [vocab.boi, *vocab.codes_to_ids(codes[i]).tolist(), vocab.eoi]
            out.append({"prefix": torch.tensor(prefix), "target": torch.tensor(target), "pixel_values": None,
                        "task": "generate", "reference": None})
        else:
            out.append({"prefix": torch.tensor(prompts["caption"]), "target": torch.tensor(captions[i] + [eos]),
                        "pixel_values": pixels[i], "task": "caption", "reference": None})
    return out


def train_model(config: M6Config, data: dict[str, Any], args: argparse.Namespace, device: str) -> tuple[
        M6Model, dict[str, Any]]:
    torch.manual_seed(0)
    model = M6Model(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    weights = [1.0 if t in ("caption", "generate") else 0.0 for t in TASKS]
    rng = random.Random(0)
    start, step, history = time.perf_counter(), 0, []
    n = len(data["captions"])
    use_bf16 = device == "cuda"
    while step < args.train_steps and time.perf_counter() - start < args.train_seconds:
        lr_scale = min(1.0, (step + 1) / args.warmup)
        if args.train_steps < 10 ** 9:
            progress = step / args.train_steps
        else:
            progress = (time.perf_counter() - start) / args.train_seconds
        lr_scale *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_scale
        examples = make_examples([rng.randrange(n) for _ in range(args.batch)], data["captions"], data["codes"],
                                 data["pixels"], data["vocab"], data["prompts"], data["eos"], rng,
                                 args.generate_share, 0.1)
        batch = collate(examples, config.pad_token_id)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, Tensor)}
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
            out = model(batch)
        loss, means, counts = per_task_loss(out.logits, batch["labels"], batch["task_ids"], weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0 or step == 1:
            row = {"step": step, "loss": float(loss), "caption": float(means[TASKS.index("caption")]),
                   "generate": float(means[TASKS.index("generate")]), "seconds": time.perf_counter() - start}
            history.append(row)
            print(f"  M6 step {step}: loss {row['loss']:.4f} (caption {row['caption']:.3f}, generate "
                  f"{row['generate']:.3f})", flush=True)
    model.eval()
    return model, {"steps": step, "seconds": time.perf_counter() - start, "history": history,
                   "params": sum(p.numel() for p in model.parameters())}


# ------------------------------------------------------------------------------------------------ sampling
def sample(model: M6Model, decode: Callable[[Tensor], Tensor], prompts: list[list[int]], uncond: list[int],
           scale: float, args: argparse.Namespace, device: str, candidates: int = 1,
           rerank: tuple[list[int], list[list[int]]] | None = None, seed: int = 0) -> Tensor:
    """Images [B, 3, S, S] for the prompts (best of `candidates` by caption likelihood when `rerank` is given)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    images = []
    for start in range(0, len(prompts), args.gen_batch):
        chunk = prompts[start:start + args.gen_batch]
        expanded = [p for p in chunk for _ in range(candidates)]
        ids, mask = pad_prompts(expanded, model.config.pad_token_id)
        u_ids, u_mask = pad_prompts([uncond], model.config.pad_token_id)
        with torch.no_grad():  # fp32: the KV cache holds the embeddings' dtype
            codes = generate_image_codes(model, ids.to(device), mask.to(device), u_ids.to(device), u_mask.to(device),
                                         guidance_scale=scale, temperature=args.temperature, top_k=args.top_k,
                                         generator=gen)
            pixels = decode(codes).float().clamp(-1, 1)
            if rerank is not None and candidates > 1:
                caps = [c for c in rerank[1][start:start + args.gen_batch] for _ in range(candidates)]
                scores = caption_log_likelihood(model, pixels, rerank[0], caps).view(len(chunk), candidates)
                best = scores.argmax(1) + torch.arange(len(chunk), device=device) * candidates
                pixels = pixels[best]
        images.append(pixels.cpu())
    return torch.cat(images)


def grid_png(path: Path, prompts: list[str], columns: dict[str, Tensor], rows: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    fig, axes = plt.subplots(rows, len(names), figsize=(2.2 * len(names), 2.3 * rows), squeeze=False)
    for r in range(rows):
        for c, name in enumerate(names):
            ax = axes[r][c]
            ax.imshow(_to_rgb(columns[name][r]).numpy().astype(np.uint8))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
        axes[r][0].set_ylabel("\n".join(prompts[r][i:i + 28] for i in range(0, len(prompts[r]), 28)), fontsize=6,
                              rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def metrics_png(path: Path, table: dict[str, dict[str, float]], sweep: dict[float, float],
                tokenizer_history: list[dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 3.6))
    names = list(table)
    a.bar(range(len(names)), [table[n]["exact"] for n in names], color="tab:blue")
    a.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    a.set_ylabel("exact-scene rate")
    a.set_title("scene parser on generated images")
    b.plot(list(sweep), list(sweep.values()), marker="o")
    b.set_xlabel("guidance scale")
    b.set_ylabel("exact-scene rate")
    b.set_title("guidance sweep (no rerank)")
    seconds = [row["seconds"] for row in tokenizer_history]
    for key in ("exact", "color", "shape", "size"):
        c.plot(seconds, [row[key] for row in tokenizer_history], marker=".", label=key)
    c.axhline(0.99, color="gray", linestyle="--", linewidth=0.8)
    c.set_xlabel("tokenizer training seconds")
    c.set_ylabel("held-out reconstructions")
    c.set_title("tokenizer: reconstructions parsed (gate 0.99)")
    c.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run with tiny sizes (seconds to a minute)")
    p.add_argument("--out_dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--num_train", type=int, default=20000)
    p.add_argument("--num_eval", type=int, default=200)
    p.add_argument("--max_shapes", type=int, default=2)
    p.add_argument("--codebook_size", type=int, default=1024)
    p.add_argument("--tok_channels", type=int, default=64)
    p.add_argument("--tok_res_blocks", type=int, default=1)
    p.add_argument("--tok_batch", type=int, default=128)
    p.add_argument("--tokenizer_seconds", type=float, default=240.0, help="most training time for the tokenizer")
    p.add_argument("--tokenizer_check_seconds", type=float, default=20.0,
                   help="score the held-out reconstructions after every this many seconds of tokenizer training")
    p.add_argument("--tokenizer_stop_at", type=float, default=0.995,
                   help="stop tokenizer training once the held-out reconstructions parse exactly this often")
    p.add_argument("--tokenizer_steps", type=int, default=10 ** 9)
    p.add_argument("--d_model", type=int, default=384)
    p.add_argument("--num_layers", type=int, default=8)
    p.add_argument("--n_heads", type=int, default=6)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--train_seconds", type=float, default=160.0)
    p.add_argument("--train_steps", type=int, default=10 ** 9)
    p.add_argument("--generate_share", type=float, default=0.75)
    p.add_argument("--feature_steps", type=int, default=400)
    p.add_argument("--gen_batch", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=32)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 5.0])
    p.add_argument("--candidates", type=int, default=4)
    args = p.parse_args(argv)
    if args.quick:
        args.num_train, args.num_eval, args.codebook_size, args.tok_channels = 64, 4, 64, 32
        args.tok_batch, args.tokenizer_steps, args.tokenizer_seconds = 8, 4, 60.0
        args.d_model, args.num_layers, args.n_heads, args.batch = 32, 1, 2, 8
        args.train_steps, args.train_seconds, args.warmup, args.feature_steps = 4, 60.0, 2, 4
        args.gen_batch, args.guidance, args.candidates = 4, [1.0, 3.0], 2
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if args.quick:
        torch.set_num_threads(1)  # tiny shapes: extra threads only contend
    t0 = time.perf_counter()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "text_to_image_quick" if args.quick else "text_to_image"

    print(f"[{time.perf_counter() - t0:6.1f}s] rendering {args.num_train} train + {args.num_eval} eval scenes",
          flush=True)
    train_set = DemoImageText(args.num_train, seed=0, image_size=SIZE, language="en", max_shapes=args.max_shapes)
    eval_set = DemoImageText(args.num_eval, seed=99, image_size=SIZE, language="en", max_shapes=args.max_shapes)
    train_scenes = [train_set.scene(i) for i in range(len(train_set))]
    eval_scenes = [eval_set.scene(i) for i in range(len(eval_set))]
    train_pixels = torch.stack([image_to_tensor(render_scene(s, SIZE), SIZE) for s in train_scenes])
    eval_pixels = torch.stack([image_to_tensor(render_scene(s, SIZE), SIZE) for s in eval_scenes])
    parser_on_renders = score(eval_pixels, eval_scenes)
    held_set = DemoImageText(args.num_eval, seed=98, image_size=SIZE, language="en", max_shapes=args.max_shapes)
    held_scenes = [held_set.scene(i) for i in range(len(held_set))]
    held_pixels = torch.stack([image_to_tensor(render_scene(s, SIZE), SIZE) for s in held_scenes])

    print(f"[{time.perf_counter() - t0:6.1f}s] training the image tokenizer", flush=True)
    tok, tok_info = train_tokenizer(train_pixels, args, device, (held_pixels, held_scenes))
    train_codes = encode_all(tok, train_pixels, device)
    eval_codes = encode_all(tok, eval_pixels, device)
    recon = decode_all(tok, eval_codes, device)
    tok_info["codes_used"] = int(torch.unique(train_codes).numel())
    table: dict[str, dict[str, float]] = {"renders (parser check)": parser_on_renders,
                                          "reconstructions (ceiling)": score(recon, eval_scenes)}
    gate = table["reconstructions (ceiling)"]["exact"] >= 0.99
    print(f"[{time.perf_counter() - t0:6.1f}s] reconstructions parse exactly: "
          f"{table['reconstructions (ceiling)']['exact']:.3f} (gate >= 0.99: {'pass' if gate else 'FAIL'})",
          flush=True)

    text_tok = load_tokenizer(None)
    enc = lambda t: list(text_tok.encode(t, add_special_tokens=False))  # noqa: E731
    from m6lit.data.demo import caption_scene

    train_caps = [enc(caption_scene(s)) for s in train_scenes]
    eval_text = [caption_scene(s) for s in eval_scenes]
    eval_caps = [enc(t) for t in eval_text]
    vocab_text = len(text_tok)
    vocab = ImageVocab(vocab_text, args.codebook_size, tok.grid_size)
    prompts = {task: enc(PROMPTS[task]) for task in ("generate", "caption")}
    longest = max(len(c) for c in train_caps + eval_caps)
    config = M6Config(vocab_size=vocab.vocab_size, d_model=args.d_model, n_heads=args.n_heads,
                      d_ff=4 * args.d_model, num_layers=args.num_layers, image_size=SIZE, patch_size=16,
                      max_seq_len=-(-(len(prompts["generate"]) + longest + vocab.num_codes + 2) // 8) * 8 + 8
                      + (SIZE // 16) ** 2,  # a mixed batch pads its text to the longest row, beside the patches
                      image_codebook_size=args.codebook_size, image_grid_size=tok.grid_size,
                      pad_token_id=int(text_tok.pad_token_id), eos_token_id=int(text_tok.eos_token_id))
    data = {"captions": train_caps, "codes": train_codes, "pixels": train_pixels, "vocab": vocab,
            "prompts": prompts, "eos": int(text_tok.eos_token_id)}
    print(f"[{time.perf_counter() - t0:6.1f}s] training the M6 model", flush=True)
    model, model_info = train_model(config, data, args, device)

    print(f"[{time.perf_counter() - t0:6.1f}s] sampling and scoring", flush=True)
    decode = tok.decode
    gen_prompts = [prompts["generate"] + c for c in eval_caps]
    sweep: dict[float, float] = {}
    images: dict[float, Tensor] = {}
    for scale in args.guidance:
        images[scale] = sample(model, decode, gen_prompts, prompts["generate"], scale, args, device)
        table[f"conditional, guidance {scale:g}"] = score(images[scale], eval_scenes)
        sweep[scale] = table[f"conditional, guidance {scale:g}"]["exact"]
    best_scale = max(sweep, key=lambda s: (sweep[s], -s))
    reranked = sample(model, decode, gen_prompts, prompts["generate"], best_scale, args, device,
                      candidates=args.candidates, rerank=(prompts["caption"], [c + [data["eos"]] for c in eval_caps]))
    table[f"conditional, guidance {best_scale:g}, rerank {args.candidates}"] = score(reranked, eval_scenes)
    uncond = sample(model, decode, [prompts["generate"]] * len(eval_caps), prompts["generate"], 1.0, args, device)
    table["unconditional"] = score(uncond, eval_scenes)
    shift = [(i + 1) % len(eval_scenes) for i in range(len(eval_scenes))]
    table[f"shuffled prompts (guidance {best_scale:g})"] = score(images[best_scale], [eval_scenes[j] for j in shift])

    print(f"[{time.perf_counter() - t0:6.1f}s] FID/KID with a feature network trained on demo images", flush=True)
    features = train_features(train_pixels, train_scenes, args.feature_steps, device)
    fid = {"reconstructions": fid_kid(features, eval_pixels, recon, device),
           f"conditional, guidance {best_scale:g}": fid_kid(features, eval_pixels, images[best_scale], device),
           "reranked": fid_kid(features, eval_pixels, reranked, device),
           "unconditional": fid_kid(features, eval_pixels, uncond, device)}

    ceiling = table["reconstructions (ceiling)"]["exact"]
    best = max(table[f"conditional, guidance {best_scale:g}"]["exact"],
               table[f"conditional, guidance {best_scale:g}, rerank {args.candidates}"]["exact"])
    result = {
        "benchmark": "text_to_image", "quick": args.quick, **stamp(),
        "args": vars(args), "wall_seconds": time.perf_counter() - t0, "tokenizer": tok_info,
        "model": {k: v for k, v in model_info.items()} | {"config": config.to_dict()},
        "gate_reconstructions_exact_ge_0.99": gate, "best_guidance": best_scale,
        "goal_ratio_to_ceiling": best / ceiling if ceiling > 0 else None,
        "scene_parser": table, "guidance_sweep": {str(k): v for k, v in sweep.items()}, "fid_kid": fid,
    }
    print()
    keys = ["background", "cell", "color", "shape", "size", "exact"]
    print(f"{'condition':46s} " + " ".join(f"{k:>10s}" for k in keys))
    for cond, row in table.items():
        print(f"{cond:46s} " + " ".join(f"{row[k]:10.3f}" for k in keys))
    print()
    for cond, row in fid.items():
        print(f"{cond:46s} FID {row['fid']:9.3f}  KID {row['kid']:8.4f}")
    print(f"\nbest exact-scene rate / reconstruction ceiling = {result['goal_ratio_to_ceiling']} (goal >= 0.8); "
          f"gate {'pass' if gate else 'FAIL'}; wall {result['wall_seconds']:.0f} s")
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    metrics_png(out_dir / f"{name}.png", {k: v for k, v in table.items() if "parser check" not in k}, sweep,
                tok_info["history"])
    rows = min(6, len(eval_scenes))
    grid_png(out_dir / f"{name}_grid.png", eval_text, {
        "real": eval_pixels, "reconstruction": recon, f"guidance {best_scale:g}": images[best_scale],
        f"rerank {args.candidates}": reranked, "unconditional": uncond}, rows)
    print(f"wrote {out_dir / (name + '.json')}, {name}.png, {name}_grid.png")
    return result


if __name__ == "__main__":
    main()
