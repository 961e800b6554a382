"""Attribute labels: validation with the sample's origin, vocabulary, multi-hot targets; demo and source labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from m6lit.data.demo import DEMO_ATTRIBUTES, DemoImageText, scene_labels
from m6lit.data.labels import AttributeVocab, read_labels
from m6lit.data.sources import JsonlSource

VOCAB = AttributeVocab({"color": ["red", "blue", "green"], "kind": ["circle", "square"]})


def test_multi_hot_targets_follow_the_vocabulary_order() -> None:
    target = VOCAB.encode({"color": ["blue", "red"], "kind": "square"}, "x:1")
    assert target.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert VOCAB.encode({"kind": "circle"}, "x:2").tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert VOCAB.spans() == {"color": slice(0, 3), "kind": slice(3, 5)} and VOCAB.size == 5


@pytest.mark.parametrize("raw,message", [
    (None, "x.jsonl:3: the sample has no 'labels' field"),
    (["red"], "x.jsonl:3: 'labels' must be an object"),
    ({"color": 3}, r"x.jsonl:3: labels\['color'\] must be a string or a list"),
    ({"colour": "red"}, "x.jsonl:3: unknown attribute 'colour' in labels"),
    ({"color": ["red", "pink"]}, "x.jsonl:3: unknown value 'pink' for attribute 'color'"),
])
def test_bad_labels_name_the_sample(raw, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VOCAB.encode(raw, "x.jsonl:3")


def test_vocabulary_from_labels_and_bad_vocabularies() -> None:
    vocab = AttributeVocab.from_labels([({"a": "x"}, "s:1"), ({"a": ["y", "x"], "b": "z"}, "s:2")])
    assert vocab.attributes == {"a": ["x", "y"], "b": ["z"]}
    with pytest.raises(ValueError, match="without repeats"):
        AttributeVocab({"a": ["x", "x"]})
    with pytest.raises(ValueError, match="empty"):
        AttributeVocab({})
    assert read_labels({"a": "x"}, "o") == {"a": ["x"]}


def test_demo_labels_are_the_scene_attributes() -> None:
    data = DemoImageText(50, seed=4, image_size=32)
    for i in range(50):
        scene, labels = data.scene(i), data[i]["labels"]
        assert labels == scene_labels(scene)
        assert labels["background"] == [scene.background]
        assert set(labels["color"]) == {s.color for s in scene.shapes}
        assert len(labels["position"]) == len(scene.shapes)
        target = AttributeVocab(DEMO_ATTRIBUTES).encode(labels, f"demo[{i}]")
        assert int(target.sum()) == sum(len(v) for v in labels.values())
    assert scene_labels(DemoImageText(9, seed=0, max_shapes=1).scene(0))["position"][0] in DEMO_ATTRIBUTES["position"]
    assert DEMO_ATTRIBUTES["position"][:3] == ["top left", "top", "top right"]


def test_jsonl_samples_carry_their_labels(tmp_path: Path) -> None:
    manifest = tmp_path / "data.jsonl"
    manifest.write_text(json.dumps({"text": "a", "labels": {"color": "red"}}) + "\n" + json.dumps({"text": "b"}) + "\n")
    source = JsonlSource(manifest)
    assert source[0]["labels"] == {"color": "red"} and "labels" not in source[1]
    with pytest.raises(ValueError, match=rf"{manifest}:2: the sample has no 'labels'"):
        VOCAB.encode(source[1].get("labels"), source[1]["origin"])
    assert torch.equal(VOCAB.encode(source[0]["labels"], source[0]["origin"]), torch.tensor([1.0, 0, 0, 0, 0]))
