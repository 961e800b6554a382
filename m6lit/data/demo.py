"""Built-in procedural image–caption data: no download, deterministic, any size.

Each index draws a scene (one to three coloured shapes on a plain background, one shape per cell of a 3×3 grid)
from ``(seed, index)`` alone, renders it with PIL and describes it in English or Chinese. The caption names every
shape's colour, size, kind and position, so a model that ignores the image cannot reach a low caption loss.
Samples are produced on the fly, so the dataset can be as large as asked without using memory.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw
from torch.utils.data import Dataset

__all__ = [
    "BACKGROUNDS",
    "CAPTION_ATTRIBUTES",
    "COLORS",
    "DEMO_ATTRIBUTES",
    "POSITIONS",
    "POSITION_LABELS",
    "SHAPES",
    "SIZES",
    "DemoImageText",
    "DemoScene",
    "DemoShape",
    "ParsedCaption",
    "ParsedShape",
    "caption_scene",
    "parse_caption",
    "render_scene",
    "scene_labels",
    "score_caption",
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


#: English caption templates (index = ``DemoScene.template``); every one names the background.
EN_TEMPLATES: tuple[str, ...] = (
    "{list} on a {bg} background",
    "there is {list} on a {bg} background",
    "an image of {list} on a {bg} background",
    "a {bg} background with {list}",
)
#: Chinese caption templates: (shape phrase, lead before the listing, tail after it); every one names the background.
ZH_TEMPLATES: tuple[tuple[str, str, str], ...] = (
    ("{pos}有一个{size}的{color}{kind}", "{bg}背景上，", "。"),
    ("一个{size}的{color}{kind}在{pos}", "", "，背景是{bg}。"),
    ("{pos}是{size}的{color}{kind}", "{bg}背景上，", "。"),
    ("{pos}有一个{size}的{color}{kind}", "图中是{bg}背景，", "。"),
)


def caption_scene(scene: DemoScene) -> str:
    """Describe ``scene`` in its language with its template: the background and every shape's size, colour, kind
    and position (shapes in the scene's order). :func:`parse_caption` inverts it."""
    if scene.language == "en":
        listing = _join_en([f"a {s.size} {s.color} {s.kind} {POSITIONS[s.cell][0]}" for s in scene.shapes])
        return EN_TEMPLATES[scene.template % len(EN_TEMPLATES)].format(list=listing, bg=scene.background)
    phrase, lead, tail = ZH_TEMPLATES[scene.template % len(ZH_TEMPLATES)]
    body = "，".join(phrase.format(pos=POSITIONS[s.cell][1], size=SIZES[s.size][1], color=COLORS[s.color][1],
                                   kind=SHAPES[s.kind]) for s in scene.shapes)
    bg = BACKGROUNDS[scene.background][1]
    return lead.format(bg=bg) + body + tail.format(bg=bg)


@dataclass(frozen=True)
class ParsedShape:
    """What a caption says about one shape; ``None`` where the phrase does not say it (or not legibly)."""

    kind: str | None = None
    color: str | None = None
    size: str | None = None
    cell: int | None = None


@dataclass(frozen=True)
class ParsedCaption:
    """The scene attributes a caption names: background (``None`` if not named) and shape phrases in order."""

    background: str | None
    shapes: tuple[ParsedShape, ...]
    language: Literal["en", "zh"]


def _alternation(words: list[str]) -> str:
    """Regex alternation of ``words``, longest first (so no word matches as a prefix of a longer one)."""
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_EN_WORDS = {
    "size": {w: w for w in SIZES},
    "color": {w: w for w in COLORS},
    "kind": {w: w for w in SHAPES},
    "cell": {phrase: cell for cell, (phrase, _) in enumerate(POSITIONS)},
}
_ZH_WORDS = {
    "size": {zh + "的": w for w, (_, zh) in SIZES.items()},
    "color": {zh: w for w, (_, zh) in COLORS.items()},
    "kind": {zh: w for w, zh in SHAPES.items()},
    "cell": {zh: cell for cell, (_, zh) in enumerate(POSITIONS)},
}
_EN_BACKGROUND = re.compile(rf"\b({_alternation(list(BACKGROUNDS))}) background\b")
_ZH_BACKGROUND = re.compile(rf"(?:({_alternation([zh for _, zh in BACKGROUNDS.values()])})背景|背景是"
                            rf"({_alternation([zh for _, zh in BACKGROUNDS.values()])}))")
_ZH_BG_WORDS = {zh: w for w, (_, zh) in BACKGROUNDS.items()}
_EN_PHRASE = re.compile(r"\ban? (?!image\b)(?!(?:" + _alternation(list(BACKGROUNDS)) + r") background\b)")


def _read_phrase(phrase: str, words: dict[str, dict[str, str | int]]) -> ParsedShape:
    """The first size, colour, kind and position word found in ``phrase`` (each independently)."""
    found: dict[str, str | int | None] = {}
    for field, table in words.items():
        match = re.search(_alternation(list(table)), phrase)
        found[field] = table[match.group(0)] if match else None
    return ParsedShape(**found)  # type: ignore[arg-type]


def parse_caption(text: str) -> ParsedCaption:
    """Read the scene attributes back from a demo caption (true or generated): deterministic, never raises.

    The language is Chinese if the text has a CJK character. Shape phrases are split where the templates join
    them (English: each ``a``/``an`` that starts a shape; Chinese: ``，``), and each attribute is the first known
    word of its kind in its phrase, so a garbled or cut-off caption still yields what it legibly says. On every
    caption :func:`caption_scene` writes, this recovers the scene's background and shapes exactly.
    """
    if any("\u4e00" <= ch <= "\u9fff" for ch in text):
        match = _ZH_BACKGROUND.search(text)
        background = _ZH_BG_WORDS[match.group(1) or match.group(2)] if match else None
        body = _ZH_BACKGROUND.sub("", text)
        phrases = [p for p in re.split(r"[，,。]", body) if p.strip()]
        shapes = tuple(_read_phrase(p, _ZH_WORDS) for p in phrases)
        shapes = tuple(s for s in shapes if s != ParsedShape())
        return ParsedCaption(background, shapes, "zh")
    match = _EN_BACKGROUND.search(text)
    background = match.group(1) if match else None
    body = _EN_BACKGROUND.sub("", text)
    starts = [m.start() for m in _EN_PHRASE.finditer(body)]
    phrases = [body[a:b] for a, b in zip(starts, [*starts[1:], len(body)])]
    shapes = tuple(_read_phrase(p, _EN_WORDS) for p in phrases)
    return ParsedCaption(background, tuple(s for s in shapes if s != ParsedShape()), "en")


#: attributes :func:`score_caption` checks: per scene the background and the shape count, per shape the rest.
CAPTION_ATTRIBUTES: tuple[str, ...] = ("background", "count", "kind", "color", "size", "position")


def score_caption(scene: DemoScene, text: str) -> dict[str, tuple[int, int]]:
    """``{attribute: (correct, checked)}`` for a caption of ``scene``: background and shape count once per scene;
    kind, colour, size and position once per shape of the scene, compared with the caption's shape phrase at the
    same place in the listing (shapes are listed in cell order), so a missing phrase counts as wrong."""
    parsed = parse_caption(text)
    score = {"background": (int(parsed.background == scene.background), 1),
             "count": (int(len(parsed.shapes) == len(scene.shapes)), 1)}
    said = list(parsed.shapes) + [ParsedShape()] * max(0, len(scene.shapes) - len(parsed.shapes))
    for attribute, field in (("kind", "kind"), ("color", "color"), ("size", "size"), ("position", "cell")):
        correct = sum(getattr(s, field) == getattr(p, field) for s, p in zip(scene.shapes, said))
        score[attribute] = (correct, len(scene.shapes))
    return score


#: position label of each grid cell for :func:`scene_labels`: the English phrase without its preposition.
POSITION_LABELS: tuple[str, ...] = tuple(phrase.split(" the ", 1)[1] for phrase, _ in POSITIONS)
#: the attribute vocabulary :func:`scene_labels` draws from (attribute → values, in a fixed order).
DEMO_ATTRIBUTES: dict[str, list[str]] = {"background": list(BACKGROUNDS), "kind": list(SHAPES),
                                         "color": list(COLORS), "size": list(SIZES),
                                         "position": list(POSITION_LABELS)}


def scene_labels(scene: DemoScene) -> dict[str, list[str]]:
    """Attribute labels of a scene for tagging: the background, and the set of kinds, colours, sizes and positions
    its shapes have (multi-label; sorted in :data:`DEMO_ATTRIBUTES` order)."""
    said = {"background": {scene.background}, "kind": {s.kind for s in scene.shapes},
            "color": {s.color for s in scene.shapes}, "size": {s.size for s in scene.shapes},
            "position": {POSITION_LABELS[s.cell] for s in scene.shapes}}
    return {a: [v for v in DEMO_ATTRIBUTES[a] if v in said[a]] for a in DEMO_ATTRIBUTES}


class DemoImageText(Dataset):
    """Map-style procedural image–caption dataset of ``num_samples`` items, deterministic by ``(seed, index)``.

    Items are ``{"image": PIL.Image | None, "text": str, "origin": str, "labels": dict}`` (``labels``: the
    scene's attributes for tagging, :func:`scene_labels`). ``text_only_fraction`` of the items
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
        return {"image": image, "text": caption_scene(scene), "origin": f"demo(seed={self.seed})[{index}]",
                "labels": scene_labels(scene)}
