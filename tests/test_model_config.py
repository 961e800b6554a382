"""M6Config: validation errors name the key, dict round trip, derived values."""

from __future__ import annotations

import json

import pytest

from m6lit.model import ExpertShape, M6Config, M6Model


def _cfg(**overrides) -> M6Config:
    base = dict(vocab_size=64, d_model=32, n_heads=4, d_ff=64, num_layers=4, num_experts=4, top_k=2,
                image_size=16, patch_size=8, max_seq_len=48)
    base.update(overrides)
    return M6Config(**base)


def test_defaults_and_tiny_config_validate() -> None:
    assert M6Config().validate().num_unique_blocks == M6Config().num_layers
    cfg = _cfg(moe_layers=2, num_unique_blocks=2)
    assert cfg.validate() is cfg


BAD = [
    (dict(d_model=30, n_heads=4), "d_model", "divisible by n_heads"),
    (dict(d_model=12, n_heads=4), "n_heads", "even"),
    (dict(sharing_layout="stack", num_layers=6, num_unique_blocks=4), "num_unique_blocks", "divisible"),
    (dict(router="prototype", num_experts=6, top_k=4), "num_experts", "divisible by top_k"),
    (dict(top_k=9, num_experts=8), "top_k", "num_experts"),
    (dict(image_size=30, patch_size=8), "image_size", "patch_size"),
    (dict(capacity_factor=0.0), "capacity_factor", "> 0"),
    (dict(capacity_factor=-1.25), "capacity_factor", "> 0"),
    (dict(dropout=1.0), "dropout", "[0, 1)"),
    (dict(dropout=-0.1), "dropout", "[0, 1)"),
    (dict(moe_layers=[0], num_layers=2, num_unique_blocks=1), "moe_layers", "share block"),
    (dict(moe_layers=2, num_layers=4, num_unique_blocks=1), "moe_layers", "share block"),
    (dict(moe_layers=[1], sharing_layout="stack", num_layers=4, num_unique_blocks=2), "moe_layers", "share block"),
    (dict(num_unique_blocks=5, num_layers=4), "num_unique_blocks", "num_layers"),
    (dict(num_unique_blocks=0), "num_unique_blocks", "num_layers"),
    (dict(sharing_layout="zigzag"), "sharing_layout", "cycle"),
    (dict(router="expert_choice"), "router", "topk"),
    (dict(moe_layers="some"), "moe_layers", "all"),
    (dict(moe_layers=[0, 4]), "moe_layers", "distinct layer indices"),
    (dict(moe_layers=[1, 1]), "moe_layers", "distinct"),
    (dict(moe_layers=0), "moe_layers", "every-n"),
    (dict(vocab_size=0), "vocab_size", "positive integer"),
    (dict(d_ff=2.5), "d_ff", "positive integer"),
    (dict(expert_d_ff=0), "expert_d_ff", "positive"),
    (dict(max_seq_len=4), "max_seq_len", "image patches"),
    (dict(balance_loss_coef=-1.0), "balance_loss_coef", ">= 0"),
    (dict(z_loss_coef=-1e-3), "z_loss_coef", ">= 0"),
    (dict(norm_eps=0.0), "norm_eps", "> 0"),
    (dict(pad_token_id=64), "pad_token_id", "vocab_size"),
    (dict(eos_token_id=-1), "eos_token_id", "vocab_size"),
    (dict(activation_checkpointing="some"), "activation_checkpointing", "None (off), 'all' or a list"),
    (dict(activation_checkpointing=2), "activation_checkpointing", "None (off), 'all' or a list"),
    (dict(activation_checkpointing=[0, 4]), "activation_checkpointing", "entry 1 (4) is not a logical layer index"),
    (dict(activation_checkpointing=[-1]), "activation_checkpointing", "entry 0 (-1) is not a logical layer index"),
    (dict(activation_checkpointing=[True]), "activation_checkpointing", "entry 0 (True)"),
    (dict(activation_checkpointing=[1, 1]), "activation_checkpointing", "layer 1 is listed more than once"),
]


@pytest.mark.parametrize("overrides,key,rule", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_values_raise_value_error_naming_the_key(overrides, key, rule) -> None:
    cfg = _cfg(**overrides)
    with pytest.raises(ValueError) as err:
        cfg.validate()
    message = str(err.value)
    assert f"M6Config.{key}=" in message
    assert rule in message


def test_model_construction_validates_the_config() -> None:
    with pytest.raises(ValueError, match=r"M6Config\.d_model="):
        M6Model(_cfg(d_model=30))


def test_replace_validates_and_returns_a_copy() -> None:
    cfg = _cfg()
    other = cfg.replace(top_k=1)
    assert other.top_k == 1 and cfg.top_k == 2
    with pytest.raises(ValueError, match=r"M6Config\.top_k="):
        cfg.replace(top_k=99)


def test_from_dict_rejects_unknown_keys_by_name() -> None:
    data = _cfg().to_dict()
    data["num_expert"] = 8
    data["zz_extra"] = 1
    with pytest.raises(ValueError) as err:
        M6Config.from_dict(data)
    assert "num_expert" in str(err.value) and "zz_extra" in str(err.value)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(moe_layers=[1, 3], num_unique_blocks=2, router="prototype", capacity_factor=1.25, expert_d_ff=48),
    dict(moe_layers=(0, 1, 2, 3), sharing_layout="stack", num_unique_blocks=2, router_norm_topk=False),
    dict(moe_layers="all", num_unique_blocks=1, tie_embeddings=False, dropout=0.1),
    dict(activation_checkpointing="all"),
    dict(activation_checkpointing=(0, 3), num_unique_blocks=2),
])
def test_to_dict_from_dict_round_trip_including_json(overrides) -> None:
    cfg = _cfg(**overrides).validate()
    data = cfg.to_dict()
    assert isinstance(data, dict) and not isinstance(data["moe_layers"], tuple)
    assert not isinstance(data["activation_checkpointing"], tuple)
    assert M6Config.from_dict(data) == cfg
    again = M6Config.from_dict(json.loads(json.dumps(data)))
    assert again == cfg and again.to_dict() == data
    assert again.layer_to_block() == cfg.layer_to_block() and again.block_is_moe() == cfg.block_is_moe()


def test_derived_values_and_moe_layer_specs() -> None:
    cfg = _cfg(num_layers=6, expert_d_ff=None, d_ff=64)
    assert cfg.head_dim == 8 and cfg.num_patches == 4 and cfg.expert_hidden == 64
    assert _cfg(expert_d_ff=40).expert_hidden == 40
    assert [cfg.replace(moe_layers=2).is_moe_layer(i) for i in range(6)] == [False, True] * 3
    assert [cfg.replace(moe_layers=3).is_moe_layer(i) for i in range(6)] == [False, False, True] * 2
    assert [cfg.replace(moe_layers="all").is_moe_layer(i) for i in range(6)] == [True] * 6
    assert [cfg.replace(moe_layers="none").is_moe_layer(i) for i in range(6)] == [False] * 6
    assert [cfg.replace(moe_layers=[0, 5]).is_moe_layer(i) for i in range(6)] == [True] + [False] * 4 + [True]


def test_layouts_and_block_kinds() -> None:
    cyc = _cfg(num_layers=6, num_unique_blocks=2, moe_layers=2)
    assert cyc.layer_to_block() == [0, 1, 0, 1, 0, 1]
    assert cyc.block_is_moe() == [False, True]
    stk = _cfg(num_layers=6, num_unique_blocks=3, sharing_layout="stack", moe_layers=[2, 3])
    assert stk.layer_to_block() == [0, 0, 1, 1, 2, 2]
    assert stk.block_is_moe() == [False, True, False]
    assert _cfg(num_layers=5, num_unique_blocks=3).validate().layer_to_block() == [0, 1, 2, 0, 1]


# ---------------------------------------------------------------------------------------------- the expert-shape rule
def test_expert_shape_after_each_op() -> None:
    s = ExpertShape(8, 2, 48)
    assert s.after("segment", 4) == ExpertShape(32, 8, 12, 4)
    assert s.after("split", 3) == ExpertShape(24, 2, 48, 1)
    assert s.after("segment", 2).after("merge", 2) == s  # auto: concat undoes a segment
    assert s.after("split", 2).after("merge", 2) == s  # auto: average undoes a split
    assert s.after("segment", 2).after("merge", 2, how="average") == ExpertShape(8, 4, 24, 2)
    assert s.after("segment", 4).merge_how(2) == "concat" and s.merge_how(2) == "average"
    # prototype: 2 groups of 4; merging 4 leaves groups of one expert each
    assert s.after("merge", 4, router="prototype") == ExpertShape(2, 2, 48)


@pytest.mark.parametrize("shape,op,factor,kwargs,message", [
    (ExpertShape(4, 2, 12), "segment", 5, {}, "expert_d_ff=12 is not divisible by factor=5"),
    (ExpertShape(4, 2, 12), "merge", 4, {}, "top_k=2 × factor=4 exceeds num_experts=4; the merged layer would "
                                            "have fewer experts than each token picks"),
    (ExpertShape(4, 2, 12), "merge", 2, {"how": "concat"}, "how='concat' joins segment pieces, but the experts "
                                                           "are 1 piece(s) each — not divisible by factor=2"),
    (ExpertShape(12, 2, 12), "merge", 4, {"router": "prototype"},
     "6 experts per routing group cannot be merged in groups of factor=4"),
    (ExpertShape(12, 2, 12, 2), "merge", 4, {"how": "average"},
     "12 experts per routing group cannot be merged in groups of factor=4 whole experts of 2 segment pieces"),
    (ExpertShape(4, 2, 12), "grow", 2, {}, "op='grow' must be one of ('segment', 'split', 'merge')"),
    (ExpertShape(4, 2, 12), "split", 1, {}, "factor=1 must be an integer >= 2"),
    (ExpertShape(4, 2, 12), "merge", 2, {"how": "mean"}, "how='mean' must be one of ('auto', 'concat', 'average')"),
])
def test_expert_shape_after_says_why_an_op_cannot_run(shape, op, factor, kwargs, message) -> None:
    with pytest.raises(ValueError) as err:
        shape.after(op, factor, **kwargs)
    assert str(err.value) == message


def test_one_message_per_rule_wherever_it_is_checked() -> None:
    from m6lit.model import MoELayer, segment_experts

    core = "top_k=5 must be <= num_experts=4"
    with pytest.raises(ValueError) as shape:
        ExpertShape(4, 5, 8).check()
    with pytest.raises(ValueError) as layer:
        MoELayer(8, 8, 4, 5)
    cfg = _cfg(moe_layers="all", num_unique_blocks=4, expert_overrides=[{"block": 1, "num_experts": 4, "top_k": 5}])
    with pytest.raises(ValueError) as config:
        cfg.validate()
    assert str(shape.value) == core
    assert str(layer.value) == f"MoELayer: {core}"
    assert str(config.value).endswith(f": {core}") and str(config.value).startswith("M6Config.expert_overrides[0]=")
    with pytest.raises(ValueError) as op:
        segment_experts(MoELayer(8, 12, 4, 2), 5, name="blocks.1.ffn")
    assert str(op.value) == "segment_experts(blocks.1.ffn): expert_d_ff=12 is not divisible by factor=5"
