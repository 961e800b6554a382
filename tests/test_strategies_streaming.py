"""ParamStreamer on the CPU path (host and compute device both the CPU): training through streamed blocks is
bitwise identical to resident training (fp32, and bf16 autocast with bf16 stream copies), shared blocks are not
re-streamed, prefetch runs ahead, device storage is released after use, unused parameters get no gradient."""

from __future__ import annotations

import pytest
import torch
from _fakes import loader, tiny_config

from m6lit.model import M6Model, lm_loss
from m6lit.model.hf import generate_text
from m6lit.strategies.streaming import ParamStreamer


def _train(config, units: list[str], steps: int = 3, accumulate: int = 1, autocast: bool = False,
           shared: tuple[str, ...] = (), text_only: bool = False):
    """AdamW(fused) steps on a fresh seeded model with `units` streamed (none: resident); returns losses, final
    state, the streamer and the per-parameter gradients of the last micro-batch before the last step."""
    torch.manual_seed(0)
    model = M6Model(config)
    streamer = None
    if units:
        streamer = ParamStreamer([(n, model.get_submodule(n)) for n in units], torch.device("cpu"), prefetch=1,
                                 low_precision=torch.bfloat16 if autocast else None, shared=shared)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    batches = iter(loader(size=64))
    losses, grads = [], {}
    for _ in range(steps):
        for _ in range(accumulate):
            batch = next(batches)
            if text_only:
                batch = {k: v for k, v in batch.items() if k != "pixel_values"}
            if streamer is not None:
                streamer.begin_pass()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = model(batch)
                loss = lm_loss(out.logits, batch["labels"]) + out.aux_loss
            if streamer is not None:
                streamer.backward(loss)
            else:
                loss.backward()
            losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
        if streamer is not None:
            streamer.mark_dirty()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return losses, state, streamer, grads, model


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(a.values(), b.values()))


@pytest.mark.parametrize("blocks,units,accumulate", [
    (4, ["blocks.1", "blocks.2"], 2),   # half the blocks, gradient accumulation
    (2, ["blocks.0", "blocks.1"], 1),   # shared blocks (cycle: each runs twice per pass), all streamed
])
def test_streamed_training_is_bitwise_identical_to_resident(blocks: int, units: list[str], accumulate: int) -> None:
    config = tiny_config(num_unique_blocks=blocks)
    ref_losses, ref_state, _, ref_grads, _ = _train(config, [], accumulate=accumulate)
    losses, state, streamer, grads, _ = _train(config, units, accumulate=accumulate)
    assert losses == ref_losses
    assert _same(grads, ref_grads), "host gradients differ from resident ones"
    assert _same(state, ref_state)
    assert streamer.live_device_bytes() == 0, "device storage must be released after each step"


def test_bf16_stream_copies_under_autocast_change_no_number() -> None:
    config = tiny_config()
    ref_losses, ref_state, _, _, _ = _train(config, [], steps=2, autocast=True)
    losses, state, streamer, _, _ = _train(config, ["blocks.1", "blocks.3"], steps=2, autocast=True)
    dtypes = {g.dtype: g.names for u in streamer.units for g in u.groups}
    assert "attn.qkv.weight" in dtypes[torch.bfloat16] and "ffn.experts.w_gate" in dtypes[torch.bfloat16]
    assert "ffn.router.weight" in dtypes[torch.float32] and "attn_norm.weight" in dtypes[torch.float32]
    assert losses == ref_losses
    assert _same(state, ref_state)


def test_shared_blocks_stream_in_fp32_and_stay_exact_under_autocast() -> None:
    config = tiny_config(num_unique_blocks=2)
    ref_losses, ref_state, _, _, _ = _train(config, [], steps=2, autocast=True)
    losses, state, streamer, _, _ = _train(config, ["blocks.1"], steps=2, autocast=True, shared=("blocks.1",))
    assert all(g.dtype == torch.float32 for u in streamer.units for g in u.groups)
    assert losses == ref_losses and _same(state, ref_state)


def test_unused_parameters_get_no_gradient_as_when_resident() -> None:
    config = tiny_config()
    _, ref_state, _, ref_grads, _ = _train(config, [], steps=2, text_only=True)
    _, state, _, grads, _ = _train(config, ["embed.patches", "blocks.2"], steps=2, text_only=True)
    assert ref_grads["embed.patches.pos"] is None and grads["embed.patches.pos"] is None
    assert grads["blocks.2.attn.qkv.weight"] is not None
    assert _same(grads, ref_grads) and _same(state, ref_state)


def test_consecutive_uses_of_a_shared_block_fetch_it_once_and_prefetch_runs_ahead() -> None:
    torch.manual_seed(0)
    config = tiny_config(num_unique_blocks=2, sharing_layout="stack", moe_layers="none")  # layers 0,1 → 0; 2,3 → 1
    model = M6Model(config).eval()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    resident = M6Model(config).eval()
    resident.load_state_dict(reference)
    streamer = ParamStreamer([("blocks.0", model.blocks[0]), ("blocks.1", model.blocks[1])], torch.device("cpu"))
    live_at_start: list[tuple[bool, bool]] = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *_: live_at_start.append(tuple(u.live for u in streamer.units)))
    batch = next(iter(loader(size=4)))
    with torch.no_grad():
        for _ in range(2):
            streamer.begin_pass()
            streamer.collect_stats()
            live_at_start.clear()
            out = model(batch)
    assert streamer.collect_stats().fetches == 2, "each block is fetched once per pass, not once per layer"
    # trace positions are [0, 0, 1, 1]: while block 0 runs its second layer, block 1 (next position) is in flight
    assert live_at_start[:2] == [(True, False), (True, True)], live_at_start
    torch.testing.assert_close(out.logits, resident(batch).logits, rtol=0, atol=0)
    tokens = generate_text(model, {"input_ids": batch["input_ids"][:, :5]}, max_new_tokens=4)
    assert torch.equal(tokens, generate_text(resident, {"input_ids": batch["input_ids"][:, :5]}, max_new_tokens=4))


def test_masters_hold_the_values_between_steps_and_buffers_are_left_alone() -> None:
    torch.manual_seed(0)
    model = M6Model(tiny_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    offset = model.blocks[1].ffn.router.logit_offset
    streamer = ParamStreamer([("blocks.1", model.blocks[1])], torch.device("cpu"))
    unit = streamer.units[0]
    master = unit.groups[0].master
    lo, hi = master.data_ptr(), master.data_ptr() + master.numel() * master.element_size()
    assert all(lo <= p.data_ptr() < hi for p in model.blocks[1].parameters())
    assert model.blocks[1].ffn.router.logit_offset is offset, "buffers are not streamed"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert unit.live_nbytes() == 0 and not unit.live


def test_bad_units_are_refused() -> None:
    model = M6Model(tiny_config())
    with pytest.raises(ValueError, match="prefetch=-1"):
        ParamStreamer([], torch.device("cpu"), prefetch=-1)
    with pytest.raises(ValueError, match="already belongs to another streamed unit"):
        ParamStreamer([("blocks.1", model.blocks[1]), ("blocks.1.attn", model.blocks[1].attn)], torch.device("cpu"))


@pytest.mark.parametrize("autocast", [False, True])
def test_lean_layout_leaves_gradients_where_they_land_with_their_device_norms(autocast: bool) -> None:
    config = tiny_config()
    torch.manual_seed(0)
    reference = M6Model(config)
    torch.manual_seed(0)
    model = M6Model(config)
    units = ["blocks.1", "blocks.2"]
    streamer = ParamStreamer([(n, model.get_submodule(n)) for n in units], torch.device("cpu"), lean=True,
                             low_precision=torch.bfloat16 if autocast else None)
    batch = next(iter(loader(size=4)))
    for net, stream in ((reference, None), (model, streamer)):
        if stream is not None:
            stream.begin_pass()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = net(batch)
            loss = lm_loss(out.logits, batch["labels"]) + out.aux_loss
        if stream is not None:
            stream.backward(loss)
        else:
            loss.backward()
    ref = dict(reference.named_parameters())
    checked = 0
    for unit in streamer.units:
        for g in unit.groups:
            assert g.acc is None, "no fp32 accumulator without gradient accumulation"
            assert (g.grad32 is None) == g.low_precision, "bf16 gradients land in the stream copy itself"
            landing = g.staging if g.low_precision else g.grad32
            for name, p, view, norm, got in zip(g.names, g.params, g.views(landing), g.norms, g.got_grad):
                expected = ref[f"{unit.name}.{name}"].grad
                assert p.grad is None, "the engine, not the optimizer, reads offloaded gradients"
                if expected is None:
                    assert not got and norm is None
                    continue
                assert torch.equal(view.float(), expected), name
                assert torch.equal(norm, torch.linalg.vector_norm(expected)), name
                checked += 1
    assert checked > 10
    assert streamer.live_device_bytes() == 0
