"""Expert segment / split / merge: exactness where stated, the precise non-exact cases, parameter maps, structural
config through delink and rebuild, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from _fakes import tiny_config

from m6lit.model import M6Config, M6Model, MoELayer, delink
from m6lit.model.experts import (
    apply_expert_op,
    layer_shape,
    merge_experts,
    segment_experts,
    split_experts,
)

D, FF = 8, 12


def _layer(num_experts: int, top_k: int, router: str = "topk", norm_topk: bool = True, capacity_factor=None,
           dtype=torch.float64, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(D, FF, num_experts, top_k, router=router, capacity_factor=capacity_factor, norm_topk=norm_topk,
                     init_std=0.5, out_init_std=0.5)
    layer.router.logit_offset.normal_(std=0.3)  # a non-zero offset must be carried through every op
    return layer.to(dtype)


def _x(n: int = 40, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(n, D, dtype=dtype)


def _snapshot(layer: MoELayer) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in [*layer.named_parameters(), *layer.named_buffers()]}


ROUTERS = [("topk", 4, 2, True), ("topk", 4, 1, True), ("topk", 5, 2, False), ("prototype", 6, 2, True),
           ("prototype", 4, 1, True)]


# ---------------------------------------------------------------------------------------------- segment
@pytest.mark.parametrize("router,num_experts,top_k,norm", ROUTERS)
@pytest.mark.parametrize("factor", [2, 3])
def test_segment_keeps_output_balance_and_z_loss(router, num_experts, top_k, norm, factor) -> None:
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        layer = _layer(num_experts, top_k, router, norm, dtype=dtype)
        x = _x(dtype=dtype)
        y0, aux0 = layer(x)
        segment_experts(layer, factor)
        assert (layer.num_experts, layer.top_k, layer.segments) == (num_experts * factor, top_k * factor, factor)
        assert layer.experts.w_gate.shape == (num_experts * factor, FF // factor, D)
        y1, aux1 = layer(x)
        torch.testing.assert_close(y1, y0, rtol=tol, atol=tol)
        # the balance loss counts assignments in fp32 whatever the layer's dtype
        torch.testing.assert_close(aux1.balance_loss, aux0.balance_loss, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(aux1.z_loss, aux0.z_loss, rtol=tol, atol=tol)
        # every piece of a chosen expert computed exactly that expert's tokens
        pieces = aux1.expert_counts.view(-1) if router == "topk" else aux1.expert_counts.view(top_k, factor, -1)
        if router == "topk":
            assert torch.equal(pieces.view(num_experts, factor), aux0.expert_counts.unsqueeze(1).expand(-1, factor))
        else:
            assert torch.equal(pieces, aux0.expert_counts.view(top_k, 1, -1).expand(-1, factor, -1))


@pytest.mark.parametrize("router,factor", [("topk", 2), ("prototype", 2), ("topk", 4), ("prototype", 4)])
def test_segmented_model_logits_equal_the_original_fp32(router, factor) -> None:
    torch.manual_seed(0)
    config = tiny_config(router=router, num_experts=4, top_k=2, expert_d_ff=16, moe_layers="all",
                         num_unique_blocks=2)
    model = M6Model(config).eval()
    batch = _batch()
    with torch.no_grad():
        before = model(batch)
        apply_expert_op(model, "segment", factor)
        after = model(batch)
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(after.aux_loss, before.aux_loss, rtol=1e-5, atol=1e-7)
    assert [model.config.expert_shape(b).top_k for b in range(2)] == [2 * factor] * 2


def test_segment_with_capacity_is_exact_for_prototype_routing() -> None:
    layer = _layer(6, 2, "prototype", capacity_factor=0.5)
    x = _x(60)
    y0, aux0 = layer(x)
    assert float(aux0.dropped_fraction) > 0  # the case must actually drop
    segment_experts(layer, 2)
    y1, aux1 = layer(x)
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(aux1.dropped_fraction, aux0.dropped_fraction)


@pytest.mark.parametrize("router,num_experts,top_k,norm", ROUTERS)
@pytest.mark.parametrize("factor", [2, 4])
def test_merge_after_segment_restores_the_parameters_bit_for_bit(router, num_experts, top_k, norm, factor) -> None:
    layer = _layer(num_experts, top_k, router, norm, dtype=torch.float32)
    with torch.no_grad():
        layer.router.logit_offset.zero_()
    before = _snapshot(layer)
    segment_experts(layer, factor)
    merge_experts(layer, factor)
    after = _snapshot(layer)
    assert (layer.num_experts, layer.top_k, layer.segments) == (num_experts, top_k, 1)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_merge_after_segment_restores_offsets_and_non_dyadic_factors_to_rounding() -> None:
    layer = _layer(4, 2, "topk", dtype=torch.float32)
    before = _snapshot(layer)
    segment_experts(layer, 3)
    merge_experts(layer, 3)
    for name, value in _snapshot(layer).items():
        torch.testing.assert_close(value, before[name], rtol=2e-7, atol=1e-7)


def test_nested_segments_merge_back_in_one_or_two_steps() -> None:
    torch.manual_seed(0)
    layer = MoELayer(D, 16, 4, 2, init_std=0.5, out_init_std=0.5)
    before = _snapshot(layer)
    x = _x(dtype=torch.float32)
    y0, _ = layer(x)
    segment_experts(layer, 2)
    segment_experts(layer, 2)
    assert layer.segments == 4 and layer.top_k == 8
    torch.testing.assert_close(layer(x)[0], y0, rtol=1e-5, atol=2e-6)
    merge_experts(layer, 4)
    assert all(torch.equal(v, before[k]) for k, v in _snapshot(layer).items())


# ---------------------------------------------------------------------------------------------- split
@pytest.mark.parametrize("router,num_experts,top_k,norm", ROUTERS)
@pytest.mark.parametrize("factor", [2, 3])
def test_split_preserves_each_experts_softmax_mass_and_logsumexp(router, num_experts, top_k, norm, factor) -> None:
    layer = _layer(num_experts, top_k, router, norm)
    x = _x()
    logits0, probs0, _, _ = layer.router(x)
    split_experts(layer, factor)
    logits1, probs1, _, _ = layer.router(x)
    assert layer.num_experts == num_experts * factor and layer.top_k == top_k
    if router == "topk":
        mass = probs1.view(-1, factor, num_experts).sum(1)  # copy c of expert e is expert c·E + e
    else:
        group = num_experts // top_k
        mass = probs1.view(-1, top_k, factor, group).sum(2)  # copy c of local a is local c·G + a, same group
    torch.testing.assert_close(mass, probs0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.logsumexp(logits1, -1), torch.logsumexp(logits0, -1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("factor", [2, 3])
def test_split_is_exact_for_topk_top1_renormalised_gates_without_noise(factor) -> None:
    layer = _layer(4, 1, "topk", norm_topk=True)
    x = _x()
    y0, aux0 = layer(x)
    split_experts(layer, factor)
    y1, aux1 = layer(x)
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(aux1.z_loss, aux0.z_loss, rtol=1e-12, atol=1e-12)


def test_split_is_not_exact_outside_that_case_and_says_how() -> None:
    # raw top-1 gate: the winner's copy holds p_e / n, so the output shrinks by exactly 1/n
    layer = _layer(4, 1, "topk", norm_topk=False)
    x = _x()
    y0, _ = layer(x)
    split_experts(layer, 2)
    torch.testing.assert_close(layer(x)[0], y0 / 2, rtol=1e-12, atol=1e-12)
    # top-2 (renormalised): both slots go to the copies of the top expert, so the second expert drops out
    layer = _layer(4, 2, "topk")
    y_top1 = _layer(4, 1, "topk")(x)[0]
    split_experts(layer, 2)
    y1 = layer(x)[0]
    torch.testing.assert_close(y1, y_top1, rtol=1e-12, atol=1e-12)
    assert float((y1 - y0).detach().abs().max()) > 1e-3
    # prototype: each group's top-1 copy holds p / n of its group, raw gate → output / n
    layer = _layer(6, 2, "prototype")
    y0, _ = layer(x)
    split_experts(layer, 2)
    torch.testing.assert_close(layer(x)[0], y0 / 2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("router,num_experts,top_k", [("topk", 4, 2), ("prototype", 6, 2)])
def test_split_noise_is_centred_seeded_and_breaks_the_tie(router, num_experts, top_k) -> None:
    layers = [_layer(num_experts, top_k, router) for _ in range(3)]
    original = layers[0].router.weight.detach().clone()
    split_experts(layers[0], 2, noise=0.05, generator=torch.Generator().manual_seed(7))
    split_experts(layers[1], 2, noise=0.05, generator=torch.Generator().manual_seed(7))
    split_experts(layers[2], 2, noise=0.0)
    rows, plain = layers[0].router.weight.detach(), layers[2].router.weight.detach()
    assert torch.equal(rows, layers[1].router.weight)
    assert not torch.equal(rows, plain)
    for layer in layers:  # experts themselves are exact copies
        assert torch.equal(layer.experts.w_up, layers[2].experts.w_up)
    merge_experts(layers[0], 2, how="average")
    torch.testing.assert_close(layers[0].router.weight, original, rtol=0, atol=1e-12)  # noise averages out


def test_split_of_a_segmented_topk_layer_keeps_pieces_together() -> None:
    layer = MoELayer(D, 16, 4, 2, init_std=0.5, out_init_std=0.5).double()
    segment_experts(layer, 2)
    split_experts(layer, 2, noise=0.1, generator=torch.Generator().manual_seed(0))
    rows = layer.router.weight.detach().view(2, 4, 2, D)  # [copy, expert, piece, D]
    assert torch.equal(rows[:, :, 0], rows[:, :, 1])
    merge_experts(layer, 2, how="average")
    assert layer.segments == 2 and layer.num_experts == 8
    merge_experts(layer, 2)  # auto: concat the pieces
    assert (layer.num_experts, layer.top_k, layer.segments) == (4, 2, 1)


# ---------------------------------------------------------------------------------------------- merge
def test_merge_after_split_restores_parameters_for_uniform_and_load_weights() -> None:
    for weights, load in (("uniform", None), ("load", torch.tensor([5, 0, 2, 9, 1, 1, 0, 4]))):
        layer = _layer(4, 2, "topk")
        before = _snapshot(layer)
        split_experts(layer, 2)
        merge_experts(layer, 2, weights=weights, load=load)
        for name, value in _snapshot(layer).items():
            torch.testing.assert_close(value, before[name], rtol=1e-14, atol=1e-14)


def test_load_weighted_merge_averages_by_token_counts_and_lse_merges_offsets() -> None:
    layer = _layer(4, 1, "topk")
    w = layer.experts.w_down.detach().clone()
    rows = layer.router.weight.detach().clone()
    offsets = layer.router.logit_offset.detach().clone()
    param_map = merge_experts(layer, 2, weights="load", load=torch.tensor([3, 0, 1, 0]), how="average")
    # average merge pairs expert e with e + E/2 (the copies a split would have made)
    torch.testing.assert_close(layer.experts.w_down[0], 0.75 * w[0] + 0.25 * w[2], rtol=0, atol=1e-15)
    torch.testing.assert_close(layer.experts.w_down[1], 0.5 * w[1] + 0.5 * w[3], rtol=0, atol=1e-15)  # no load
    torch.testing.assert_close(layer.router.weight[0], 0.75 * rows[0] + 0.25 * rows[2], rtol=0, atol=1e-15)
    torch.testing.assert_close(layer.router.logit_offset[0], torch.logaddexp(offsets[0], offsets[2]))
    assert {link.kind for link in param_map} == {"merge"} and {link.fan_out for link in param_map} == {0.5}


def test_merge_prototype_average_stays_within_groups() -> None:
    layer = _layer(8, 2, "prototype")
    w = layer.experts.w_gate.detach().clone()
    merge_experts(layer, 2, how="average")
    assert layer.num_experts == 4 and layer.top_k == 2
    # group 0 = experts 0-3 → merged 0 = avg(0, 2), 1 = avg(1, 3); group 1 = experts 4-7 → avg(4, 6), avg(5, 7)
    for new, (a, b) in enumerate([(0, 2), (1, 3), (4, 6), (5, 7)]):
        torch.testing.assert_close(layer.experts.w_gate[new], 0.5 * (w[a] + w[b]), rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------- param maps
def test_param_maps_name_every_new_parameter_with_its_state_transform() -> None:
    layer = _layer(4, 2, "topk")
    old = dict(layer.named_parameters())
    param_map = segment_experts(layer, 2, name="blocks.1.ffn")
    new = dict(layer.named_parameters())
    assert {link.new_name for link in param_map} == {f"blocks.1.ffn.{n}" for n in new}
    for link in param_map:
        short = link.new_name.removeprefix("blocks.1.ffn.")
        assert link.new is new[short] and link.sources[0] is old[short] and link.kind == "segment"
        moved = link.state_transform([link.sources[0].detach()])
        assert moved.shape == link.new.shape
        if short == "experts.w_down":  # the parameter is scaled by the factor, its optimizer state is not
            torch.testing.assert_close(link.new.detach(), moved * 2, rtol=0, atol=0)
            assert link.fan_out == 2
        else:
            assert torch.equal(link.new.detach(), moved)
    assert {link.new_name.rsplit(".", 1)[1]: link.fan_out for link in param_map} == {
        "weight": 2, "w_gate": 1, "w_up": 1, "w_down": 2}


# ---------------------------------------------------------------------------------------------- on a model
def _batch(b: int = 3, t: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 64, (b, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(b, t, dtype=torch.bool), "labels": ids.clone(),
            "prefix_len": torch.full((b,), 2), "pixel_values": torch.randn(b, 3, 16, 16, generator=g)}


def test_shared_block_changes_once_for_every_layer_and_the_config_rebuilds_it() -> None:
    torch.manual_seed(0)
    model = M6Model(tiny_config(num_unique_blocks=2, moe_layers=2, num_experts=4, top_k=1))  # block 1 = layers 1, 3
    param_map = apply_expert_op(model, "split", 2, layers=[1])
    assert {link.new_name.split(".")[1] for link in param_map} == {"1"}
    assert model.config.expert_overrides == [{"block": 1, "num_experts": 8, "top_k": 1, "expert_d_ff": 64,
                                              "segments": 1}]
    rebuilt = M6Model(M6Config.from_dict(model.config.to_dict()))
    rebuilt.load_state_dict(model.state_dict())  # strict: every shape matches
    batch = _batch()
    torch.testing.assert_close(rebuilt.eval()(batch).logits, model.eval()(batch).logits, rtol=0, atol=0)


def test_delinked_clones_inherit_their_source_blocks_expert_shape() -> None:
    torch.manual_seed(0)
    model = M6Model(tiny_config(num_unique_blocks=2, moe_layers=2, num_experts=4, top_k=2, expert_d_ff=32))
    apply_expert_op(model, "segment", 2, layers=[3])
    batch = _batch()
    before = model.eval()(batch).logits.detach()
    delink(model)  # 2 → 4 blocks: block 1 (layers 1, 3) becomes blocks 1 and 3
    assert [layer_shape(model.blocks[b].ffn).num_experts for b in (1, 3)] == [8, 8]
    assert [o["block"] for o in model.config.expert_overrides] == [1, 3]
    assert torch.equal(model(batch).logits, before)
    rebuilt = M6Model(M6Config.from_dict(model.config.to_dict()))
    rebuilt.load_state_dict(model.state_dict())
    apply_expert_op(model, "merge", 2, layers=[1])  # blocks are independent after delink
    assert model.config.expert_shape(1).num_experts == 4 and model.config.expert_shape(3).num_experts == 8


def test_config_round_trip_keeps_expert_overrides_and_drops_reverted_ones() -> None:
    torch.manual_seed(0)
    model = M6Model(tiny_config(moe_layers="all", num_experts=4, top_k=2))
    apply_expert_op(model, "segment", 2, layers=[0, 2])
    data = model.config.to_dict()
    assert M6Config.from_dict(data).to_dict() == data
    apply_expert_op(model, "merge", 2, layers=[0, 2])
    assert model.config.expert_overrides is None


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_errors_name_the_culprit() -> None:
    layer = _layer(4, 2)
    for factor in (1, 0, True, 2.0):
        with pytest.raises(ValueError, match=rf"split_experts\(MoELayer\): factor={factor!r} must be an integer"):
            split_experts(layer, factor)
    with pytest.raises(ValueError, match=r"top_k=2 × factor=4 exceeds num_experts=4"):
        merge_experts(layer, 4)
    with pytest.raises(ValueError, match=r"top_k=2 × factor=3 exceeds num_experts=4"):
        merge_experts(layer, 3, how="average")
    with pytest.raises(ValueError, match=r"how='concat' joins segment pieces.*1 piece"):
        merge_experts(layer, 2, how="concat")
    with pytest.raises(ValueError, match=r"blocks.0.ffn.*expert_d_ff=12 is not divisible by factor=5"):
        segment_experts(layer, 5, name="blocks.0.ffn")
    with pytest.raises(ValueError, match=r"weights='load' needs the experts' token counts"):
        merge_experts(layer, 2, weights="load")
    with pytest.raises(ValueError, match=r"load has shape \(3,\); expected \(4,\)"):
        merge_experts(layer, 2, weights="load", load=torch.ones(3))
    with pytest.raises(ValueError, match="noise=-0.1 must be >= 0"):
        split_experts(layer, 2, noise=-0.1)
    with pytest.raises(TypeError, match="expected an MoELayer, got SwiGLU"):
        segment_experts(M6Model(tiny_config()).blocks[0].ffn, 2)
    model = M6Model(tiny_config(moe_layers=2))
    with pytest.raises(ValueError, match=r"layer 0 is not an MoE layer \(its block 0 has a dense FFN"):
        apply_expert_op(model, "split", 2, layers=[0, 1])
    with pytest.raises(ValueError, match=r"layer 4 is not a logical layer index in \[0, num_layers=4\)"):
        apply_expert_op(model, "split", 2, layers=[4])
    with pytest.raises(ValueError, match="op='grow' must be one of"):
        apply_expert_op(model, "grow", 2)
    assert layer_shape(layer) == (4, 2, FF, 1)  # failed calls changed nothing


@pytest.mark.parametrize("entry,match", [
    ({"block": 1, "num_experts": 2, "top_k": 4}, r"expert_overrides\[0\].*top_k=4 must be <= num_experts=2"),
    ({"block": 0, "num_experts": 8}, r"expert_overrides\[0\].*block 0 is a dense block"),
    ({"block": 9}, r"expert_overrides\[0\].*block must be a physical block index in \[0, num_unique_blocks=4\)"),
    ({"block": 1, "experts": 8}, r"expert_overrides\[0\].*unknown key\(s\) \['experts'\]"),
    ({"block": 1, "num_experts": 0}, r"expert_overrides\[0\].*num_experts must be a positive integer"),
    ({"block": 1, "segments": 3}, r"expert_overrides\[0\].*segments=3 must divide top_k=2"),
])
def test_config_validation_of_expert_overrides_names_the_entry(entry, match) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_config(expert_overrides=[entry]).validate()
    with pytest.raises(ValueError, match=r"expert_overrides\[1\].*block 1 has more than one entry"):
        tiny_config(expert_overrides=[{"block": 1}, {"block": 1}]).validate()


def test_log_factor_offsets_are_what_the_docs_say() -> None:
    layer = _layer(4, 2)
    offsets = layer.router.logit_offset.detach().clone()
    split_experts(layer, 4)
    torch.testing.assert_close(layer.router.logit_offset, offsets.repeat(4) - math.log(4))
