"""Procedural demo data: deterministic by (seed, index), captions describe the pixels, any image size ≥ 16."""

from __future__ import annotations

import numpy as np
import pytest

from m6lit.data.demo import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, DemoImageText


def _pixels(sample: dict) -> np.ndarray:
    return np.asarray(sample["image"]).reshape(-1, 3)


def test_same_seed_and_index_give_the_same_sample() -> None:
    a, b = DemoImageText(50, seed=7), DemoImageText(50, seed=7)
    for i in (0, 13, 49):
        assert a[i]["text"] == b[i]["text"]
        assert np.array_equal(_pixels(a[i]), _pixels(b[i]))


def test_indices_and_seeds_differ() -> None:
    data = DemoImageText(40, seed=0)
    assert len({data[i]["text"] for i in range(40)}) >= 35
    other = DemoImageText(40, seed=1)
    assert sum(data[i]["text"] == other[i]["text"] for i in range(40)) <= 2


def test_length_and_bounds() -> None:
    data = DemoImageText(5)
    assert len(data) == 5
    with pytest.raises(IndexError):
        data[5]


def test_caption_colours_match_the_pixels() -> None:
    data = DemoImageText(60, seed=3, image_size=64)
    for i in range(60):
        sample, scene = data[i], data.scene(i)
        colours = {tuple(p) for p in np.unique(_pixels(sample), axis=0)}
        background = BACKGROUNDS[scene.background][0]
        shown = {name for name, (rgb, _) in COLORS.items() if rgb in colours}
        assert colours == {background} | {COLORS[n][0] for n in shown}
        words = {name: (name if scene.language == "en" else zh) for name, (_, zh) in COLORS.items()}
        mentioned = {name for name, word in words.items() if word in sample["text"]}
        assert mentioned == shown, (sample["text"], shown)
        dominant = max(shown, key=lambda n: int((_pixels(sample) == COLORS[n][0]).all(axis=1).sum()))
        assert words[dominant] in sample["text"]


def test_caption_mentions_every_shape_attribute() -> None:
    data = DemoImageText(40, seed=5)
    for i in range(40):
        scene, text = data.scene(i), data[i]["text"]
        for shape in scene.shapes:
            if scene.language == "en":
                words = [shape.kind, shape.size, shape.color, POSITIONS[shape.cell][0]]
            else:
                words = [SHAPES[shape.kind], SIZES[shape.size][1], COLORS[shape.color][1], POSITIONS[shape.cell][1]]
            assert all(w in text for w in words), (text, words)


def test_shape_sits_in_its_grid_cell() -> None:
    data = DemoImageText(30, seed=11, image_size=48)
    for i in range(30):
        scene = data.scene(i)
        image = np.asarray(data[i]["image"])
        for shape in scene.shapes:
            row, col = divmod(shape.cell, 3)
            mask = (image == COLORS[shape.color][0]).all(axis=2)
            ys, xs = np.nonzero(mask[row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16])
            assert len(ys) > 0


def test_both_languages_appear() -> None:
    texts = [DemoImageText(40, seed=2)[i]["text"] for i in range(40)]
    chinese = [t for t in texts if any("\u4e00" <= ch <= "\u9fff" for ch in t)]
    assert 5 < len(chinese) < 35


@pytest.mark.parametrize("size", [16, 24, 32, 97])
def test_any_image_size_from_16(size: int) -> None:
    data = DemoImageText(8, seed=4, image_size=size)
    for i in range(8):
        sample = data[i]
        assert sample["image"].size == (size, size) and sample["image"].mode == "RGB"
        assert len(np.unique(_pixels(sample), axis=0)) >= 2


def test_image_size_below_16_is_rejected() -> None:
    with pytest.raises(ValueError, match="16"):
        DemoImageText(4, image_size=15)


def test_text_only_fraction() -> None:
    data = DemoImageText(200, seed=0, text_only_fraction=0.3)
    text_only = [data[i] for i in range(200) if data[i]["image"] is None]
    assert 30 < len(text_only) < 90
    assert all(s["text"] for s in text_only)
