"""CUDA-only: the grouped_mm expert path against the per-expert fallback, and a full MoELayer under bf16 autocast
against the same layer in fp32 on the CPU; compiled FlexAttention against the dense-mask reference (outputs and
gradients, the model, generation with the cache); a training step free of host syncs; compiled blocks. Skipped
without a GPU (and the grouped tests without grouped_mm/SM80+)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from m6lit.model import GroupedExperts, MoELayer
from m6lit.model.hf import generate_text
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
        # the router's gradient sums, per token, gate-weighted dot products of bf16 expert outputs with the upstream
        # gradient: one more bf16 rounding per term than the expert weights' gradients (measured 1.02e-2 on the H200)
        bound = 2 * TOL if name == "router" else TOL
        assert _rel(pg.grad, pc.grad) < bound, (name, _rel(pg.grad, pc.grad))
    for w in (gpu.experts.w_gate, gpu.experts.w_up, gpu.experts.w_down):
        assert torch.equal(w.grad[5], torch.zeros_like(w.grad[5]))


# ------------------------------------------------------------------------------------------- FlexAttention
def _key_patterns(device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """Right, left and two-sided padding, a full row and a single valid key; causal, partial and full prefixes;
    a length that is not a multiple of FlexAttention's 128-block."""
    s = 200
    valid = torch.zeros(5, s, dtype=torch.bool)
    valid[0, :150] = True
    valid[1, 60:] = True
    valid[2, 10:170] = True
    valid[3] = True
    valid[4, 0] = True
    bidir = torch.tensor([40, 100, 0, 200, 1])
    return valid.to(device), bidir.to(device)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_flex_attention_output_and_gradients_equal_the_dense_mask_reference(dtype, tol) -> None:
    from m6lit.model import Attention
    from m6lit.model.attention import prefix_lm_block_mask, prefix_lm_mask

    torch.manual_seed(0)
    attn = Attention(64, 4).cuda().to(dtype)
    ref_attn = copy.deepcopy(attn)
    key_valid, bidir = _key_patterns()
    x = torch.randn(5, key_valid.shape[1], 64, device="cuda", dtype=dtype)
    out_grad = torch.randn_like(x)
    xf, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = attn(xf, prefix_lm_block_mask(key_valid, bidir))
    ref = ref_attn(xr, prefix_lm_mask(key_valid, bidir))
    (out.float() * out_grad.float()).sum().backward()
    (ref.float() * out_grad.float()).sum().backward()
    assert _rel(out, ref) < tol
    assert _rel(xf.grad, xr.grad) < tol
    for (name, p), q in zip(attn.named_parameters(), ref_attn.parameters()):
        assert _rel(p.grad, q.grad) < tol, name


def _tiny_model(**overrides):
    from m6lit.model import M6Config, M6Model

    base = dict(vocab_size=64, d_model=64, n_heads=4, d_ff=128, num_layers=4, num_unique_blocks=2, moe_layers=2,
                num_experts=8, top_k=2, image_size=32, patch_size=8, max_seq_len=96)
    base.update(overrides)
    torch.manual_seed(0)
    return M6Model(M6Config(**base)).cuda()


def _contract_batch(b: int = 4, t: int = 24, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 64, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 15:] = False
    mask[3, 5:] = False
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(~mask, -100),
             "prefix_len": torch.tensor([4, 0, 24, 3]), "pixel_values": torch.randn(b, 3, 32, 32, generator=g),
             "image_mask": torch.tensor([True, True, False, True])}
    return {k: v.cuda() for k, v in batch.items()}


def test_model_on_flex_equals_the_sdpa_reference_under_bf16_autocast() -> None:
    from m6lit.model import lm_loss

    model = _tiny_model()
    ref = copy.deepcopy(model)
    ref.attention_impl = "sdpa"
    batch = _contract_batch()
    grads = []
    for m in (model, ref):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(batch)
            loss = lm_loss(out.logits, batch["labels"]) + out.aux_loss
        loss.backward()
        grads.append((out.logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (lf, gf), (lr, gr) = grads
    assert _rel(lf, lr) < 2e-2
    assert gf.keys() == gr.keys()
    for name in gr:
        assert _rel(gf[name], gr[name]) < 5e-2, name


def test_generation_with_the_cache_is_equal_on_flex_and_sdpa() -> None:
    model = _tiny_model().eval()
    batch = _contract_batch()
    prompts = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_mask")}
    flex_cached = generate_text(model, prompts, use_cache=True, max_new_tokens=6)
    flex_uncached = generate_text(model, prompts, use_cache=False, max_new_tokens=6)
    model.attention_impl = "sdpa"
    assert torch.equal(flex_cached, generate_text(model, prompts, use_cache=True, max_new_tokens=6))
    assert torch.equal(flex_uncached, flex_cached)


# ------------------------------------------------------------------------------------------- training step
class _SyncDebug:
    """Turns on torch.cuda.set_sync_debug_mode("error") for batches [first, last] (hooks, optimizer step and the
    code between batches included) — after the first steps, which compile kernels."""

    def __new__(cls, first: int, last: int):
        import lightning as L

        class _Callback(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                torch.cuda.set_sync_debug_mode("error" if first <= batch_idx <= last else "default")

            def on_train_end(self, trainer, pl_module) -> None:
                torch.cuda.set_sync_debug_mode("default")

        return _Callback()


@pytest.mark.parametrize("moe_layers", ["none", 2])
def test_training_steps_do_not_sync_with_the_host(moe_layers) -> None:
    """The default (resident) path: Trainer, bf16-mixed, FlexAttention, logging every step's host metrics."""
    import lightning as L
    from torch.utils.data import DataLoader

    from m6lit.module import M6LitModule

    torch.manual_seed(0)
    module = M6LitModule(_tiny_model(moe_layers=moe_layers).config.to_dict(), warmup_steps=2)
    rows = [{k: v[i].cpu() for k, v in _contract_batch(seed=s).items()} for s in range(8) for i in range(4)]
    data = DataLoader(rows, batch_size=4, collate_fn=lambda r: {k: torch.stack([x[k] for x in r]) for k in r[0]},
                      pin_memory=True)
    trainer = L.Trainer(max_steps=7, accelerator="cuda", devices=1, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1000, callbacks=[_SyncDebug(2, 5)])
    try:
        trainer.fit(module, data)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.global_step == 7
    assert float(trainer.callback_metrics["train/tokens_per_sec"]) > 0


def test_non_finite_loss_still_stops_on_cuda() -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    from m6lit.module import M6LitModule

    class _Poison(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 2:
                batch["pixel_values"].fill_(float("nan"))

    module = M6LitModule(_tiny_model().config.to_dict(), warmup_steps=2)
    rows = [{k: v[i].cpu() for k, v in _contract_batch(seed=s).items()} for s in range(4) for i in range(4)]
    data = DataLoader(rows, batch_size=4, collate_fn=lambda r: {k: torch.stack([x[k] for x in r]) for k in r[0]})
    trainer = L.Trainer(max_steps=4, accelerator="cuda", devices=1, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, callbacks=[_Poison()])
    with pytest.raises(FloatingPointError, match="non-finite training loss .* at global step 2"):
        trainer.fit(module, data)


def test_compiled_blocks_train_like_eager_on_cuda() -> None:
    from m6lit.model import delink, lm_loss

    torch._dynamo.reset()
    eager = _tiny_model()
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    batch = _contract_batch()
    for step in range(2):
        if step == 1:
            for m in (compiled, eager):
                delink(m)
        results = []
        for m in (compiled, eager):
            m.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = m(batch)
                loss = lm_loss(out.logits, batch["labels"]) + out.aux_loss
            loss.backward()
            results.append((loss.detach().float(), {n: p.grad for n, p in m.named_parameters()
                                                    if p.grad is not None}))
        (lc, gc), (le, ge) = results
        assert abs(float(lc) - float(le)) < 2e-2 * abs(float(le))
        assert gc.keys() == ge.keys()
        for name in ge:
            assert _rel(gc[name], ge[name]) < 5e-2, (step, name)
    assert all(b._compiled_call_impl is not None for b in compiled.blocks)
