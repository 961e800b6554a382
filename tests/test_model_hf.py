"""Hugging Face wrapper: config round trip, Auto registration, logit parity with M6Model (cached and uncached),
generation through transformers (m6lit's only text generation) against a full forward per prompt, and loading that
initialises only missing weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    ByT5Tokenizer,
    DynamicCache,
)

import m6lit  # noqa: F401  (registers the auto classes)
from m6lit.model import M6Config, M6Model, lm_loss
from m6lit.model.hf import (CONFIG_KEYS, M6ForConditionalGeneration, M6HFConfig, drop_final_eos, generate_text,
                            left_pad)
from m6lit.model.processing import M6ImageProcessor, M6Processor, image_to_tensor

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
    assert written["auto_map"] == {"AutoConfig": "hf.M6HFConfig", "AutoModel": "hf.M6ForConditionalGeneration",
                                   "AutoModelForCausalLM": "hf.M6ForConditionalGeneration",
                                   "AutoModelForImageTextToText": "hf.M6ForConditionalGeneration"}
    assert M6HFConfig.from_pretrained(folder).to_m6_config() == model.config


def test_config_rejects_an_invalid_m6_config_naming_the_key() -> None:
    with pytest.raises(ValueError, match="d_model"):
        M6HFConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown key"):
        M6HFConfig.from_m6_config(_config()).to_m6_config().from_dict({"nonsense": 1})


def test_auto_classes_know_m6_without_remote_code(saved: tuple[M6Model, Path]) -> None:
    model, folder = saved
    assert type(AutoConfig.for_model("m6")) is M6HFConfig
    batch = _prompts()
    for auto in (AutoModelForCausalLM, AutoModel, AutoModelForImageTextToText):
        local = auto.from_pretrained(folder).eval()
        assert type(local) is M6ForConditionalGeneration, auto.__name__
        with torch.no_grad():
            assert torch.equal(local(**batch).logits, model(batch).logits), auto.__name__


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
@torch.no_grad()
def _greedy_by_full_forward(model: M6Model, prompts: dict, steps: int, eos: int = EOS) -> torch.Tensor:
    """Reference: each prompt alone, unpadded, re-running the full forward each step (prompt = bidirectional);
    after `eos` a row holds PAD, and the result stops where every row has ended. (transformers reads
    `eos_token_id=None` as "the model's EOS", so EOS is always in play.)"""
    rows = []
    for r in range(prompts["input_ids"].shape[0]):
        n = int(prompts["attention_mask"][r].sum())
        seq = prompts["input_ids"][r][prompts["attention_mask"][r].bool()].tolist()
        out: list[int] = []
        for _ in range(steps):
            if eos in out:
                out.append(PAD)
                continue
            batch = {"input_ids": torch.tensor([seq]), "prefix_len": torch.tensor([n])}
            if "pixel_values" in prompts:
                batch["pixel_values"] = prompts["pixel_values"][r:r + 1]
            token = int(model(batch).logits[0, -1].argmax())
            out.append(token)
            seq.append(token)
        rows.append(out)
    tokens = torch.tensor(rows)
    ended = [row.index(eos) if eos in row else steps - 1 for row in rows]
    return tokens[:, :max(ended) + 1]


@pytest.mark.parametrize("images", [True, False])
def test_greedy_generate_matches_a_full_forward_per_prompt(saved: tuple[M6Model, Path],
                                                           loaded: M6ForConditionalGeneration, images: bool) -> None:
    model, _ = saved
    prompts = _prompts()
    if not images:
        prompts.pop("pixel_values")
    ref = _greedy_by_full_forward(model, prompts, 10)
    left = _left_padded(prompts)
    for use_cache in (True, False):
        out = loaded.generate(**left, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=PAD,
                              use_cache=use_cache)
        assert torch.equal(out[:, :5], left["input_ids"])
        assert torch.equal(out[:, 5:], ref)
    # m6lit's entry point takes its own (right-padded) batches and returns the new tokens only
    assert torch.equal(generate_text(model, prompts, max_new_tokens=10, eos_token_id=None), ref)
    assert len(set(ref.flatten().tolist())) >= 5  # a varied continuation, so the comparison means something


def test_generate_without_padding_and_with_eos(saved: tuple[M6Model, Path],
                                              loaded: M6ForConditionalGeneration) -> None:
    """An all-ones mask (which transformers drops after the first step) and EOS-stopping rows both agree."""
    model, _ = saved
    prompts = _prompts(lengths=(4, 4, 4))
    ref = _greedy_by_full_forward(model, prompts, 8)
    out = loaded.generate(**prompts, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(out[:, 4:], ref)
    eos = int(ref[0, 2])  # row 0 "ends" at its third token
    ref_eos = _greedy_by_full_forward(model, prompts, 8, eos=eos)
    out_eos = loaded.generate(**prompts, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(out_eos[:, 4:], ref_eos)
    assert torch.equal(generate_text(model, prompts, max_new_tokens=8, eos_token_id=eos), ref_eos)


class _ScriptedHead(torch.nn.Module):
    """An lm_head that emits token 10 + step at every position of each row, and EOS at that row's scripted step."""

    def __init__(self, stops: list[int]) -> None:
        super().__init__()
        self.stops = stops
        self.calls = 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        step = self.calls
        self.calls += 1
        logits = torch.zeros(*hidden.shape[:-1], VOCAB, dtype=hidden.dtype)
        for r, stop in enumerate(self.stops):
            logits[r, ..., EOS if step == stop else 10 + step] = 1.0
        return logits


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_text_stops_at_eos_and_pads_after_it(use_cache: bool) -> None:
    model = _model(tie_embeddings=False)
    prompts = _prompts()
    model.lm_head = _ScriptedHead([1, 3, 99])
    out = generate_text(model, prompts, max_new_tokens=6, use_cache=use_cache)
    assert out.tolist() == [[10, EOS, PAD, PAD, PAD, PAD],
                            [10, 11, 12, EOS, PAD, PAD],
                            [10, 11, 12, 13, 14, 15]]
    model.lm_head = _ScriptedHead([1, 2, 0])
    out = generate_text(model, prompts, max_new_tokens=6, use_cache=use_cache, pad_token_id=7)
    assert out.tolist() == [[10, EOS, 7], [10, 11, EOS], [EOS, 7, 7]]  # stops once every row is done


def test_generate_text_sampling_follows_the_seed_and_a_tiny_top_p_is_greedy() -> None:
    model = _model()
    prompts = _prompts()
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=3.0, top_k=0, eos_token_id=None)
    draws = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        draws.append(generate_text(model, prompts, **kwargs))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    greedy = generate_text(model, prompts, max_new_tokens=8, eos_token_id=None)
    assert not torch.equal(draws[0], greedy)
    nucleus = generate_text(model, prompts, max_new_tokens=8, do_sample=True, top_p=1e-6, top_k=0, eos_token_id=None)
    assert torch.equal(nucleus, greedy)
    with pytest.raises(ValueError, match="top_p"):
        generate_text(model, prompts, max_new_tokens=2, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate_text(model, prompts, max_new_tokens=2, do_sample=True, temperature=0.0)


def test_generate_text_length_limit_and_padding_width() -> None:
    """Extra padding columns change nothing, and the limit counts the longest prompt, not the padded width."""
    model = _model()
    prompts = _prompts()  # longest prompt 5 tokens, 4 patches: 4 + 5 + 39 = 48 = max_seq_len
    wide = dict(prompts, input_ids=torch.cat([prompts["input_ids"], torch.full((3, 4), PAD)], dim=1),
                attention_mask=torch.cat([prompts["attention_mask"], torch.zeros(3, 4, dtype=torch.bool)], dim=1))
    ok = generate_text(model, prompts, max_new_tokens=39, eos_token_id=None)
    assert ok.shape == (3, 39) and torch.equal(generate_text(model, wide, max_new_tokens=39, eos_token_id=None), ok)
    with pytest.raises(ValueError, match="4 image patches \\+ 5 prompt positions \\+ max_new_tokens=40"):
        generate_text(model, wide, max_new_tokens=40)
    empty = dict(prompts, attention_mask=prompts["attention_mask"].clone())
    empty["attention_mask"][1] = False
    with pytest.raises(ValueError, match=r"prompt rows \[1\] are empty"):
        generate_text(model, empty)


def test_left_pad_right_aligns_each_rows_tokens() -> None:
    ids = torch.tensor([[5, 6, 0, 0], [7, 8, 9, 0], [0, 3, 0, 4]])
    mask = ids != 0
    out_ids, out_mask = left_pad(ids, mask, PAD)
    assert out_ids.tolist() == [[0, 5, 6], [7, 8, 9], [0, 3, 4]]
    assert out_mask.tolist() == [[False, True, True], [True, True, True], [False, True, True]]


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


# ------------------------------------------------------------------------------------------------ prompts ending in EOS
def test_drop_final_eos_moves_rows_right_over_their_eos() -> None:
    ids = torch.tensor([[0, 5, 6, EOS], [7, 8, 9, 10], [0, 0, 4, EOS]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])
    out_ids, out_mask = drop_final_eos(ids, mask, EOS, PAD)
    assert out_ids.tolist() == [[0, 0, 5, 6], [7, 8, 9, 10], [0, 0, 0, 4]]
    assert out_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]]
    no_mask_ids, no_mask = drop_final_eos(torch.tensor([[5, EOS], [6, 7]]), None, EOS, PAD)
    assert no_mask_ids.tolist() == [[0, 5], [6, 7]] and no_mask.tolist() == [[0, 1], [1, 1]]
    untouched = torch.tensor([[5, 6]])
    assert drop_final_eos(untouched, None, EOS, PAD) == (untouched, None)
    with pytest.raises(ValueError, match=r"prompt rows \[1\] hold nothing but EOS"):
        drop_final_eos(torch.tensor([[5, 6], [0, EOS]]), torch.tensor([[1, 1], [0, 1]]), EOS, PAD)


def test_generate_ignores_the_eos_a_default_tokenization_appends(saved: tuple[M6Model, Path],
                                                                 loaded: M6ForConditionalGeneration) -> None:
    model, _ = saved
    prompts = _prompts()
    ref = _greedy_by_full_forward(model, prompts, 6)
    left = _left_padded(prompts)
    with_eos = dict(left, input_ids=torch.cat([left["input_ids"], torch.full((3, 1), EOS)], 1),
                    attention_mask=torch.cat([left["attention_mask"], torch.ones(3, 1, dtype=torch.long)], 1))
    out = loaded.generate(**with_eos, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(out[:, 6:], ref)  # same width as the given prompt, then m6lit's continuation
    full = _prompts(lengths=(4, 4, 4))
    ref = _greedy_by_full_forward(model, full, 6)
    ids = torch.cat([full["input_ids"], torch.full((3, 1), EOS)], 1)  # no attention_mask at all
    out = loaded.generate(ids, pixel_values=full["pixel_values"], max_new_tokens=6, do_sample=False,
                          eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(out[:, 5:], ref)


# ------------------------------------------------------------------------------------------------ HF utilities
def test_resize_token_embeddings_keeps_the_tie_and_the_m6_config(saved: tuple[M6Model, Path],
                                                                 tmp_path: Path) -> None:
    model, folder = saved
    hf = M6ForConditionalGeneration.from_pretrained(folder).eval()
    hf.resize_token_embeddings(VOCAB + 8)
    assert hf.model.config.vocab_size == hf.config.vocab_size == VOCAB + 8
    assert hf.model.lm_head.weight is hf.model.embed.tokens.weight
    assert hf.model.lm_head.weight.shape == (VOCAB + 8, 32)
    batch = _prompts()
    with torch.no_grad():
        assert torch.equal(hf(**batch).logits[..., :VOCAB], model(batch).logits)
    batch["input_ids"][0, 1] = VOCAB + 7
    hf.save_pretrained(tmp_path)
    again = M6ForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, hf(**batch).logits)


def test_empty_init_keeps_the_head_tied_so_accelerate_can_dispatch(saved: tuple[M6Model, Path]) -> None:
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    model, folder = saved
    with init_empty_weights():
        empty = M6ForConditionalGeneration(M6HFConfig.from_pretrained(folder))
    assert empty.model.lm_head.weight is empty.model.embed.tokens.weight
    assert empty.model.lm_head.weight.is_meta
    dispatched = load_checkpoint_and_dispatch(empty, str(folder), device_map="auto").eval()
    assert not [n for n, p in dispatched.named_parameters() if p.is_meta]
    batch = _prompts()
    with torch.no_grad():
        assert torch.equal(dispatched(**batch).logits, model(batch).logits)
    untied = M6ForConditionalGeneration(M6HFConfig.from_m6_config(_config(tie_embeddings=False)))
    assert untied.model.lm_head.weight is not untied.model.embed.tokens.weight


# ------------------------------------------------------------------------------------------------ processors
def test_image_processor_is_m6lits_image_path_for_pil_numpy_and_tensor_inputs(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((9, 30, 3), (16, 16, 3), (40, 12, 3))]
    expected = torch.stack([image_to_tensor(Image.fromarray(a), 16) for a in arrays])
    processor = M6ImageProcessor(image_size=16)
    assert torch.equal(processor([Image.fromarray(a) for a in arrays])["pixel_values"], expected)
    assert torch.equal(processor(list(arrays))["pixel_values"], expected)
    assert torch.equal(processor([torch.from_numpy(a).permute(2, 0, 1) for a in arrays])["pixel_values"], expected)
    grey = Image.fromarray(arrays[0][..., 0])  # mode "L" becomes RGB as in training
    assert torch.equal(processor(grey)["pixel_values"][0], image_to_tensor(grey, 16))
    processor.save_pretrained(tmp_path)
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is M6ImageProcessor and reloaded.image_size == 16
    with pytest.raises(TypeError, match="image 1 is a str"):
        processor([Image.fromarray(arrays[0]), "photo.jpg"])
    with pytest.raises(TypeError, match=r"unknown arguments \['size'\]"):
        processor(grey, size=32)


def test_processor_round_trip_and_errors(tmp_path: Path) -> None:
    from PIL import Image

    tokenizer = ByT5Tokenizer()
    tokenizer.padding_side = "left"
    processor = M6Processor(M6ImageProcessor(image_size=16), tokenizer)
    image = Image.new("RGB", (20, 16), (255, 0, 0))
    out = processor(images=[image, image], text="caption:")  # one text for every image
    assert out["input_ids"].tolist() == [[b + 3 for b in b"caption:"]] * 2
    assert out["pixel_values"].shape == (2, 3, 16, 16)
    text_only = processor(text=["text: ab", "text:"])
    assert "pixel_values" not in text_only and text_only["attention_mask"].tolist()[1][:3] == [0, 0, 0]
    with_eos = processor(text="text:", add_special_tokens=True)
    assert with_eos["input_ids"][0, -1] == EOS  # asked for explicitly
    with pytest.raises(ValueError, match="2 images but 3 texts"):
        processor(images=[image, image], text=["a", "b", "c"])
    with pytest.raises(ValueError, match="pass images, text or both"):
        processor()
    processor.save_pretrained(tmp_path)
    M6ForConditionalGeneration.from_m6(_model()).save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is M6Processor and type(reloaded.image_processor) is M6ImageProcessor
    assert torch.equal(reloaded(images=image)["pixel_values"], processor(images=image)["pixel_values"])


# ------------------------------------------------------------------------------------------------ PEFT targets
@pytest.mark.parametrize("blocks", [2, 4])
def test_documented_lora_targets_match_only_the_intended_linear_layers(blocks: int) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from m6lit.export import LORA_DENSE_FFN_TARGETS, LORA_TARGETS

    def adapted(targets) -> dict[str, str]:
        """LoRA-wrapped module → the type of the layer it wraps."""
        hf = M6ForConditionalGeneration.from_m6(_model(num_unique_blocks=blocks))
        lora = get_peft_model(hf, LoraConfig(r=2, target_modules=list(targets)))
        return {name[len("base_model.model."):]: type(module.base_layer).__name__
                for name, module in lora.named_modules() if isinstance(module, LoraLayer)}

    attention = adapted(LORA_TARGETS)
    assert attention == {f"model.blocks.{i}.attn.{name}": "Linear" for i in range(blocks) for name in ("qkv", "proj")}
    dense = adapted(LORA_DENSE_FFN_TARGETS)
    dense_blocks = [i for i in range(blocks) if not _config(num_unique_blocks=blocks).is_moe_layer(i)]
    assert dense == {f"model.blocks.{i}.ffn.{name}": "Linear" for i in dense_blocks
                     for name in ("w_gate", "w_up", "w_down")}
    assert adapted(["proj"])["model.embed.patches.proj"] == "Conv2d"  # why the card warns about a bare "proj"
