"""Cross-layer sharing and delink: parameter identity, exact function preservation, ParamMap, independence."""

from __future__ import annotations

import pytest
import torch

from m6lit.model import M6Config, M6Model, delink, fresh_block_like, layer_to_block, prefix_lm_mask
from m6lit.model.sharing import blocks_share_storage

VOCAB = 64


def _config(**overrides) -> M6Config:
    base = dict(vocab_size=VOCAB, d_model=32, n_heads=4, d_ff=64, num_layers=4, num_unique_blocks=1,
                moe_layers="all", num_experts=4, top_k=2, image_size=16, patch_size=8, max_seq_len=48)
    base.update(overrides)
    return M6Config(**base)


def _model(**overrides) -> M6Model:
    torch.manual_seed(0)
    model = M6Model(_config(**overrides)).eval()
    with torch.no_grad():
        for blk in model.blocks:  # distinct offsets per block, so buffers must be cloned too
            if blk.is_moe:
                blk.ffn.router.logit_offset.normal_()
    return model


def _batch(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(2, VOCAB, (2, 9), generator=g),
            "attention_mask": torch.tensor([[True] * 9, [True] * 6 + [False] * 3]),
            "prefix_len": torch.tensor([3, 2]),
            "pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


def _logits(model: M6Model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(batch).logits


def _ptrs(module: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def _block_numel(block: torch.nn.Module) -> int:
    return sum(p.numel() for p in block.parameters())


def test_layer_to_block_layouts() -> None:
    assert layer_to_block(6, 2, "cycle") == [0, 1, 0, 1, 0, 1]
    assert layer_to_block(6, 2, "stack") == [0, 0, 0, 1, 1, 1]
    assert layer_to_block(6, 3, "stack") == [0, 0, 1, 1, 2, 2]
    assert layer_to_block(4, 4, "cycle") == layer_to_block(4, 4, "stack") == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="sharing_layout"):
        layer_to_block(4, 2, "zigzag")


@pytest.mark.parametrize("layout,k", [("cycle", 1), ("cycle", 2), ("stack", 2), ("cycle", 3)])
def test_shared_layers_use_one_parameter_set_and_num_parameters_counts_it_once(layout, k) -> None:
    model = _model(sharing_layout=layout, num_unique_blocks=k, num_layers=6 if k == 3 else 4)
    num_layers = model.config.num_layers
    assert len(model.blocks) == k
    assert model.layer_to_block == layer_to_block(num_layers, k, layout)
    for i in range(num_layers):
        for j in range(num_layers):
            same = model.layer_to_block[i] == model.layer_to_block[j]
            a, b = model.blocks[model.layer_to_block[i]], model.blocks[model.layer_to_block[j]]
            assert (a is b) == same
            assert bool(_ptrs(a) & _ptrs(b)) == same
    per_block = _block_numel(model.blocks[0])
    assert all(_block_numel(b) == per_block for b in model.blocks)
    rest = model.num_parameters(unique=True) - k * per_block
    assert model.num_parameters(unique=True) == sum(p.numel() for p in model.parameters())
    assert model.num_parameters(unique=False) == rest + num_layers * per_block
    # the non-unique count is the size of the equivalent unshared model
    unshared = M6Model(_config(sharing_layout=layout, num_unique_blocks=num_layers, num_layers=num_layers))
    assert model.num_parameters(unique=False) == unshared.num_parameters(unique=True)


def test_shared_block_gradient_accumulates_over_its_layers() -> None:
    model = _model(num_unique_blocks=1)
    model(_batch()).logits.square().mean().backward()
    g_shared = model.blocks[0].attn.qkv.weight.grad.clone()
    model.zero_grad()
    delinked = _model(num_unique_blocks=1)
    delink(delinked)
    delinked(_batch()).logits.square().mean().backward()
    g_sum = sum(b.attn.qkv.weight.grad for b in delinked.blocks)
    torch.testing.assert_close(g_shared, g_sum, rtol=1e-5, atol=1e-8)


def _check_delinked(model: M6Model, old_blocks: list, old_map: list[int], param_map, new_k: int) -> None:
    config = model.config
    layout = config.sharing_layout
    assert len(model.blocks) == new_k and config.num_unique_blocks == new_k
    assert model.layer_to_block == layer_to_block(config.num_layers, new_k, layout)
    for i, a in enumerate(model.blocks):  # no storage shared with each other or with any old block
        for j, b in enumerate(model.blocks):
            if i != j:
                assert not blocks_share_storage(a, b), (i, j)
        for old in old_blocks:
            assert not blocks_share_storage(a, old)
            buffers_old = {buf.untyped_storage().data_ptr() for buf in old.buffers()}
            assert not any(buf.untyped_storage().data_ptr() in buffers_old for buf in a.buffers())
    fan_out = new_k // len(old_blocks)
    new_ids = {id(p) for p in model.blocks.parameters()}
    assert {id(link.new) for link in param_map} == new_ids and len(param_map) == len(new_ids)
    assert {id(p) for p in param_map.old_params()} == {id(p) for b in old_blocks for p in b.parameters()}
    source_block = {}
    for layer, nb in enumerate(model.layer_to_block):
        source_block.setdefault(nb, old_map[layer])
    for link in param_map:
        assert link.fan_out == fan_out and link.kind == "delink" and len(link.sources) == 1
        new_b = int(link.new_name.split(".")[1])
        old_b = int(link.source_names[0].split(".")[1])
        assert source_block[new_b] == old_b
        assert link.new_name.split(".", 2)[2] == link.source_names[0].split(".", 2)[2]
        assert torch.equal(link.new, link.sources[0]) and link.new is not link.sources[0]
        assert torch.equal(link.transform([link.sources[0].detach()]), link.sources[0])
        assert dict(model.named_parameters())[link.new_name] is link.new
    for old in param_map.old_params():
        copies = param_map[old]
        assert len(copies) == fan_out
        assert all(torch.equal(c, old) for c in copies)


@pytest.mark.parametrize("layout,steps", [("cycle", [4]), ("stack", [4]), ("cycle", [2, 4]), ("stack", [2, 4]),
                                          ("cycle", [2])])
def test_delink_keeps_logits_bit_identical_and_unlinks_storage(layout, steps) -> None:
    model = _model(sharing_layout=layout, num_unique_blocks=1)
    batch = _batch()
    before = _logits(model, batch)
    before_aux = model(batch).aux_loss.detach()
    for new_k in steps:
        old_blocks = list(model.blocks)
        old_map = list(model.layer_to_block)
        param_map = delink(model, None if new_k == model.config.num_layers else new_k)  # None: one per layer
        _check_delinked(model, old_blocks, old_map, param_map, new_k)
        after = _logits(model, batch)
        assert torch.equal(after, before), (layout, new_k)
        assert torch.equal(model(batch).aux_loss.detach(), before_aux)


def test_delink_with_dense_and_moe_blocks_and_rebuild_from_config() -> None:
    model = _model(num_layers=4, num_unique_blocks=2, moe_layers=2, sharing_layout="cycle")
    assert [b.is_moe for b in model.blocks] == [False, True]
    batch = _batch()
    before = _logits(model, batch)
    delink(model)
    assert [b.is_moe for b in model.blocks] == [False, True, False, True]
    assert torch.equal(_logits(model, batch), before)
    rebuilt = M6Model(M6Config.from_dict(model.config.to_dict())).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(_logits(rebuilt, batch), before)
    assert rebuilt.num_parameters(unique=True) == model.num_parameters(unique=True)
    assert model.num_parameters(unique=True) == model.num_parameters(unique=False)


def _block_snapshot(model: M6Model) -> list[dict[str, torch.Tensor]]:
    return [{n: p.detach().clone() for n, p in b.named_parameters()} for b in model.blocks]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("layout", ["cycle", "stack"])
def test_after_delink_an_update_through_one_block_changes_only_that_block(optimizer, layout) -> None:
    model = _model(sharing_layout=layout, num_unique_blocks=1)
    delink(model)
    model.train()
    target = 2
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = _block_snapshot(model)
    x = torch.randn(2, 5, 32)
    mask = prefix_lm_mask(torch.ones(2, 5, dtype=torch.bool), torch.tensor([2, 2]))
    out, aux = model.blocks[target](x, mask)
    (out.square().mean() + aux.balance_loss).backward()
    opt.step()
    after = _block_snapshot(model)
    for i, (b, a) in enumerate(zip(before, after)):
        changed = [n for n in b if not torch.equal(b[n], a[n])]
        if i == target:
            assert "attn.qkv.weight" in changed and "ffn.router.weight" in changed and "ffn.experts.w_up" in changed
        else:
            assert changed == [], (i, changed)


def test_before_delink_one_update_moves_every_layer_that_shares_the_block() -> None:
    """The counterpart of the test above: with sharing, the same update reaches all layers (one storage)."""
    model = _model(num_unique_blocks=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 5, 32)
    mask = prefix_lm_mask(torch.ones(2, 5, dtype=torch.bool), torch.tensor([2, 2]))
    before = _logits(model, _batch())
    out, _ = model.blocks[model.layer_to_block[3]](x, mask)
    out.square().mean().backward()
    opt.step()
    assert all(model.blocks[b] is model.blocks[0] for b in model.layer_to_block)
    assert not torch.equal(_logits(model, _batch()), before)


def test_delink_errors_have_clear_messages() -> None:
    unique = _model(num_unique_blocks=4)
    with pytest.raises(ValueError, match="already has num_unique_blocks=4"):
        delink(unique)
    two = _model(num_layers=6, num_unique_blocks=2)
    with pytest.raises(ValueError, match="multiple of the current 2"):
        delink(two, 3)
    with pytest.raises(ValueError, match="multiple of the current 2"):
        delink(two, 1)
    one = _model(num_layers=6, num_unique_blocks=1)
    with pytest.raises(ValueError, match="must divide num_layers=6"):
        delink(one, 4)
    assert len(one.blocks) == 1 and one.config.num_unique_blocks == 1  # a failed delink changes nothing


def test_fresh_block_like_copies_tensors_into_a_block_built_from_the_config_and_nothing_else() -> None:
    model = _model(num_unique_blocks=1)
    block = model.blocks[0]
    block.attn.qkv.weight.requires_grad_(False)
    block.ffn.experts.w_up.data = block.ffn.experts.w_up.data.to(torch.bfloat16)  # a per-tensor dtype is kept
    model.train()
    block.attn.eval()  # a per-module mode is kept
    calls = []
    block.register_forward_hook(lambda *a: calls.append("forward"))
    block.register_forward_pre_hook(lambda *a: calls.append("pre"))
    block.attn.register_full_backward_hook(lambda *a: calls.append("backward"))
    block.register_state_dict_post_hook(lambda *a: calls.append("state_dict"))
    block.register_load_state_dict_post_hook(lambda *a: calls.append("load"))
    block.attn.proj.weight.register_hook(lambda g: calls.append("grad"))
    model(_batch()).logits.sum().backward()
    calls.clear()
    rng = torch.get_rng_state()
    fresh = fresh_block_like(model, 0)
    assert torch.equal(torch.get_rng_state(), rng)  # built on the meta device: no random numbers drawn
    assert type(fresh) is type(block) and fresh is not block
    assert not blocks_share_storage(block, fresh)
    old = dict(block.named_parameters())
    for name, p in fresh.named_parameters():
        assert torch.equal(p, old[name]) and p.dtype == old[name].dtype and p.device == old[name].device
        assert p.requires_grad == old[name].requires_grad and p.grad is None and not p.is_meta
    assert fresh.ffn.experts.w_up.dtype == torch.bfloat16 and fresh.attn.qkv.weight.requires_grad is False
    assert torch.equal(fresh.ffn.router.logit_offset, block.ffn.router.logit_offset)
    assert fresh.ffn.router.logit_offset.data_ptr() != block.ffn.router.logit_offset.data_ptr()
    assert [m.training for m in fresh.modules()] == [m.training for m in block.modules()]
    assert fresh.attn.training is False and fresh.training is True
    x = torch.randn(1, 3, 32)
    mask = prefix_lm_mask(torch.ones(1, 3, dtype=torch.bool), torch.tensor([1]))
    fresh.ffn.experts.w_up.data = fresh.ffn.experts.w_up.data.float()
    out, _ = fresh(x, mask)
    out.sum().backward()
    fresh.load_state_dict(fresh.state_dict())
    assert calls == []
    block(x, mask)
    assert calls == ["pre", "forward"]


def test_fresh_block_like_names_tensors_the_config_does_not_have() -> None:
    model = _model(num_unique_blocks=1)
    model.blocks[0].attn.register_buffer("extra", torch.zeros(2))
    with pytest.raises(ValueError, match=r"blocks\.0 does not match a block built from the config: tensors only in "
                                         r"the model \['attn\.extra'\]"):
        fresh_block_like(model, 0)


def test_delink_draws_no_random_numbers() -> None:
    model = _model(num_unique_blocks=1)
    torch.manual_seed(5)
    delink(model, 2)
    delink(model)
    after = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(4))
