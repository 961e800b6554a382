"""Expert parallelism: on 2 and 4 gloo ranks the sharded MoE layer equals the single-process layer on the global
batch (fp32, 1e-6 absolute; the router gradient, summed over ranks, 1e-6 relative): outputs, input/expert/router gradients, balance and z losses, expert counts — with experts that
receive no tokens (a whole rank's experts idle at 4 ranks), both router kinds and padding."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from _dist import spawn

from m6lit.model.expert_parallel import ExpertParallel, gather_expert_tensor, shard_experts
from m6lit.model.moe import MoELayer, init_moe_

TOL = dict(rtol=0, atol=1e-6)


def _layer(kind: str) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(d_model=16, d_ff=8, num_experts=8, top_k=2, router=kind)
    init_moe_(layer, std=0.3, out_std=0.3)
    with torch.no_grad():  # experts 6 and 7 never win: at 4 ranks, rank 3 owns only idle experts
        layer.router.logit_offset[6:] = -1e4
    return layer


def _check_equal_to_single_process(rank: int, world: int) -> None:
    for kind in ("topk", "prototype"):
        ref = _layer(kind)
        ep_layer = copy.deepcopy(ref)
        shard_experts(ep_layer, dist.group.WORLD)
        torch.manual_seed(1)
        x = torch.randn(world, 2, 5, 16)
        mask = torch.ones(world, 2, 5, dtype=torch.bool)
        mask[:, 1, 3:] = False
        w = torch.randn(world, 2, 5, 16)

        x_ref = x.clone().requires_grad_(True)
        y_ref, aux_ref = ref(x_ref.view(world * 2, 5, 16), mask.view(world * 2, 5))
        loss = (y_ref * w.view_as(y_ref)).sum() + aux_ref.balance_loss + 0.1 * aux_ref.z_loss
        loss.backward()

        x_r = x[rank].clone().requires_grad_(True)
        y_r, aux = ep_layer(x_r, mask[rank])
        # each rank's share of the global objective: its tokens' term plus 1/world of the global aux losses
        loss_r = (y_r * w[rank]).sum() + (aux.balance_loss + 0.1 * aux.z_loss) / world
        loss_r.backward()

        assert bool((aux_ref.expert_counts[6:] == 0).all())
        torch.testing.assert_close(y_r, y_ref.view(world, 2, 5, 16)[rank], **TOL)
        torch.testing.assert_close(aux.balance_loss, aux_ref.balance_loss, **TOL)
        torch.testing.assert_close(aux.z_loss, aux_ref.z_loss, **TOL)
        torch.testing.assert_close(aux.router_entropy, aux_ref.router_entropy, **TOL)
        assert torch.equal(aux.expert_counts, aux_ref.expert_counts)
        torch.testing.assert_close(x_r.grad, x_ref.grad[rank], **TOL)
        ep = ep_layer.expert_parallel
        for name in ("w_gate", "w_up", "w_down"):
            local = getattr(ep_layer.experts, name)
            full_grad = getattr(ref.experts, name).grad
            grad = local.grad if local.grad is not None else torch.zeros_like(local)
            torch.testing.assert_close(grad, full_grad[ep.start:ep.stop], **TOL)
            assert torch.equal(gather_expert_tensor(local.detach(), ep), getattr(ref.experts, name).detach())
        assert bool((ref.experts.w_gate.grad[6:] == 0).all())
        router_grad = ep_layer.router.weight.grad.clone()
        dist.all_reduce(router_grad)
        # summed over ranks in a different order than one process sums tokens: relative 1e-6
        torch.testing.assert_close(router_grad, ref.router.weight.grad, rtol=1e-6, atol=1e-6)


def _check_bad_sizes(rank: int, world: int) -> None:
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by the expert-parallel size 4"):
        ExpertParallel(dist.group.WORLD, 6)
    layer = _layer("topk")
    shard_experts(layer, dist.group.WORLD)
    with pytest.raises(ValueError, match="counts for 16 experts, the layer was sharded for 8"):
        layer.expert_parallel.run_experts(layer.experts, torch.zeros(0, 16), torch.zeros(16, dtype=torch.long),
                                          None)


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_layer_equals_single_process(world: int) -> None:
    spawn(_check_equal_to_single_process, world)


def test_expert_parallel_rejects_bad_sizes() -> None:
    spawn(_check_bad_sizes, 4)
