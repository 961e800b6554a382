"""Hugging Face wrapper: config round trip, Auto registration, logit parity with M6Model (cached and uncached),
generation through transformers against m6lit's own generate, and loading that initialises only missing weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import m6lit  # noqa: F401  (registers the auto classes)
from m6lit.model import M6Config, M6Model, lm_loss
from m6lit.model.hf import CONFIG_KEYS, M6ForConditionalGeneration, M6HFConfig

VOCAB, PAD, EOS = 64, 0, 1


def _config(**overrides) -> M6Config:
    base = {"vocab_size": VOCAB, "d_model": 32, "n_heads": 4, "d_ff": 64, "num_layers": 4, "num_unique_blocks": 2,
            "moe_layers": 2, "num_experts": 4, "top_k": 2, "image_size": 16, "patch_size": 8, "max_seq_len": 48,
            "pad_token_id": PAD, "eos_token_id": EOS, "init_std": 0.1}
    base.update(overrides)
    return M6Config(**base)


def _model(**overrides) -> M6Model:
    torch.manual_seed(0)
    model = M6Model(_config(**overrides)).eval()
    with torch.no_grad():  # larger position embeddings make greedy continuations vary from step to step
        model.embed.patches.pos.normal_(std=0.5)
        model.embed.text_pos.weight.normal_(std=0.5)
    return model


def _prompts(seed: int = 3, lengths: tuple[int, ...] = (5, 2, 4)) -> dict:
    """Right-padded prompts (m6lit's contract) and one 16x16 image per row."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(2, VOCAB, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, :n] = True
    ids[~mask] = PAD
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(len(lengths), 3, 16, 16,
                                                                                     generator=g)}


def _left_padded(prompts: dict) -> dict:
    """The same prompts padded on the left, as transformers' generate expects."""
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    left_ids, left_mask = torch.full_like(ids, PAD), torch.zeros_like(mask)
    width = ids.shape[1]
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        left_ids[row, width - n:] = ids[row, :n]
        left_mask[row, width - n:] = True
    return dict(prompts, input_ids=left_ids, attention_mask=left_mask.long())


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[M6Model, Path]:
    model = _model()
    folder = tmp_path_factory.mktemp("hf") / "m6"
    M6ForConditionalGeneration.from_m6(model).save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def loaded(saved: tuple[M6Model, Path]) -> M6ForConditionalGeneration:
    return AutoModelForCausalLM.from_pretrained(saved[1], trust_remote_code=True).eval()


# ------------------------------------------------------------------------------------------------ config
def test_config_round_trip_writes_every_field_and_no_generation_keys(saved: tuple[M6Model, Path]) -> None:
    model, folder = saved
    hf_config = M6HFConfig.from_m6_config(model.config)
    assert hf_config.to_m6_config() == model.config
    assert (hf_config.hidden_size, hf_config.num_hidden_layers, hf_config.tie_word_embeddings) == (32, 4, True)
    written = json.loads((folder / "config.json").read_text())
    assert set(CONFIG_KEYS.values()) <= set(written)  # defaults included, e.g. router and capacity_factor
    assert written["num_experts_per_tok"] == 2 and "top_k" not in written  # MoE top-k is not a sampling top_k
    assert written["model_type"] == "m6" and written["num_unique_blocks"] == 2
    assert written["auto_map"] == {"AutoConfig": "hf.M6HFConfig",
                                   "AutoModelForCausalLM": "hf.M6ForConditionalGeneration"}
    assert M6HFConfig.from_pretrained(folder).to_m6_config() == model.config


def test_config_rejects_an_invalid_m6_config_naming_the_key() -> None:
    with pytest.raises(ValueError, match="d_model"):
        M6HFConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown key"):
        M6HFConfig.from_m6_config(_config()).to_m6_config().from_dict({"nonsense": 1})


def test_auto_classes_know_m6_without_remote_code(saved: tuple[M6Model, Path]) -> None:
    model, folder = saved
    assert type(AutoConfig.for_model("m6")) is M6HFConfig
    local = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(local) is M6ForConditionalGeneration
    batch = _prompts()
    with torch.no_grad():
        assert torch.equal(local(**batch).logits, model(batch).logits)


# ------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("images", [True, False])
def test_logits_and_loss_match_m6_model(saved: tuple[M6Model, Path], loaded: M6ForConditionalGeneration,
                                        images: bool) -> None:
    model, _ = saved
    batch = _prompts()
    batch["prefix_len"] = torch.tensor([2, 1, 3])
    if not images:
        batch.pop("pixel_values")
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"], -100)
    with torch.no_grad():
        ref = model(batch)
        out = loaded(**batch, labels=labels)
    assert out.logits.shape == ref.logits.shape == (3, 5, VOCAB)
    assert (out.logits - ref.logits).abs().max() <= 1e-5
    assert torch.allclose(out.loss, lm_loss(ref.logits, labels) + ref.aux_loss, atol=1e-6)
    with torch.no_grad():
        as_tuple = loaded(**batch, labels=labels, return_dict=False)
    assert torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[2], out.logits)  # (loss, aux_loss, logits)
    assert float(ref.aux_loss) > 0  # the MoE layers contribute, so the loss check covers them


def test_pseudo_model_reloads_shared(loaded: M6ForConditionalGeneration) -> None:
    assert len(loaded.model.blocks) == 2
    assert loaded.model.layer_to_block == [0, 1, 0, 1]
    assert loaded.model.lm_head.weight is loaded.model.embed.tokens.weight


def test_cached_steps_match_one_full_forward(loaded: M6ForConditionalGeneration) -> None:
    """Prefill then one token at a time through a DynamicCache gives the logits of one uncached forward, with
    left padding in the prompt and the image held at the front of the cache."""
    batch = _left_padded(_prompts())
    extra = torch.randint(2, VOCAB, (3, 4), generator=torch.Generator().manual_seed(9))
    full_ids = torch.cat([batch["input_ids"], extra], dim=1)
    full_mask = torch.cat([batch["attention_mask"], torch.ones(3, 4, dtype=torch.long)], dim=1)
    prefix = batch["attention_mask"].sum(1)
    with torch.no_grad():
        full = loaded(input_ids=full_ids, attention_mask=full_mask, pixel_values=batch["pixel_values"],
                      prefix_len=prefix, use_cache=False).logits
        cache = DynamicCache(config=loaded.config)
        out = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], prefix_len=prefix, cache=cache)
        steps = [out.logits]
        for i in range(4):
            out = loaded(input_ids=extra[:, i:i + 1], attention_mask=full_mask[:, :5 + i + 1], prefix_len=prefix,
                         cache=out.cache)
            steps.append(out.logits)
    assert cache.get_seq_length() == 4 + 5 + 4  # patches + prompt + new tokens, one entry per logical layer
    valid = full_mask[:, :5].bool()
    assert (torch.cat(steps, dim=1)[:, :5][valid] - full[:, :5][valid]).abs().max() <= 1e-5
    assert (torch.cat(steps[1:], dim=1) - full[:, 5:]).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------------ generate
@pytest.mark.parametrize("images", [True, False])
def test_greedy_generate_matches_m6_generate(saved: tuple[M6Model, Path], loaded: M6ForConditionalGeneration,
                                             images: bool) -> None:
    model, _ = saved
    prompts = _prompts()
    if not images:
        prompts.pop("pixel_values")
    ref = model.generate(**prompts, max_new_tokens=10, eos_token_id=-1)
    left = _left_padded(prompts)
    out = loaded.generate(**left, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(out[:, :5], left["input_ids"])
    assert torch.equal(out[:, 5:], ref)
    assert len(set(ref.flatten().tolist())) >= 5  # a varied continuation, so the comparison means something


def test_generate_without_padding_and_with_eos(saved: tuple[M6Model, Path],
                                              loaded: M6ForConditionalGeneration) -> None:
    """An all-ones mask (which transformers drops after the first step) and EOS-stopping rows both agree."""
    model, _ = saved
    prompts = _prompts(lengths=(4, 4, 4))
    ref = model.generate(**prompts, max_new_tokens=8, eos_token_id=-1)
    out = loaded.generate(**prompts, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(out[:, 4:], ref)
    eos = int(ref[0, 2])  # row 0 "ends" at its third token
    ref_eos = model.generate(**prompts, max_new_tokens=8, eos_token_id=eos)
    out_eos = loaded.generate(**prompts, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(out_eos[:, 4:4 + ref_eos.shape[1]], ref_eos)


def test_beam_search_and_sampling_agree_with_and_without_cache(loaded: M6ForConditionalGeneration) -> None:
    left = _left_padded(_prompts())
    kwargs = {"max_new_tokens": 6, "eos_token_id": None, "pad_token_id": PAD}
    beams = loaded.generate(**left, num_beams=3, **kwargs)
    assert torch.equal(beams, loaded.generate(**left, num_beams=3, use_cache=False, **kwargs))
    torch.manual_seed(5)
    sampled = loaded.generate(**left, do_sample=True, top_k=0, **kwargs)
    torch.manual_seed(5)
    assert torch.equal(sampled, loaded.generate(**left, do_sample=True, top_k=0, use_cache=False, **kwargs))


def test_generate_errors_are_clear(loaded: M6ForConditionalGeneration) -> None:
    right = _prompts()
    with pytest.raises(ValueError, match="padding_side='left'"):
        loaded.generate(**right, max_new_tokens=2)
    left = _left_padded(right)
    with pytest.raises(ValueError, match="4 image patches \\+ 5 prompt positions \\+ max_new_tokens=40"):
        loaded.generate(**left, max_new_tokens=40)


# ------------------------------------------------------------------------------------------------ loading
def test_loading_initialises_only_missing_weights(saved: tuple[M6Model, Path], tmp_path: Path) -> None:
    model, folder = saved
    for item in folder.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    state = load_file(folder / "model.safetensors")
    del state["model.blocks.0.attn.qkv.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = M6ForConditionalGeneration.from_pretrained(tmp_path).eval()
    reference = model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        if name == "blocks.0.attn.qkv.weight":
            assert torch.isfinite(tensor).all() and 0.05 < float(tensor.std()) < 0.2  # M6's init (std 0.1)
            assert not torch.equal(tensor, reference[name])
        else:
            assert torch.equal(tensor, reference[name]), name
