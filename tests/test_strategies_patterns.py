"""Offload patterns: ranges, lists, globs, containers, blocks a later delink creates, typos that name the closest
modules, and tied weights that must stay resident."""

from __future__ import annotations

import pytest
import torch
from _fakes import tiny_config
from torch import nn

from m6lit.model import M6Model
from m6lit.strategies.patterns import resident_params, resolve_offload


def _root(**overrides) -> nn.Module:
    torch.manual_seed(0)
    root = nn.Module()
    root.model = M6Model(tiny_config(**overrides))
    return root


def test_patterns_ranges_lists_globs_and_containers() -> None:
    root = _root(num_layers=6, num_unique_blocks=6)
    assert resolve_offload(root, ["model.blocks.[1-3]"]) == ["model.blocks.1", "model.blocks.2", "model.blocks.3"]
    assert resolve_offload(root, ["model.blocks.[0,5]"]) == ["model.blocks.0", "model.blocks.5"]
    assert resolve_offload(root, ["*.experts"]) == [f"model.blocks.{i}.ffn.experts" for i in (1, 3, 5)]
    assert resolve_offload(root, ["model.blocks"]) == [f"model.blocks.{i}" for i in range(6)], \
        "a container without a forward stands for its children"
    assert resolve_offload(root, ["model.blocks.1", "model.blocks.1.attn"]) == ["model.blocks.1"], "outermost wins"
    assert resolve_offload(root, ["model.blocks.[6-9]"]) == [], "blocks a later delink creates are not a typo"


def test_unknown_pattern_lists_the_closest_names() -> None:
    root = _root()
    with pytest.raises(ValueError, match=r"'model\.blcks\.1' matches no module\. Closest names: \['model\.blocks\.1'"):
        resolve_offload(root, ["model.blcks.1"])
    with pytest.raises(ValueError, match=r"must be an integer range"):
        resolve_offload(root, ["model.blocks.[a-b]"])
    with pytest.raises(TypeError, match="list of patterns"):
        resolve_offload(root, "model.blocks.1")


def test_tied_weights_stay_resident() -> None:
    root = _root()
    keep = resident_params(root, ["model.lm_head"])
    assert keep == {id(root.model.lm_head.weight)}, "the head's weight is the embedding's: it cannot stream"
    assert resident_params(root, ["model.blocks.1"]) == set()
