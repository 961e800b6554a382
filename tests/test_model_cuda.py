"""CUDA-only: the grouped_mm expert path against the per-expert fallback, and a full MoELayer under bf16 autocast
against the same layer in fp32 on the CPU. Skipped without a GPU (and the grouped tests without grouped_mm/SM80+)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from m6lit.model import GroupedExperts, MoELayer
from m6lit.model.moe import _can_group, _grouped_mm, init_moe_

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

E, DM, FF = 8, 64, 128  # dims multiples of 8: grouped_mm needs 16-byte aligned bf16 rows
TOL = 1e-2  # bf16: relative error ||a - b|| / ||b||


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _require_grouped() -> None:
    if _grouped_mm is None:
        pytest.skip("this torch has no grouped_mm")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("grouped_mm needs SM80+")


def _experts(seed: int = 0) -> GroupedExperts:
    torch.manual_seed(seed)
    ex = GroupedExperts(E, DM, FF)
    nn.init.normal_(ex.w_gate, std=DM ** -0.5)
    nn.init.normal_(ex.w_up, std=DM ** -0.5)
    nn.init.normal_(ex.w_down, std=FF ** -0.5)
    return ex.cuda()


def _run(ex: GroupedExperts, path, x: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype,
         scale: torch.Tensor, out_grad: torch.Tensor):
    ex.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    out = path(xi, counts, dtype, scale)
    (out.float() * out_grad).sum().backward()
    return out.detach().float(), xi.grad.float(), [w.grad.detach().float().clone() for w in
                                                   (ex.w_gate, ex.w_up, ex.w_down)]


@pytest.mark.parametrize("counts", [
    [0, 37, 5, 0, 0, 64, 1, 0],   # leading, middle and trailing empty experts
    [16, 16, 16, 16, 16, 16, 16, 16],
    [0, 0, 0, 0, 0, 0, 0, 50],    # everything on the last expert
    [3, 0, 0, 0, 0, 0, 0, 0],     # E >> tokens
])
def test_grouped_mm_path_matches_the_per_expert_fallback(counts) -> None:
    _require_grouped()
    ex = _experts()
    m = sum(counts)
    torch.manual_seed(1)
    x = torch.randn(m, DM, device="cuda")
    scale = torch.rand(m, device="cuda") + 0.5
    out_grad = torch.randn(m, DM, device="cuda")
    counts_t = torch.tensor(counts, device="cuda")
    assert _can_group(x, ex.w_gate, torch.bfloat16)

    grouped = _run(ex, ex._grouped, x, counts_t, torch.bfloat16, scale, out_grad)
    looped = _run(ex, ex._looped, x, counts_t, torch.bfloat16, scale, out_grad)
    exact = _run(ex, ex._looped, x, counts_t, torch.float32, scale, out_grad)

    for name, g, lo, ref in zip(["out", "x.grad"], grouped[:2], looped[:2], exact[:2]):
        assert torch.isfinite(g).all(), name
        assert _rel(g, lo) < TOL, (name, _rel(g, lo))
        assert _rel(g, ref) < TOL, (name, _rel(g, ref))
    for name, g, lo, ref in zip(["w_gate", "w_up", "w_down"], grouped[2], looped[2], exact[2]):
        assert torch.isfinite(g).all(), name
        assert _rel(g, lo) < TOL, (name, _rel(g, lo))
        assert _rel(g, ref) < TOL, (name, _rel(g, ref))
        for e, c in enumerate(counts):
            if c == 0:  # empty groups: exactly zero, never garbage (pytorch #172439, #193633)
                assert torch.equal(g[e], torch.zeros_like(g[e])), (name, e)
                assert torch.equal(lo[e], torch.zeros_like(lo[e])), (name, e)
            else:
                assert float(g[e].abs().sum()) > 0, (name, e)


def test_forward_dispatches_to_grouped_mm_for_bf16_inputs_and_under_autocast() -> None:
    _require_grouped()
    ex = _experts()
    counts = torch.tensor([0, 10, 3, 0, 7, 0, 0, 12], device="cuda")
    x = torch.randn(32, DM, device="cuda")
    scale = torch.rand(32, device="cuda")
    with torch.no_grad():
        grouped = ex._grouped(x, counts, torch.bfloat16, scale)
        from_bf16 = ex(x.bfloat16(), counts, scale)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            from_autocast = ex(x, counts, scale)
        fp32 = ex(x, counts, scale)
    assert from_bf16.dtype == from_autocast.dtype == torch.bfloat16
    assert torch.equal(from_bf16, grouped) and torch.equal(from_autocast, grouped)
    assert fp32.dtype == torch.float32  # fp32 outside autocast takes the exact fallback
    assert _rel(grouped, fp32) < TOL


@pytest.mark.parametrize("router,top_k,cf", [("topk", 2, None), ("topk", 1, None), ("prototype", 2, None),
                                             ("topk", 2, 1.0)])
def test_moe_layer_under_cuda_autocast_matches_fp32_cpu(router, top_k, cf) -> None:
    _require_grouped()
    torch.manual_seed(0)
    cpu = MoELayer(DM, FF, E, top_k, router=router, capacity_factor=cf)
    init_moe_(cpu, std=DM ** -0.5, out_std=FF ** -0.5)
    with torch.no_grad():
        nn.init.normal_(cpu.router.weight, std=1.0)  # well separated logits: both devices route alike
        cpu.router.logit_offset[5] = -1e4  # expert 5 never receives a token
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(2, 24, DM)
    out_grad = torch.randn(2, 24, DM)

    xc = x.clone().requires_grad_(True)
    yc, aux_c = cpu(xc)
    (yc * out_grad).sum().backward()

    xg = x.cuda().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        yg, aux_g = gpu(xg)
    (yg.float() * out_grad.cuda()).sum().backward()

    assert yg.dtype == torch.float32 and yg.shape == yc.shape
    assert torch.equal(aux_g.expert_counts.cpu(), aux_c.expert_counts)  # same routing (fp32 router)
    assert int(aux_g.expert_counts[5]) == 0
    for name in ("balance_loss", "z_loss", "dropped_fraction"):
        a, b = getattr(aux_g, name).item(), getattr(aux_c, name).item()
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), name
    assert _rel(yg, yc) < TOL
    assert _rel(xg.grad, xc.grad) < TOL
    pairs = {"router": (gpu.router.weight, cpu.router.weight), "w_gate": (gpu.experts.w_gate, cpu.experts.w_gate),
             "w_up": (gpu.experts.w_up, cpu.experts.w_up), "w_down": (gpu.experts.w_down, cpu.experts.w_down)}
    for name, (pg, pc) in pairs.items():
        if name == "router" and router == "topk" and top_k == 1:
            continue  # renormalised top-1 gate is constant 1: no gradient reaches the router from the output
        assert pg.grad.dtype == torch.float32
        assert _rel(pg.grad, pc.grad) < TOL, (name, _rel(pg.grad, pc.grad))
    for w in (gpu.experts.w_gate, gpu.experts.w_up, gpu.experts.w_down):
        assert torch.equal(w.grad[5], torch.zeros_like(w.grad[5]))
