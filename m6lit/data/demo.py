"""Built-in procedural image–caption data: no download, deterministic, any size.

Each index draws a scene (one to three coloured shapes on a plain background, one shape per cell of a 3×3 grid)
from ``(seed, index)`` alone, renders it with PIL and describes it in English or Chinese. The caption names every
shape's colour, size, kind and position, so a model that ignores the image cannot reach a low caption loss.
Samples are produced on the fly, so the dataset can be as large as asked without using memory.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw
from torch.utils.data import Dataset

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "DemoImageText",
    "DemoScene",
    "DemoShape",
    "caption_scene",
    "render_scene",
]

Language = Literal["en", "zh", "both"]

#: shape colour: (RGB, Chinese word). Drawn without anti-aliasing, so these exact values appear in the image.
COLORS: dict[str, tuple[tuple[int, int, int], str]] = {
    "red": ((220, 40, 40), "红色"),
    "green": ((40, 170, 60), "绿色"),
    "blue": ((40, 80, 220), "蓝色"),
    "yellow": ((240, 210, 40), "黄色"),
    "purple": ((140, 60, 180), "紫色"),
    "orange": ((245, 140, 30), "橙色"),
}
#: background colour: (RGB, Chinese word); disjoint from the shape colours.
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], str]] = {
    "white": ((255, 255, 255), "白色"),
    "black": ((0, 0, 0), "黑色"),
    "gray": ((128, 128, 128), "灰色"),
}
SHAPES: dict[str, str] = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形", "cross": "十字形"}
#: size word: (radius as a fraction of a grid cell, Chinese word).
SIZES: dict[str, tuple[float, str]] = {"small": (0.25, "小"), "large": (0.45, "大")}
#: grid cell (row-major, 0 = top left): (English phrase, Chinese phrase).
POSITIONS: list[tuple[str, str]] = [
    ("in the top left", "左上角"),
    ("at the top", "上方"),
    ("in the top right", "右上角"),
    ("on the left", "左侧"),
    ("in the center", "中间"),
    ("on the right", "右侧"),
    ("in the bottom left", "左下角"),
    ("at the bottom", "下方"),
    ("in the bottom right", "右下角"),
]


@dataclass(frozen=True)
class DemoShape:
    """One shape of a scene: kind (key of ``SHAPES``), colour (key of ``COLORS``), size, grid cell 0–8."""

    kind: str
    color: str
    size: str
    cell: int


@dataclass(frozen=True)
class DemoScene:
    """What one demo sample shows; the caption is derived from it, never from the pixels."""

    background: str
    shapes: tuple[DemoShape, ...]
    language: Literal["en", "zh"]
    template: int
    text_only: bool


def render_scene(scene: DemoScene, image_size: int = 32) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``image_size``×``image_size`` pixels (any size ≥ 16)."""
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 for the demo data, got {image_size}")
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[scene.background][0])
    draw = ImageDraw.Draw(image)
    cell = image_size / 3
    for shape in scene.shapes:
        row, col = divmod(shape.cell, 3)
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        r = max(SIZES[shape.size][0] * cell, 1.5)
        fill = COLORS[shape.color][0]
        if shape.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape.kind == "square":
            h = 0.85 * r
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif shape.kind == "triangle":
            draw.polygon([(cx, cy - r), (cx - 0.95 * r, cy + 0.8 * r), (cx + 0.95 * r, cy + 0.8 * r)], fill=fill)
        elif shape.kind == "star":
            points = []
            for k in range(10):
                radius = r if k % 2 == 0 else 0.45 * r
                angle = -math.pi / 2 + k * math.pi / 5
                points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
            draw.polygon(points, fill=fill)
        elif shape.kind == "cross":
            t = max(0.35 * r, 0.75)
            draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
            draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
        else:
            raise ValueError(f"unknown demo shape {shape.kind!r}")
    return image


def _join_en(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption_scene(scene: DemoScene) -> str:
    """Describe ``scene`` in its language with its template: every shape's size, colour, kind and position."""
    if scene.language == "en":
        parts = [f"a {s.size} {s.color} {s.kind} {POSITIONS[s.cell][0]}" for s in scene.shapes]
        listing = _join_en(parts)
        templates = [
            "{list}",
            "there is {list}",
            "an image of {list} on a {bg} background",
            "a {bg} background with {list}",
        ]
        return templates[scene.template % len(templates)].format(list=listing, bg=scene.background)
    words = [(POSITIONS[s.cell][1], SIZES[s.size][1], COLORS[s.color][1], SHAPES[s.kind]) for s in scene.shapes]
    if scene.template % 4 == 0:
        body, lead = "，".join(f"{pos}有一个{size}的{color}{kind}" for pos, size, color, kind in words), ""
    elif scene.template % 4 == 1:
        body, lead = "，".join(f"一个{size}的{color}{kind}在{pos}" for pos, size, color, kind in words), ""
    elif scene.template % 4 == 2:
        body = "，".join(f"{pos}是{size}的{color}{kind}" for pos, size, color, kind in words)
        lead = f"{BACKGROUNDS[scene.background][1]}背景上，"
    else:
        body, lead = "，".join(f"{pos}有一个{size}的{color}{kind}" for pos, size, color, kind in words), "图中"
    return f"{lead}{body}。"


class DemoImageText(Dataset):
    """Map-style procedural image–caption dataset of ``num_samples`` items, deterministic by ``(seed, index)``.

    Items are ``{"image": PIL.Image | None, "text": str, "origin": str}``. ``text_only_fraction`` of the items
    (chosen per index) come without an image; their text is still a scene description, which gives the text
    objectives (denoising, language modelling) in-domain text. Each scene has 1 to ``max_shapes`` shapes (fewer
    shapes: shorter captions that a small model learns to ground sooner).
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        image_size: int = 32,
        language: Language = "both",
        text_only_fraction: float = 0.0,
        max_shapes: int = 3,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16 for the demo data, got {image_size}")
        if language not in ("en", "zh", "both"):
            raise ValueError(f"language must be 'en', 'zh' or 'both', got {language!r}")
        if not 0.0 <= text_only_fraction <= 1.0:
            raise ValueError(f"text_only_fraction must be in [0, 1], got {text_only_fraction}")
        if not 1 <= max_shapes <= 9:
            raise ValueError(f"max_shapes must be in [1, 9] (one shape per cell of the 3x3 grid), got {max_shapes}")
        self.max_shapes = max_shapes
        self.num_samples = num_samples
        self.seed = seed
        self.image_size = image_size
        self.language = language
        self.text_only_fraction = text_only_fraction

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> DemoScene:
        """The scene of item ``index``: a pure function of ``(seed, index)``."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"demo index {index} out of range [0, {self.num_samples})")
        rng = random.Random(f"m6lit-demo:{self.seed}:{index}")
        cells = rng.sample(range(9), rng.randint(1, self.max_shapes))
        shapes = tuple(
            DemoShape(
                kind=rng.choice(list(SHAPES)),
                color=rng.choice(list(COLORS)),
                size=rng.choice(list(SIZES)),
                cell=cell,
            )
            for cell in sorted(cells)
        )
        language = rng.choice(["en", "zh"]) if self.language == "both" else self.language
        return DemoScene(
            background=rng.choice(list(BACKGROUNDS)),
            shapes=shapes,
            language=language,
            template=rng.randrange(4),
            text_only=rng.random() < self.text_only_fraction,
        )

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        image = None if scene.text_only else render_scene(scene, self.image_size)
        return {"image": image, "text": caption_scene(scene), "origin": f"demo(seed={self.seed})[{index}]"}
