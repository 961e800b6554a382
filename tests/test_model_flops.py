"""Model FLOPs formula: a hand count, the parameter tensors it stands for, and torch's own FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from m6lit.model import M6Config, M6Model
from m6lit.model.flops import active_params_per_position, training_flops, training_flops_per_token


def _config(**overrides) -> M6Config:
    base = dict(vocab_size=64, d_model=32, n_heads=4, d_ff=64, num_layers=4, moe_layers=2, num_experts=4, top_k=2,
                image_size=16, patch_size=8, max_seq_len=48)
    base.update(overrides)
    return M6Config(**base)


def test_training_flops_equal_a_hand_count() -> None:
    # dense layer: attention 4·32² + FFN 3·32·64 = 10240; MoE layer: 4096 + router 32·4 + 2 experts 2·3·32·64 = 16512
    assert active_params_per_position(_config()) == 2 * 10240 + 2 * 16512
    # 10 text tokens + 4 patches in rows of 14 keys: scores 4 layers · 2·14·32 = 3584 per position,
    # head 10·64·32, patch projection 4·(3·8·8)·32
    want = 6 * (14 * (53504 + 3584) + 10 * 64 * 32 + 4 * 192 * 32)
    assert training_flops(_config(), text_positions=10, image_positions=4, seq_len=14) == want
    assert training_flops_per_token(_config(), 14) == 6 * (53504 + 3584 + 64 * 32)


def test_shared_blocks_count_per_logical_layer_and_split_experts_by_their_shape() -> None:
    assert active_params_per_position(_config(num_unique_blocks=2)) == active_params_per_position(_config())
    split = _config(expert_overrides=[{"block": 1, "num_experts": 8, "top_k": 4, "expert_d_ff": 32}])
    # block 1 (layer 1): router 32·8 + 4 experts of 3·32·32 instead of 128 + 2·3·32·64
    assert active_params_per_position(split) == active_params_per_position(_config()) + (4096 + 256 + 12288) - 16512


def test_dense_active_params_are_the_block_matmul_weights() -> None:
    model = M6Model(_config(moe_layers="none"))
    weights = sum(p.numel() for n, p in model.blocks.named_parameters() if p.dim() == 2)
    assert active_params_per_position(model.config) == weights


@pytest.mark.parametrize("moe_layers,patch_centered", [("none", False), (2, False), (2, True)])
def test_training_flops_equal_three_times_torch_counted_forward_flops(moe_layers, patch_centered) -> None:
    """FlopCounterMode counts the matmuls, the patch conv (and the centred form's two 1x1 convs) and SDPA's two S×S products of
    one forward; the formula is three times that (the MoE fallback runs exactly k experts per token, and the
    router)."""
    torch.manual_seed(0)
    model = M6Model(_config(moe_layers=moe_layers, patch_centered=patch_centered)).eval()
    b, t = 2, 10
    batch = {"input_ids": torch.randint(2, 64, (b, t)), "pixel_values": torch.randn(b, 3, 16, 16)}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(batch)
    p = model.config.num_patches
    counted = counter.get_flop_counts()["Global"]
    assert set(map(str, counted)) <= {"aten.mm", "aten.convolution", "aten.bmm", "aten.addmm"}, counted
    # the counter does not see inside the CPU attention kernel: add QKᵀ and AV (2·S·D multiply-adds per position
    # and layer, full S×S) by hand
    scores = 2 * (b * (t + p)) * model.config.num_layers * 2 * (t + p) * model.config.d_model
    assert 3 * (counter.get_total_flops() + scores) == training_flops(model.config, b * t, b * p, t + p)
