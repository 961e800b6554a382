"""M6Model: forward outputs and aux terms, the forward with a KV cache, losses, encode, accounting, imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from m6lit.model import IGNORE_INDEX, KVCache, M6Config, M6Model, lm_loss, token_stats
from m6lit.model.m6 import chunked_lm_loss, left_pad, text_positions

VOCAB = 64
EOS, PAD = 1, 0


def _model(dtype: torch.dtype = torch.float32, **overrides) -> M6Model:
    base = dict(vocab_size=VOCAB, d_model=32, n_heads=4, d_ff=64, num_layers=4, num_unique_blocks=2,
                moe_layers=2, num_experts=4, top_k=2, image_size=16, patch_size=8, max_seq_len=48,
                pad_token_id=PAD, eos_token_id=EOS)
    base.update(overrides)
    torch.manual_seed(0)
    model = M6Model(M6Config(**base)).eval().to(dtype)
    with torch.no_grad():
        model.embed.patches.pos.normal_(std=0.5)
    return model


def _prompts(images: bool, dtype: torch.dtype = torch.float32, seed: int = 3) -> dict:
    """Three right-padded prompts of lengths 5, 2 and 4."""
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 2, 4]
    ids = torch.randint(2, VOCAB, (3, 5), generator=g)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    for r, n in enumerate(lengths):
        mask[r, :n] = True
    ids[~mask] = PAD
    out = {"input_ids": ids, "attention_mask": mask}
    if images:
        out["pixel_values"] = torch.randn(3, 3, 16, 16, generator=g).to(dtype)
    return out


# ------------------------------------------------------------------------------------------------ imports
def test_import_model_package_does_not_import_lightning() -> None:
    code = ("import m6lit.model, sys; bad = [m for m in ('lightning', 'pytorch_lightning') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------------ forward
def test_forward_outputs_and_aux_loss_weighting() -> None:
    model = _model(balance_loss_coef=0.3, z_loss_coef=0.05)
    batch = _prompts(images=True)
    batch["prefix_len"] = torch.tensor([2, 1, 2])
    with torch.no_grad():
        out = model(batch, return_hidden=True)
        masked = model(dict(batch, image_mask=torch.tensor([True, False, True])))
        dense = _model(moe_layers="none")(batch)
    assert out.logits.shape == (3, 5, VOCAB) and out.image_len == 4
    assert out.hidden.shape == (3, 4 + 5, 32)
    assert sorted(out.moe_stats) == [1, 3]  # moe_layers=2: layers 1 and 3 (shared block 1)
    balance = torch.stack([s.balance_loss for s in out.moe_stats.values()]).mean()
    z = torch.stack([s.z_loss for s in out.moe_stats.values()]).mean()
    assert float(out.balance_loss) == pytest.approx(float(balance))
    assert float(out.aux_loss) == pytest.approx(0.3 * float(balance) + 0.05 * float(z), rel=1e-6)
    assert float(out.balance_loss) > 0.5 and float(out.z_loss) > 0
    # token_mask reaches the MoE layers: padding and image patches of an image_mask=False row are not counted
    n_valid = 4 * 3 + 11
    assert all(int(s.expert_counts.sum()) == n_valid * 2 for s in out.moe_stats.values())
    assert all(int(s.expert_counts.sum()) == (n_valid - 4) * 2 for s in masked.moe_stats.values())
    assert float(dense.aux_loss) == 0.0 and dense.moe_stats == {}


def test_forward_is_differentiable_to_every_parameter() -> None:
    model = _model().train()
    batch = _prompts(images=True)
    out = model(batch)
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"], IGNORE_INDEX)
    (lm_loss(out.logits, labels) + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_lm_loss_and_token_stats_shift_and_ignore() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[3, 1, IGNORE_INDEX, 2], [IGNORE_INDEX, 0, 6, IGNORE_INDEX]])
    terms = [F.cross_entropy(logits[b, t - 1], labels[b, t]) for b in range(2) for t in range(1, 4)
             if labels[b, t] != IGNORE_INDEX]
    assert float(lm_loss(logits, labels)) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-6)
    nll, count, correct = token_stats(logits, labels)
    assert int(count) == 4 and float(nll) == pytest.approx(float(torch.stack(terms).sum()), rel=1e-6)
    manual = sum(int(logits[b, t - 1].argmax() == labels[b, t]) for b in range(2) for t in range(1, 4)
                 if labels[b, t] != IGNORE_INDEX)
    assert int(correct) == manual
    empty = torch.full_like(labels, IGNORE_INDEX)
    assert float(lm_loss(logits, empty)) == 0.0


# ------------------------------------------------------------------------------------------------ KV cache
def _left(prompts: dict) -> dict:
    ids, mask = left_pad(prompts["input_ids"], prompts["attention_mask"], PAD)
    return dict(prompts, input_ids=ids, attention_mask=mask)


def test_text_positions_are_column_indices_for_right_padding_and_counts_otherwise() -> None:
    """Training batches (right-padded) keep the positions `arange(T)` they always had, bit for bit; left padding
    and holes (tokens appended after padding) count the valid tokens before each column."""
    right = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(text_positions(right), torch.arange(4).expand(4, 4))
    odd = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 1]], dtype=torch.bool)
    assert text_positions(odd).tolist() == [[0, 1, 0, 1], [0, 1, 1, 2]]


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("images", [True, False])
@pytest.mark.parametrize("padding", ["right", "left"])
@torch.no_grad()
def test_cached_steps_through_forward_equal_one_full_forward(images: bool, padding: str, qk_norm: bool) -> None:
    """Prefill into a KVCache, then one token at a time (appended after the padded width), gives the logits of one
    uncached forward over the whole sequence; prefix_len counts from each row's first token in either padding."""
    model = _model(torch.float64, qk_norm=qk_norm)
    prompts = _prompts(images, torch.float64)
    if padding == "left":
        prompts = _left(prompts)
    prompts["prefix_len"] = torch.tensor([3, 1, 2])
    extra = torch.randint(2, VOCAB, (3, 4), generator=torch.Generator().manual_seed(9))
    mask = torch.cat([prompts["attention_mask"], torch.ones(3, 4, dtype=torch.bool)], dim=1)
    full = model(dict(prompts, input_ids=torch.cat([prompts["input_ids"], extra], dim=1), attention_mask=mask)).logits
    c = model.config
    cache = KVCache(c.num_layers, 3, c.n_heads, 4 * images + 9, c.head_dim, torch.float64, torch.device("cpu"))
    steps = [model(prompts, cache=cache).logits]
    for i in range(4):
        step = {"input_ids": extra[:, i:i + 1], "attention_mask": mask[:, :5 + i + 1],
                "prefix_len": prompts["prefix_len"]}
        steps.append(model(step, cache=cache).logits)
    assert cache.get_seq_length() == 4 * images + 5 + 4
    valid = mask.clone()
    torch.testing.assert_close(torch.cat(steps, dim=1)[valid], full[valid], rtol=0, atol=1e-10)
    if padding == "left":  # the same text at the same positions: left padding changes nothing
        right = model(_prompts(images, torch.float64) | {"prefix_len": prompts["prefix_len"]}).logits
        got = full[:, :5][prompts["attention_mask"]]
        torch.testing.assert_close(got, right[_prompts(images)["attention_mask"]], rtol=0, atol=1e-10)


def test_cached_forward_errors_name_the_mismatch() -> None:
    model = _model()
    prompts = _prompts(images=True)
    c = model.config
    cache = KVCache(c.num_layers, 3, c.n_heads, 20, c.head_dim, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="cache is empty"):
        model(dict(prompts, input_ids=prompts["input_ids"][:, :3]), cache=cache)
    with torch.no_grad():
        model(prompts, cache=cache)  # 4 patches + 5 text columns
    step = {"input_ids": torch.full((3, 1), 5)}
    with pytest.raises(ValueError, match="must cover the text so far"):
        model(step, cache=cache)
    with pytest.raises(ValueError, match="the cache holds 9 positions, which does not match 3 earlier text"):
        model(dict(step, attention_mask=torch.ones(3, 4, dtype=torch.bool)), cache=cache)
    with pytest.raises(ValueError, match="max_len=20"):
        model({"input_ids": torch.full((3, 12), 5), "attention_mask": torch.ones(3, 17, dtype=torch.bool)},
              cache=cache)


# ------------------------------------------------------------------------------------------------ accounting
def test_num_parameters_counts_shared_blocks_once_and_tied_head_once() -> None:
    model = _model(num_layers=4, num_unique_blocks=2, moe_layers=2)
    stored = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == stored
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    assert blocks[1] > blocks[0]  # the MoE block is bigger
    assert model.num_parameters(unique=False) == stored + blocks[0] + blocks[1]  # each block serves two layers
    untied = _model(tie_embeddings=False)
    assert untied.num_parameters() == model.num_parameters() + VOCAB * 32
    assert model.lm_head.weight is model.embed.tokens.weight


# ------------------------------------------------------------------------------------------ chunked loss
@pytest.mark.parametrize("chunk", [1, 5, 7, 1000])
def test_chunked_lm_loss_equals_the_plain_loss_and_its_gradients(chunk: int) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 6, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (3, 6))
    labels[0, :3] = IGNORE_INDEX
    labels[2, 4:] = IGNORE_INDEX
    plain = lm_loss(hidden @ weight.T, labels)
    g_plain = torch.autograd.grad(plain, (hidden, weight))
    chunked = chunked_lm_loss(hidden, weight, labels, chunk)
    g_chunked = torch.autograd.grad(chunked, (hidden, weight))
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_chunked, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(chunked_lm_loss(hidden, weight, torch.full_like(labels, IGNORE_INDEX), chunk)) == 0.0


def test_chunked_lm_loss_through_the_model_skips_the_logits() -> None:
    model = _model().train()
    batch = _prompts(images=True)
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"], IGNORE_INDEX)
    full = model(batch)
    lean = model(batch, compute_logits=False)
    assert lean.logits.numel() == 0 and lean.hidden is not None
    loss = chunked_lm_loss(lean.hidden[:, lean.image_len:], model.lm_head.weight, labels, chunk_tokens=3)
    torch.testing.assert_close(loss, lm_loss(full.logits, labels), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        chunked_lm_loss(lean.hidden, model.lm_head.weight, labels, chunk_tokens=0)


# ------------------------------------------------------------------------------------------- compile
def _loss_and_grads(model: M6Model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(batch)
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"], IGNORE_INDEX)
    loss = lm_loss(out.logits, labels) + out.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(compiled: M6Model, eager: M6Model, batch: dict) -> None:
    loss_c, grads_c = _loss_and_grads(compiled, batch)
    loss_e, grads_e = _loss_and_grads(eager, batch)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_blocks_equal_eager_and_survive_a_delink_and_an_expert_split() -> None:
    import copy

    from m6lit.model import apply_expert_op, delink

    torch._dynamo.reset()
    eager = _model().train()
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks(backend="aot_eager")
    batch = _prompts(images=True)
    _assert_same_step(compiled, eager, batch)
    assert all(b._compiled_call_impl is not None for b in compiled.blocks)
    assert all(b._compiled_call_impl is None for b in eager.blocks)
    # delink: the clones are deep copies, which come back uncompiled; the next forward compiles them
    for m in (compiled, eager):
        delink(m)
    assert len(compiled.blocks) == 4
    _assert_same_step(compiled, eager, batch)
    assert all(b._compiled_call_impl is not None for b in compiled.blocks)
    with torch.no_grad():  # the new blocks really are the ones that run: change one, the outputs follow
        for m in (compiled, eager):
            m.blocks[3].attn.proj.weight.mul_(3.0)
    _assert_same_step(compiled, eager, batch)
    # expert split in place: parameters and expert counts change under the compiled call
    for m in (compiled, eager):
        apply_expert_op(m, "split", 2, noise=0.0)
    assert compiled.blocks[1].ffn.num_experts == 8
    _assert_same_step(compiled, eager, batch)
    assert all(b._compiled_call_impl is not None for b in compiled.blocks)
