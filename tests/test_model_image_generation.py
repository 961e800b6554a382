"""Image codes in the M6 vocabulary and their generation: the id layout round-trips, the logit masks hold, guidance
at scale 1 is plain conditional sampling, the KV cache changes nothing, region edits keep the outside, and a tiny
model memorises a few prompts' code grids."""

from __future__ import annotations

import pytest
import torch

from m6lit.model import M6Config, M6Model, lm_loss
from m6lit.model.hf import generate_text
from m6lit.model.image_generation import (caption_log_likelihood, edit_region, generate_image_codes,
                                          generate_images, pad_prompts, sample_codes)
from m6lit.model.image_vocab import ImageVocab, mask_image_ids, mask_non_code_ids
from m6lit.model.task_loss import per_task_loss

TEXT, K, GRID = 12, 6, 3  # text ids 0..11, BOI 12, EOI 13, codes 14..19


def tiny(**changes: object) -> M6Model:
    torch.manual_seed(0)
    config = M6Config(vocab_size=TEXT + 2 + K, d_model=32, n_heads=2, d_ff=64, num_layers=2, max_seq_len=40,
                      image_size=16, patch_size=8, image_codebook_size=K, image_grid_size=GRID, **changes)
    return M6Model(config).eval()


def test_vocab_layout_and_id_code_round_trip() -> None:
    vocab = ImageVocab.from_config(tiny().config)
    assert (vocab.text_vocab_size, vocab.boi, vocab.eoi, vocab.code_offset, vocab.vocab_size) == (12, 12, 13, 14, 20)
    codes = torch.arange(K).repeat(2, 1)
    ids = vocab.codes_to_ids(codes)
    assert ids.min() == 14 and ids.max() == 19 and torch.equal(vocab.ids_to_codes(ids), codes)
    with pytest.raises(ValueError, match="image-code range"):
        vocab.ids_to_codes(torch.tensor([vocab.eoi]))
    with pytest.raises(ValueError, match=r"codebook_size=6"):
        vocab.codes_to_ids(torch.tensor([K]))


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="image_codebook_size=6, image_grid_size=0: set both"):
        M6Config(vocab_size=20, image_codebook_size=6).validate()
    with pytest.raises(ValueError, match=r"M6Config.vocab_size=8: must exceed image_codebook_size \+ 2"):
        M6Config(vocab_size=8, image_codebook_size=6, image_grid_size=2).validate()
    with pytest.raises(ValueError, match="model.config.image_codebook_size=6 disagrees with data.image_tokenizer"):
        ImageVocab.from_config(tiny().config).check_tokenizer(codebook_size=8, grid_size=GRID)
    with pytest.raises(ValueError, match="model.config.image_grid_size=3 disagrees"):
        ImageVocab.from_config(tiny().config).check_tokenizer(codebook_size=K, grid_size=4)
    with pytest.raises(ValueError, match="image_codebook_size=0"):
        ImageVocab.from_config(M6Config())


def test_logit_masks() -> None:
    vocab = ImageVocab.from_config(tiny().config)
    logits = torch.zeros(2, vocab.vocab_size)
    image = mask_non_code_ids(logits, vocab)
    text = mask_image_ids(logits, vocab)
    assert torch.isinf(image[:, :14]).all() and torch.isfinite(image[:, 14:]).all()
    assert torch.isfinite(text[:, :12]).all() and torch.isinf(text[:, 12:]).all()
    # text generation never emits an image id, even when the model prefers one
    model = tiny()
    with torch.no_grad():
        model.embed.tokens.weight[12:] = model.norm.weight.detach() * 50  # tied head: image ids dominate
    with torch.no_grad():  # the model's own preference is an image id
        assert int(model({"input_ids": torch.tensor([[2, 3]])}).logits[0, -1].argmax()) >= 12
    torch.manual_seed(0)
    out = generate_text(model, {"input_ids": torch.tensor([[2, 3]])}, max_new_tokens=5, do_sample=True, top_k=0)
    assert out.numel() >= 2 and int(out.max()) < 12
    # image generation only emits codes
    codes = generate_image_codes(tiny(), torch.tensor([[2, 3, 4]]), generator=torch.Generator().manual_seed(0))
    assert codes.shape == (1, GRID * GRID) and 0 <= int(codes.min()) and int(codes.max()) < K


def test_guidance_scale_one_equals_plain_conditional_sampling() -> None:
    model = tiny()
    ids, mask = pad_prompts([[2, 3, 4, 5], [2, 6]])
    plain = generate_image_codes(model, ids, mask, generator=torch.Generator().manual_seed(3))
    guided = generate_image_codes(model, ids, mask, torch.tensor([[2]]), guidance_scale=1.0,
                                  generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain, guided)
    with pytest.raises(ValueError, match="guidance_scale=2.0 needs uncond_ids"):
        generate_image_codes(model, ids, mask, guidance_scale=2.0)


def test_cached_equals_uncached_generation() -> None:
    model = tiny()
    ids, mask = pad_prompts([[2, 3, 4, 5, 6], [2, 7]])
    for kwargs in ({"temperature": 0}, {"temperature": 1.0, "top_k": 4}):
        cached = generate_image_codes(model, ids, mask, torch.tensor([[2]]), guidance_scale=2.0, use_cache=True,
                                      generator=torch.Generator().manual_seed(1), **kwargs)
        uncached = generate_image_codes(model, ids, mask, torch.tensor([[2]]), guidance_scale=2.0, use_cache=False,
                                        generator=torch.Generator().manual_seed(1), **kwargs)
        assert torch.equal(cached, uncached)


# codes of the former decoder (its own embedding and transformer calls), recorded before generation moved onto
# M6Model.forward with a KV cache; greedy, guided greedy and guided top-k sampling, cached and recomputed
CODES_BEFORE = {
    "greedy": [[2, 2, 4, 4, 4, 4, 1, 1, 5], [5, 4, 4, 4, 3, 2, 2, 2, 2], [4, 4, 4, 0, 2, 2, 2, 5, 1]],
    "guided_greedy": [[2, 3, 3, 3, 2, 4, 1, 1, 5], [5, 4, 5, 4, 3, 4, 4, 4, 4], [4, 5, 5, 2, 1, 4, 5, 5, 1]],
    "sampled": [[2, 2, 1, 1, 2, 2, 1, 1, 2], [5, 4, 3, 2, 2, 2, 3, 1, 5], [2, 5, 1, 4, 4, 4, 4, 2, 1]],
}


@pytest.mark.parametrize("name", list(CODES_BEFORE))
@pytest.mark.parametrize("use_cache", [True, False])
def test_codes_equal_the_former_decoder(name: str, use_cache: bool) -> None:
    torch.manual_seed(0)
    model = M6Model(M6Config(vocab_size=TEXT + 2 + K, d_model=32, n_heads=2, d_ff=64, num_layers=2, max_seq_len=40,
                             image_size=16, patch_size=8, image_codebook_size=K, image_grid_size=GRID,
                             init_std=0.2)).eval()
    with torch.no_grad():
        model.embed.text_pos.weight.normal_(std=0.5)
    ids, mask = pad_prompts([[2, 3, 4, 5, 6], [2, 7], [2, 8, 9]])
    kwargs = {"greedy": {"temperature": 0}, "guided_greedy": {"temperature": 0, "guidance_scale": 2.0},
              "sampled": {"temperature": 1.0, "top_k": 4, "guidance_scale": 2.0}}[name]
    uncond = torch.tensor([[2]]) if "guidance_scale" in kwargs else None
    codes = generate_image_codes(model, ids, mask, uncond, use_cache=use_cache,
                                 generator=torch.Generator().manual_seed(1), **kwargs)
    assert codes.tolist() == CODES_BEFORE[name]


def test_sampling_filters() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_codes(logits, temperature=0), torch.ones(200, dtype=torch.long))
    assert set(sample_codes(logits, top_k=2, generator=gen).tolist()) == {1, 2}
    assert set(sample_codes(logits, top_p=0.5, generator=gen).tolist()) == {1}


def test_region_edit_keeps_the_codes_outside_the_region() -> None:
    model = tiny()
    ids, mask = pad_prompts([[2, 3, 4], [2, 5]])
    codes = torch.randint(0, K, (2, GRID * GRID), generator=torch.Generator().manual_seed(0))
    region = torch.zeros(GRID, GRID, dtype=torch.bool)
    region[1:, 1:] = True
    changed = False
    for seed in range(4):
        edited = edit_region(model, codes, region, ids, mask, generator=torch.Generator().manual_seed(seed))
        outside = ~region.flatten()
        assert torch.equal(edited[:, outside], codes[:, outside])
        changed |= not torch.equal(edited[:, ~outside], codes[:, ~outside])
    assert changed
    with pytest.raises(ValueError, match=r"expected \[..., 3, 3\]"):
        edit_region(model, codes, torch.zeros(2, 2, dtype=torch.bool), ids, mask)


def test_code_positions_are_two_dimensional() -> None:
    model = tiny()
    emb = model.embed
    ids = torch.tensor([[2, 12, 14, 14, 14, 14]])  # prompt, BOI, four identical codes
    out = emb.text(ids, torch.zeros_like(ids))  # same text position everywhere: only the grid index differs
    assert not torch.allclose(out[0, 2], out[0, 3])
    explicit = emb.text(ids[:, 2:], torch.zeros(1, 4, dtype=torch.long), code_index=torch.arange(4).view(1, 4))
    assert torch.equal(explicit, out[:, 2:])
    row = emb.code_row.weight
    assert torch.allclose(out[0, 2 + 3] - out[0, 2 + 0], row[1] - row[0])  # index 3 = row 1, col 0 in a 3x3 grid


def test_per_task_loss_averages_per_task_then_weighs() -> None:
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, 1, 2, -100, -100], [-100, 3, 3, 3, 3], [-100, -100, 4, -100, -100]])
    task_ids = torch.tensor([0, 1, 0])
    loss, means, counts = per_task_loss(logits, labels, task_ids, [1.0, 3.0, 5.0])
    a = lm_loss(logits[[0, 2]], labels[[0, 2]])
    b = lm_loss(logits[[1]], labels[[1]])
    assert torch.allclose(means[:2], torch.stack([a, b])) and counts.tolist() == [3.0, 4.0, 0.0]
    assert torch.allclose(loss, (a + 3 * b) / 4)


def test_a_tiny_model_memorises_prompts_and_generates_their_grids() -> None:
    torch.manual_seed(0)
    model = tiny()
    vocab = ImageVocab.from_config(model.config)
    prompts = [[2, 3], [2, 4], [2, 5, 6]]
    grids = torch.randint(0, K, (3, GRID * GRID), generator=torch.Generator().manual_seed(5))
    rows = [p + [vocab.boi, *vocab.codes_to_ids(g).tolist(), vocab.eoi] for p, g in zip(prompts, grids)]
    ids, mask = pad_prompts(rows)
    labels = ids.masked_fill(~mask, -100)
    prefix_len = torch.tensor([len(p) for p in prompts])
    for row, n in enumerate(prefix_len.tolist()):
        labels[row, :n] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "prefix_len": prefix_len}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = lm_loss(model(batch).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    p_ids, p_mask = pad_prompts(prompts)
    out = generate_image_codes(model, p_ids, p_mask, temperature=0)
    assert torch.equal(out, grids), f"loss {float(loss):.4f}"
    assert len({tuple(g.tolist()) for g in out}) == 3  # a different grid per prompt
    # reranking by caption likelihood and the decode hook run end to end
    result = generate_images(model, lambda c: torch.zeros(c.shape[0], 3, 16, 16), prompts, [2], num_candidates=2,
                             rerank_prompt=[7], rerank_captions=[[3, 1], [4, 1], [5, 1]], temperature=0)
    assert torch.equal(result["codes"], grids) and result["scores"].shape == (3, 2)
    scores = caption_log_likelihood(model, torch.zeros(2, 3, 16, 16), [7], [[3, 1], [4, 4, 1]])
    assert scores.shape == (2,) and (scores < 0).all()
