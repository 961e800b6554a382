"""M6Model: forward outputs and aux terms, losses, generate (cache, EOS, sampling), encode, accounting, imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from m6lit.model import IGNORE_INDEX, M6Config, M6Model, lm_loss, token_stats
from m6lit.model.m6 import chunked_lm_loss

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


# ------------------------------------------------------------------------------------------------ generate
def _greedy_by_full_forward(model: M6Model, prompts: dict, steps: int) -> list[list[int]]:
    """Reference: each prompt alone, unpadded, re-running the full forward each step (prompt = bidirectional)."""
    rows = []
    for r in range(prompts["input_ids"].shape[0]):
        n = int(prompts["attention_mask"][r].sum())
        seq = prompts["input_ids"][r, :n].tolist()
        out = []
        for _ in range(steps):
            batch = {"input_ids": torch.tensor([seq]), "prefix_len": torch.tensor([n])}
            if "pixel_values" in prompts:
                batch["pixel_values"] = prompts["pixel_values"][r:r + 1]
            token = int(model(batch).logits[0, -1].argmax())
            out.append(token)
            seq.append(token)
        rows.append(out)
    return rows


@pytest.mark.parametrize("images", [True, False])
def test_greedy_with_cache_equals_without_cache_and_a_full_forward(images) -> None:
    model = _model(torch.float64)  # fp64: no near-tie can flip an argmax between the paths
    prompts = _prompts(images, torch.float64)
    kwargs = dict(max_new_tokens=6, eos_token_id=-1)  # no EOS: all six steps run
    cached = model.generate(**prompts, use_cache=True, **kwargs)
    uncached = model.generate(**prompts, use_cache=False, **kwargs)
    assert cached.shape == (3, 6)
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        assert cached.tolist() == _greedy_by_full_forward(model, prompts, 6)
    assert len({tuple(r) for r in cached.tolist()}) > 1  # rows really differ (prompts matter)


def test_greedy_cache_agrees_in_fp32_too() -> None:
    model = _model()
    prompts = _prompts(images=True)
    a = model.generate(**prompts, max_new_tokens=5, eos_token_id=-1, use_cache=True)
    b = model.generate(**prompts, max_new_tokens=5, eos_token_id=-1, use_cache=False)
    assert torch.equal(a, b)


def test_generate_respects_max_new_tokens_and_prefix_len() -> None:
    model = _model()
    prompts = _prompts(images=False)
    for n in (1, 3, 7):
        assert model.generate(**prompts, max_new_tokens=n, eos_token_id=-1).shape == (3, n)
    full = model.generate(**prompts, max_new_tokens=4, eos_token_id=-1)
    explicit = model.generate(**prompts, prefix_len=prompts["attention_mask"].sum(1), max_new_tokens=4,
                              eos_token_id=-1)
    assert torch.equal(full, explicit)  # default prefix = whole prompt
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(**prompts, max_new_tokens=0)
    empty = dict(prompts, attention_mask=prompts["attention_mask"].clone())
    empty["attention_mask"][1] = False
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(**empty)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(**prompts, max_new_tokens=60)


class _ScriptedHead(nn.Module):
    """An lm_head that emits token 10 + step for each row, and EOS at that row's scripted step."""

    def __init__(self, stops: list[int]) -> None:
        super().__init__()
        self.stops = stops
        self.calls = 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        step = self.calls
        self.calls += 1
        logits = torch.zeros(hidden.shape[0], VOCAB, dtype=hidden.dtype)
        for r, stop in enumerate(self.stops):
            logits[r, EOS if step == stop else 10 + step] = 1.0
        return logits


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_stops_at_eos_and_pads_after_it(use_cache) -> None:
    model = _model()
    prompts = _prompts(images=True)
    model.lm_head = _ScriptedHead([1, 3, 99])
    out = model.generate(**prompts, max_new_tokens=6, use_cache=use_cache)
    assert out.tolist() == [[10, EOS, PAD, PAD, PAD, PAD],
                            [10, 11, 12, EOS, PAD, PAD],
                            [10, 11, 12, 13, 14, 15]]
    model.lm_head = _ScriptedHead([1, 2, 0])
    out = model.generate(**prompts, max_new_tokens=6, use_cache=use_cache, pad_token_id=7)
    assert out.tolist() == [[10, EOS, 7], [10, 11, EOS], [EOS, 7, 7]]  # stops once every row is done


def test_generate_stops_when_the_model_favours_eos() -> None:
    model = _model(tie_embeddings=False)
    head = nn.Linear(32, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[EOS] = 1e4
    model.lm_head = head
    out = model.generate(**_prompts(images=True), max_new_tokens=8)
    assert out.tolist() == [[EOS]] * 3


def test_sampling_is_reproducible_with_a_seeded_generator_and_tiny_top_p_is_greedy() -> None:
    model = _model()
    prompts = _prompts(images=True)
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=3.0, eos_token_id=-1)
    a = model.generate(**prompts, generator=torch.Generator().manual_seed(5), **kwargs)
    b = model.generate(**prompts, generator=torch.Generator().manual_seed(5), **kwargs)
    c = model.generate(**prompts, generator=torch.Generator().manual_seed(6), **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    greedy = model.generate(**prompts, max_new_tokens=8, eos_token_id=-1)
    assert not torch.equal(a, greedy)
    nucleus = model.generate(**prompts, max_new_tokens=8, do_sample=True, top_p=1e-6, eos_token_id=-1,
                             generator=torch.Generator().manual_seed(5))
    assert torch.equal(nucleus, greedy)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(**prompts, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(**prompts, do_sample=True, temperature=0.0)


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(M6Model._choose(logits, True, 1.0, 0.7, g)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7: tokens 2 and 3 are outside the nucleus


# ------------------------------------------------------------------------------------------------ encode
@torch.no_grad()
def test_encode_returns_finite_pooled_features_that_ignore_padding() -> None:
    model = _model()
    prompts = _prompts(images=True)
    feats = model.encode(prompts)
    assert feats.shape == (3, 32) and torch.isfinite(feats).all()
    changed = dict(prompts, input_ids=prompts["input_ids"].clone())
    changed["input_ids"][1, 2:] = torch.tensor([5, 6, 7])
    torch.testing.assert_close(model.encode(changed), feats, rtol=0, atol=1e-6)
    alone = {"input_ids": prompts["input_ids"][1:2, :2], "pixel_values": prompts["pixel_values"][1:2]}
    torch.testing.assert_close(model.encode(alone)[0], feats[1], rtol=1e-5, atol=1e-6)
    # definition: the final hidden states with all text as bidirectional prefix, mean over valid positions
    mask = prompts["attention_mask"]
    hidden = model(dict(prompts, prefix_len=mask.sum(1)), return_hidden=True).hidden
    valid = torch.cat([torch.ones(3, 4, dtype=torch.bool), mask], dim=1).unsqueeze(-1).float()
    torch.testing.assert_close(feats, (hidden * valid).sum(1) / valid.sum(1), rtol=1e-5, atol=1e-6)
    causal = model(dict(prompts, prefix_len=torch.zeros(3, dtype=torch.long)), return_hidden=True).hidden
    assert float(((causal - hidden) * valid).abs().max()) > 1e-4  # so the check above can tell them apart


@torch.no_grad()
def test_encode_image_mask_false_equals_text_only() -> None:
    model = _model()
    prompts = _prompts(images=True)
    feats = model.encode(dict(prompts, image_mask=torch.tensor([True, False, True])))
    text = model.encode({"input_ids": prompts["input_ids"][1:2], "attention_mask": prompts["attention_mask"][1:2]})
    torch.testing.assert_close(feats[1], text[0], rtol=1e-5, atol=1e-6)
    assert float((feats[0] - model.encode(prompts)[0]).abs().max()) < 1e-6


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


def test_extra_right_padding_columns_do_not_change_generation() -> None:
    model = _model()
    prompts = _prompts(images=True)
    wide = dict(prompts, input_ids=torch.cat([prompts["input_ids"], torch.full((3, 4), PAD)], dim=1),
                attention_mask=torch.cat([prompts["attention_mask"], torch.zeros(3, 4, dtype=torch.bool)], dim=1))
    for use_cache in (True, False):
        a = model.generate(**prompts, max_new_tokens=6, eos_token_id=-1, use_cache=use_cache)
        b = model.generate(**wide, max_new_tokens=6, eos_token_id=-1, use_cache=use_cache)
        assert torch.equal(a, b)


def test_generate_length_limit_does_not_depend_on_padding_width() -> None:
    model = _model()
    prompts = _prompts(images=True)  # longest prompt 5 tokens, 4 patches: 4 + 5 + 39 = 48 = max_seq_len
    ok = model.generate(**prompts, max_new_tokens=39, eos_token_id=-1)
    assert ok.shape == (3, 39)
    wide = dict(prompts, input_ids=torch.cat([prompts["input_ids"], torch.full((3, 2), PAD)], dim=1),
                attention_mask=torch.cat([prompts["attention_mask"], torch.zeros(3, 2, dtype=torch.bool)], dim=1))
    assert torch.equal(model.generate(**wide, max_new_tokens=39, eos_token_id=-1), ok)
    with pytest.raises(ValueError, match="4 image patches \\+ 5 prompt positions \\+ max_new_tokens=40"):
        model.generate(**wide, max_new_tokens=40, eos_token_id=-1)


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
