"""TransformerBlock activation checkpointing (`M6Config.activation_checkpointing`): the same loss, gradients, MoE aux
terms and routing counts as without it — dense, MoE, shared blocks, after a delink and an expert split — bitwise in
fp32 on the CPU (the recompute runs the same kernels on the same inputs and autograd's graph is unchanged, so every
sum happens in the same order); recompute runs exactly for the listed logical layers; less is saved for backward;
KV-cache generation ignores it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _fakes import ContractBatches, collate, tiny_config
from torch import Tensor

from m6lit.model import M6Model, MoELayer, TransformerBlock, apply_expert_op, delink, lm_loss, prefix_lm_mask
from m6lit.model.block import checkpoint_phase
from m6lit.model.hf import generate_text

Spec = Any


def _model(checkpointing: Spec = None, **overrides: Any) -> M6Model:
    torch.manual_seed(0)
    return M6Model(tiny_config(activation_checkpointing=checkpointing, **overrides)).train()


def _batch() -> dict[str, Tensor]:
    return collate([ContractBatches(8, seed=1)[i] for i in range(4)])


class _Phases:
    """Records (logical layer, checkpoint phase) for every block call."""

    def __init__(self, model: M6Model) -> None:
        self.calls: list[tuple[int, Any]] = []
        self.handles = [b.register_forward_pre_hook(self._record) for b in model.blocks]

    def _record(self, module: Any, args: tuple) -> None:
        self.calls.append((int(args[4]), checkpoint_phase()))

    def recomputed(self) -> list[int]:
        return sorted(layer for layer, phase in self.calls if phase == "recompute")


def _step(model: M6Model) -> tuple[Tensor, dict[str, Tensor], Any, _Phases]:
    """One forward and backward: loss, gradients by name, the output, and the block calls it made."""
    phases = _Phases(model)
    batch = _batch()
    out = model(batch)
    loss = lm_loss(out.logits, batch["labels"]) + out.aux_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, out, phases


def _assert_same(a: tuple, b: tuple) -> None:
    loss_a, grads_a, out_a, _ = a
    loss_b, grads_b, out_b, _ = b
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    for key in ("aux_loss", "balance_loss", "z_loss"):
        assert torch.equal(getattr(out_a, key), getattr(out_b, key)), key
    assert out_a.moe_stats.keys() == out_b.moe_stats.keys()
    for layer, stats in out_a.moe_stats.items():
        other = out_b.moe_stats[layer]
        for field in ("balance_loss", "z_loss", "expert_counts", "dropped_fraction", "router_entropy"):
            assert torch.equal(getattr(stats, field), getattr(other, field)), (layer, field)


CASES = [
    pytest.param(dict(moe_layers="none"), "all", id="dense-all"),
    pytest.param(dict(moe_layers="all"), [0, 2], id="moe-some"),
    pytest.param(dict(moe_layers="all", capacity_factor=1.0, dropout=0.1), "all", id="moe-capacity-dropout"),
    pytest.param(dict(moe_layers=2, num_unique_blocks=2), [1, 2, 3], id="shared"),
    pytest.param(dict(moe_layers="all", num_unique_blocks=1, router="prototype"), "all", id="one-block-prototype"),
]


@pytest.mark.parametrize("overrides,spec", CASES)
def test_checkpointing_gives_the_same_loss_gradients_and_moe_terms(overrides: dict, spec: Spec) -> None:
    plain = _step(_model(None, **overrides))
    checked = _step(_model(spec, **overrides))
    _assert_same(plain, checked)
    layers = list(range(4)) if spec == "all" else spec
    assert checked[3].recomputed() == layers, "exactly the listed logical layers re-run in backward"
    assert plain[3].recomputed() == []
    forward = [layer for layer, phase in checked[3].calls if phase != "recompute"]
    assert forward == [0, 1, 2, 3], "one forward call per layer"
    assert [layer for layer, phase in checked[3].calls if phase == "forward"] == layers


def test_checkpointing_follows_logical_layers_across_a_delink_and_an_expert_split() -> None:
    def delinked(spec: Spec) -> M6Model:
        model = _model(spec, moe_layers="all", num_unique_blocks=2)
        _step(model)
        model.zero_grad(set_to_none=True)
        delink(model)
        apply_expert_op(model, "split", 2, layers=[1])
        return model

    plain, checked = delinked(None), delinked([1, 3])
    assert len(checked.blocks) == 4 and checked.config.activation_checkpointing == [1, 3]
    assert checked.config.expert_shape(1).num_experts == 8
    a, b = _step(plain), _step(checked)
    _assert_same(a, b)
    assert b[3].recomputed() == [1, 3]


def test_checkpointing_saves_less_for_backward() -> None:
    def saved_bytes(spec: Spec) -> int:
        model = _model(spec, moe_layers=2)
        total = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(_batch())
        out.logits.sum().backward()
        return total

    full, some, every = saved_bytes(None), saved_bytes([0]), saved_bytes("all")
    assert every < some < full
    assert every < full / 3, (every, full)


def test_no_grad_and_kv_cache_generation_ignore_checkpointing() -> None:
    plain, checked = _model(None).eval(), _model("all").eval()
    phases = _Phases(checked)
    prompt = _batch()["input_ids"][:, :5]
    assert torch.equal(generate_text(plain, {"input_ids": prompt}, max_new_tokens=4),
                       generate_text(checked, {"input_ids": prompt}, max_new_tokens=4))
    with torch.no_grad():
        assert torch.equal(plain(_batch()).logits, checked(_batch()).logits)
    assert phases.calls and all(phase is None for _, phase in phases.calls)


# ---------------------------------------------------------------------------------------------- self-initialisation
def _block(moe: bool) -> TransformerBlock:
    layer = MoELayer(32, 48, 4, 2) if moe else None
    return TransformerBlock(32, 4, 64, moe=layer)


@pytest.mark.parametrize("moe", [False, True])
def test_block_on_the_meta_device_then_to_empty_and_reset_parameters_is_a_working_block(moe: bool) -> None:
    rng = torch.get_rng_state()
    with torch.device("meta"):
        meta = _block(moe)
    assert torch.equal(torch.get_rng_state(), rng)  # building on the meta device draws nothing
    meta.to_empty(device="cpu")
    torch.manual_seed(5)
    meta.reset_parameters()
    torch.manual_seed(5)
    eager = _block(moe)
    if moe:  # the MoE layer is built before the block, so it drew first: compare like with like
        torch.manual_seed(5)
        eager.reset_parameters()
    for (name, a), b in zip([*meta.named_parameters(), *meta.named_buffers()],
                            [*eager.parameters(), *eager.buffers()]):
        assert torch.equal(a, b), name
    assert torch.equal(meta.attn_norm.weight, torch.ones(32)) and torch.equal(meta.ffn_norm.weight, torch.ones(32))
    x = torch.randn(2, 5, 32)
    mask = prefix_lm_mask(torch.ones(2, 5, dtype=torch.bool), torch.tensor([2, 2]))
    assert torch.equal(meta(x, mask)[0], eager(x, mask)[0])
