"""`m6lit export` end to end: parity with the Lightning module in a process that cannot import m6lit, the folder
used by transformers' processors, pipeline, AutoModel, accelerate and PEFT, pseudo vs real size, split experts, and
a model that generates images exported with its image tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _export_run import BYTE_VOCAB, block_bytes, exported_run, sample_batch
from _fakes import tiny_config
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, ByT5Tokenizer

from m6lit.export.checkpoint import load_checkpoint, model_from_checkpoint
from m6lit.export.command import export_checkpoint
from m6lit.export.errors import ExportError
from m6lit.model import M6Config, M6Model
from m6lit.model.hf import generate_text
from m6lit.model.image_generation import GENERATE_PROMPT, generate_images
from m6lit.model.image_tokenizer import ImageTokenizer, tokenizer_config
from m6lit.module import M6LitModule


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return exported_run(tmp_path_factory.getbasetemp() / "exported_run")


_CHILD = r"""
import json, sys
sys.modules["m6lit"] = None  # every `import m6lit...` now raises ImportError
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, io_file = sys.argv[1], sys.argv[2]
try:
    import m6lit  # noqa: F401
    importable = True
except ImportError:
    importable = False
data = load_file(io_file)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
result = {"m6lit_importable": importable, "module": type(model).__module__, "padding_side": tok.padding_side,
          "m6lit_modules": sorted(m for m in sys.modules if m.startswith("m6lit") and sys.modules[m] is not None)}
with torch.no_grad():
    for name in ("image", "text"):
        batch = {k[len(name) + 1:]: v for k, v in data.items() if k.startswith(name + ".")}
        expected = batch.pop("logits")
        logits = model(**batch).logits
        result[name + "_max_diff"] = float((logits - expected).abs().max())
    left = {k[5:]: v for k, v in data.items() if k.startswith("left.")}
    expected_tokens = left.pop("tokens")
    out = model.generate(**left, max_new_tokens=expected_tokens.shape[1], do_sample=False, eos_token_id=None,
                         pad_token_id=tok.pad_token_id)
    result["tokens_equal"] = bool(torch.equal(out[:, left["input_ids"].shape[1]:], expected_tokens))
    feats = {k[6:]: v for k, v in data.items() if k.startswith("feats.")}
    inputs = {k: feats.pop(k) for k in ("input_ids", "attention_mask", "pixel_values")}
    result["features_max_diff"] = {
        name: float((model.get_multimodal_features(**inputs, modality=name.split("@")[0],
                                                    pooling=int(name.split("@")[1]) if "@" in name else "mean")
                     - expected).abs().max()) for name, expected in feats.items()}
print("RESULT " + json.dumps(result))
"""


def test_export_matches_the_lightning_module_in_a_process_without_m6lit(run: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    module = M6LitModule.load_from_checkpoint(run["real_ckpt"], weights_only=True).eval()
    data: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, images in (("image", True), ("text", False)):
            batch = sample_batch(images)
            for key in ("input_ids", "attention_mask", "prefix_len", "pixel_values"):
                if key in batch:
                    data[f"{name}.{key}"] = batch[key]
            data[f"{name}.logits"] = module(batch).logits
        prompts = sample_batch(images=True)
        prompts["attention_mask"][:, 4:] = False
        prompts["attention_mask"][2, 2:] = False
        prompts["input_ids"] = prompts["input_ids"][:, :4].masked_fill(~prompts["attention_mask"][:, :4], 0)
        prompts["attention_mask"] = prompts["attention_mask"][:, :4]
        tokens = generate_text(module.model, prompts, max_new_tokens=6)
    left_ids = torch.zeros_like(prompts["input_ids"])
    left_mask = torch.zeros_like(prompts["input_ids"])
    for row in range(3):
        n = int(prompts["attention_mask"][row].sum())
        left_ids[row, 4 - n:] = prompts["input_ids"][row, :n]
        left_mask[row, 4 - n:] = 1
    data.update({"left.input_ids": left_ids, "left.attention_mask": left_mask,
                 "left.pixel_values": prompts["pixel_values"], "left.tokens": tokens})
    # the features `m6lit predict` writes (predict_task: features), for each modality and two poolings
    feature_batch = sample_batch(images=True)
    ids = feature_batch["input_ids"]
    data.update({"feats.input_ids": ids, "feats.pixel_values": feature_batch["pixel_values"],
                 "feats.attention_mask": (ids != 0) & (ids != 1)})  # m6lit reads a text without pad and EOS
    predict_batch = {"reference_ids": feature_batch["input_ids"], "pixel_values": feature_batch["pixel_values"]}
    for modality in ("joint", "image", "text"):
        for pooling in ("mean", -1):
            module.hparams.update(feature_modality=modality, feature_pooling=pooling)
            with torch.no_grad():
                data[f"feats.{modality}" + ("" if pooling == "mean" else f"@{pooling}")] = module.features(
                    predict_batch)
    save_file({k: v.contiguous() for k, v in data.items()}, tmp_path / "io.safetensors")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-I", "-c", _CHILD, str(run["real"]), str(tmp_path / "io.safetensors")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["m6lit_importable"] is False and out["m6lit_modules"] == []
    assert out["module"].startswith("transformers_modules.")
    assert out["image_max_diff"] <= 1e-5 and out["text_max_diff"] <= 1e-5
    assert out["tokens_equal"] is True
    assert out["padding_side"] == "left"
    assert sorted(out["features_max_diff"]) == sorted(["joint", "joint@-1", "image", "image@-1", "text", "text@-1"])
    assert max(out["features_max_diff"].values()) <= 1e-6, out["features_max_diff"]


_CLIENTS = r"""
import builtins, json, sys, tempfile, traceback
sys.modules["m6lit"] = None  # every `import m6lit...` now raises ImportError
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

folder, io_file, targets = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
prompts = []
def no_prompt(*args, **kwargs):
    prompts.append(str(args[0])[:80] if args else "")
    raise EOFError("a loader asked on the terminal")
builtins.input = no_prompt  # a loader that asks y/N is recorded (and answered like a closed terminal)
data = load_file(io_file)
batch = {k[6:]: v for k, v in data.items() if k.startswith("batch.")}
images = [Image.fromarray(data[f"image{i}"].numpy()) for i in range(2)]
result = {}
def check(name):
    def wrap(fn):
        try:
            result[name] = fn()
        except Exception as err:
            result[name] = {"error": f"{type(err).__name__}: {err}"[:600], "trace": traceback.format_exc()[-1500:]}
    return wrap

import transformers
from transformers import (AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoProcessor, AutoTokenizer,
                          pipeline)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    reference = model(**batch).logits

def max_diff(a, b):
    return float((a - b).abs().max())

@check("image_processor")
def _():
    ip = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    pixels = ip(images, return_tensors="pt")["pixel_values"]
    return {"class": type(ip).__name__, "shape": list(pixels.shape),
            "max_diff": max(max_diff(pixels[i], data[f"pixels{i}"]) for i in range(2))}

@check("processor")
def _():
    proc = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    out = proc(images=images, text=["caption:", "text: a"])
    no_text = proc(images=images[:1])
    return {"class": type(proc).__name__, "tokenizer": type(proc.tokenizer).__name__,
            "input_ids": out["input_ids"].tolist(), "attention_mask": out["attention_mask"].tolist(),
            "pixels_max_diff": max(max_diff(out["pixel_values"][i], data[f"pixels{i}"]) for i in range(2)),
            "no_text_ids": no_text["input_ids"].tolist()}

@check("pipeline")
def _():
    card = open(folder + "/README.md", encoding="utf-8").read()
    task = card.split("pipeline_tag: ", 1)[1].split(chr(10), 1)[0].strip()
    pipe = pipeline(task, model=folder, trust_remote_code=True)
    got = pipe(images=images[0], text="caption:", max_new_tokens=6, do_sample=False, return_full_text=False)
    proc = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = proc(images=images[:1], text="caption:")
    tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = proc.batch_decode(tokens[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    return {"task": task, "text": got[0]["generated_text"], "expected": expected, "pipeline": type(pipe).__name__}

@check("tokenizer")
def _():
    before = len(prompts)
    remote = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    local = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    asked = prompts[before:]
    unset = AutoTokenizer.from_pretrained(folder)  # transformers asks here (the config has remote code)
    return {"remote": type(remote).__name__, "local": type(local).__name__, "prompts": asked,
            "unset": type(unset).__name__, "local_ids": local("caption:", add_special_tokens=False)["input_ids"]}

@check("generate_default_tokenization")
def _():
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    pixel_values = batch["pixel_values"][:2]
    default = tok(["caption:", "text: a b"], return_tensors="pt", padding=True)
    plain = tok(["caption:", "text: a b"], return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = {"pixel_values": pixel_values, "max_new_tokens": 6, "do_sample": False, "eos_token_id": None}
    a = model.generate(**default, **kwargs)[:, default["input_ids"].shape[1]:]
    b = model.generate(**plain, **kwargs)[:, plain["input_ids"].shape[1]:]
    return {"default_ends_with_eos": bool((default["input_ids"][:, -1] == tok.eos_token_id).all()),
            "default_new": a.tolist(), "plain_new": b.tolist()}

@check("auto_model")
def _():
    m = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        return {"class": type(m).__name__, "max_diff": max_diff(m(**batch).logits, reference)}

@check("resize")
def _():
    m = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    old = m.config.vocab_size
    emb = m.resize_token_embeddings(old + 16)
    ids = batch["input_ids"].clone()
    ids[:, 1] = old + 15  # a new token
    with torch.no_grad():
        logits = m(**dict(batch, input_ids=ids)).logits
        same_old = max_diff(m(**batch).logits[..., :old], reference)
    out = tempfile.mkdtemp()
    m.save_pretrained(out)
    again = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        reload_diff = max_diff(again(**dict(batch, input_ids=ids)).logits, logits)
    return {"rows": emb.weight.shape[0], "vocab_size": m.config.vocab_size, "logits": logits.shape[-1],
            "tied": m.model.lm_head.weight is m.model.embed.tokens.weight, "old_max_diff": same_old,
            "reload_max_diff": reload_diff}

@check("accelerate")
def _():
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    empty = load_checkpoint_and_dispatch(empty, folder, device_map="auto").eval()
    with torch.no_grad():
        return {"max_diff": max_diff(empty(**batch).logits, reference),
                "tied": empty.model.lm_head.weight is empty.model.embed.tokens.weight,
                "meta": [n for n, p in empty.named_parameters() if p.is_meta]}

@check("peft")
def _():
    from peft import LoraConfig, PeftModel, get_peft_model
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    adapted = sorted(n[len("base_model.model."):-len(".lora_A")] for n, _ in lora.named_modules()
                     if n.endswith(".lora_A"))
    trainable = sorted(n for n, p in lora.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.5)
    lora.train()
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), -100)
    loss = lora(**batch, labels=labels).loss
    loss.backward()
    opt.step()
    lora.eval()
    with torch.no_grad():
        trained = lora(**batch).logits
    out = tempfile.mkdtemp()
    lora.save_pretrained(out)
    fresh = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    loaded = PeftModel.from_pretrained(fresh, out).eval()
    with torch.no_grad():
        reloaded = loaded(**batch).logits
    return {"adapted": adapted, "trainable": len(trainable),
            "trainable_outside_lora": [n for n in trainable if "lora_" not in n],
            "moved": max_diff(trained, reference), "reload_max_diff": max_diff(reloaded, trained),
            "patch_embed": type(lora.base_model.model.model.embed.patches.proj).__name__}

result["m6lit_modules"] = sorted(m for m in sys.modules if m.startswith("m6lit") and sys.modules[m] is not None)
result["all_prompts"] = prompts
print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def clients(run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The real export used by transformers' processors and pipeline, AutoModel, accelerate and PEFT in a process
    that cannot import m6lit (one child for all, each check recording its result or its error)."""
    from PIL import Image

    from m6lit.export.card import LORA_TARGETS
    from m6lit.model.processing import image_to_tensor

    tmp = tmp_path_factory.mktemp("clients")
    rng = np.random.default_rng(0)
    data = {f"batch.{k}": v for k, v in sample_batch(images=True).items()
            if k in ("input_ids", "attention_mask", "pixel_values")}
    for i, (h, w) in enumerate([(20, 30), (41, 23)]):  # wide and tall: both resize and crop paths
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        data[f"image{i}"] = torch.from_numpy(array)
        data[f"pixels{i}"] = image_to_tensor(Image.fromarray(array), 16)
    save_file({k: v.contiguous() for k, v in data.items()}, tmp / "io.safetensors")
    env = dict(os.environ, HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-I", "-c", _CLIENTS, str(run["real"]), str(tmp / "io.safetensors"),
                             json.dumps(list(LORA_TARGETS))],
                            cwd=tmp, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["m6lit_modules"] == []
    return out


def _ok(clients: dict, name: str) -> dict:
    got = clients[name]
    assert "error" not in got, f"{got.get('error')}\n{got.get('trace')}"
    return got


def test_image_processor_does_what_m6lit_data_does(clients: dict) -> None:
    got = _ok(clients, "image_processor")
    assert got["class"] == "M6ImageProcessor" and got["shape"] == [2, 3, 16, 16]
    assert got["max_diff"] == 0.0


def test_processor_tokenizes_prompts_without_eos_left_padded_with_the_images(clients: dict) -> None:
    got = _ok(clients, "processor")
    assert (got["class"], got["tokenizer"]) == ("M6Processor", "ByT5Tokenizer")
    caption = [b + 3 for b in b"caption:"]  # ByT5: byte + 3
    text = [b + 3 for b in b"text: a"]  # one byte shorter than the caption prompt
    assert got["input_ids"] == [caption, [0] + text]  # pad id 0 on the left, no EOS
    assert got["attention_mask"] == [[1] * len(caption), [0] + [1] * len(text)]
    assert got["pixels_max_diff"] == 0.0
    assert got["no_text_ids"] == [caption]  # images alone get m6lit's caption prompt


def test_the_cards_pipeline_tag_runs_as_a_transformers_pipeline(clients: dict) -> None:
    got = _ok(clients, "pipeline")
    assert got["task"] == "image-text-to-text" and got["pipeline"] == "ImageTextToTextPipeline"
    assert got["text"] == got["expected"] and got["text"] != ""


def test_tokenizer_loads_with_and_without_remote_code_without_asking(clients: dict) -> None:
    got = _ok(clients, "tokenizer")
    assert got["remote"] == got["local"] == got["unset"] == "ByT5Tokenizer"
    assert got["prompts"] == []  # the two forms the card documents
    assert got["local_ids"] == [b + 3 for b in b"caption:"]


def test_generate_on_default_tokenization_continues_the_prompt(clients: dict) -> None:
    got = _ok(clients, "generate_default_tokenization")
    assert got["default_ends_with_eos"] is True  # what a plain `tokenizer(prompt)` gives
    assert got["default_new"] == got["plain_new"]
    assert len({t for row in got["plain_new"] for t in row}) > 1  # not a run of EOS/pad


def test_auto_model_and_resize_token_embeddings(clients: dict) -> None:
    auto = _ok(clients, "auto_model")
    assert auto["class"] == "M6ForConditionalGeneration" and auto["max_diff"] <= 1e-6
    got = _ok(clients, "resize")
    assert got["rows"] == got["vocab_size"] == got["logits"] == BYTE_VOCAB + 16
    assert got["tied"] is True and got["old_max_diff"] <= 1e-6 and got["reload_max_diff"] <= 1e-6


def test_accelerate_empty_init_and_dispatch_loads_the_model(clients: dict) -> None:
    got = _ok(clients, "accelerate")
    assert got["meta"] == [] and got["tied"] is True and got["max_diff"] <= 1e-6


def test_documented_lora_targets_adapt_only_attention_and_round_trip(run: dict[str, Path], clients: dict) -> None:
    card = (run["real"] / "README.md").read_text()
    assert "target_modules=['attn.qkv', 'attn.proj']" in card and "`embed.patches.proj`" in card
    assert "a block's adapter serves every layer" in (run["pseudo"] / "README.md").read_text()
    got = _ok(clients, "peft")
    blocks = 4  # the real export: one block per layer
    assert got["adapted"] == sorted(f"model.blocks.{i}.attn.{name}" for i in range(blocks) for name in ("qkv", "proj"))
    assert got["patch_embed"] == "Conv2d"  # the patch embedding's `proj` stays untouched
    assert got["trainable"] == 2 * 2 * blocks and got["trainable_outside_lora"] == []
    assert got["moved"] > 1e-4  # the step changed the function
    assert got["reload_max_diff"] <= 1e-6


def test_pseudo_export_stores_each_block_once_and_reloads_shared(run: dict[str, Path]) -> None:
    pseudo_blocks, pseudo_total = block_bytes(run["pseudo"])
    real_blocks, real_total = block_bytes(run["real"])
    assert pseudo_blocks * 4 == real_blocks * 2  # K/L = 2/4 of the delinked export's block bytes
    assert pseudo_total < real_total
    pseudo = AutoModelForCausalLM.from_pretrained(run["pseudo"], trust_remote_code=True).eval()
    assert len(pseudo.model.blocks) == 2 and pseudo.model.layer_to_block == [0, 1, 0, 1]
    reference = model_from_checkpoint(load_checkpoint(run["pseudo_ckpt"]))
    batch = sample_batch(images=True)
    with torch.no_grad():
        assert (pseudo(**batch).logits - reference(batch).logits).abs().max() <= 1e-5


def test_split_experts_and_router_offsets_flow_through_export_and_init_from(tmp_path: Path) -> None:
    from m6lit.model.experts import apply_expert_op

    torch.manual_seed(0)
    model = M6Model(tiny_config(vocab_size=BYTE_VOCAB)).eval()
    apply_expert_op(model, "split", 2)
    with torch.no_grad():
        model.blocks[1].ffn.router.logit_offset.normal_()  # whatever the split left there, make it distinctive
    assert model.config.expert_overrides
    ckpt = tmp_path / "split.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"config": model.config.to_dict()}}, ckpt)
    folder = export_checkpoint(ckpt, tmp_path / "split")
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert reloaded.config.to_m6_config() == model.config
    assert torch.equal(reloaded.model.blocks[1].ffn.router.logit_offset, model.blocks[1].ffn.router.logit_offset)
    module = M6LitModule(model.config.to_dict(), init_from=str(folder))
    batch = sample_batch(images=True)
    with torch.no_grad():
        assert (reloaded(**batch).logits - model(batch).logits).abs().max() <= 1e-5
        assert torch.equal(module.model.eval()(batch).logits, model(batch).logits)


# ------------------------------------------------------------------------------------------------ image generation
TEXT = len(ByT5Tokenizer())


def _checkpoint(tmp_path: Path, codebook_size: int = 16) -> tuple[Path, Path, M6Model, ImageTokenizer]:
    torch.manual_seed(0)
    vq = ImageTokenizer(tokenizer_config(16, 16, embed_dim=4, channel_multiplier=(1, 2, 2), latent_channels=32))
    vq.eval()
    vq.save_pretrained(tmp_path / "image_tokenizer")
    config = M6Config(vocab_size=TEXT + 2 + codebook_size, d_model=32, n_heads=2, d_ff=64, num_layers=2,
                      max_seq_len=64, image_size=16, patch_size=8, image_codebook_size=codebook_size,
                      image_grid_size=4)
    model = M6Model(config).eval()
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"config": config.to_dict()}, "global_step": 0}
    torch.save(ckpt, tmp_path / "m.ckpt")
    return tmp_path / "m.ckpt", tmp_path / "image_tokenizer", model, vq


_IMAGES_CHILD = r"""
import json, sys
sys.modules["m6lit"] = None
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, io_file = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
images = model.generate_images(["a red circle", "two"], tok, guidance_scale=2.0, temperature=0, num_candidates=2)
expected = load_file(io_file)["images"]
print("RESULT " + json.dumps({"equal": bool(torch.equal(images, expected)), "shape": list(images.shape),
      "m6lit": sorted(m for m in sys.modules if m.startswith("m6lit") and sys.modules[m] is not None)}))
"""


def test_exported_folder_generates_images_without_m6lit(tmp_path: Path) -> None:
    ckpt, vq_folder, model, vq = _checkpoint(tmp_path)
    out = export_checkpoint(ckpt, tmp_path / "export", image_tokenizer=str(vq_folder))
    assert (out / "image_tokenizer" / "config.json").is_file()
    tok = ByT5Tokenizer()
    enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    prompts = ["a red circle", "two"]
    expected = generate_images(model, vq.decode, [enc(GENERATE_PROMPT) + enc(p) for p in prompts],
                               enc(GENERATE_PROMPT), num_candidates=2, rerank_prompt=enc("caption:"),
                               rerank_captions=[enc(p) + [tok.eos_token_id] for p in prompts],
                               guidance_scale=2.0, temperature=0)["images"]
    save_file({"images": expected.contiguous()}, tmp_path / "io.safetensors")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-I", "-c", _IMAGES_CHILD, str(out), str(tmp_path / "io.safetensors")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    line = lines[-1]
    got = json.loads(line[len("RESULT "):])
    assert got == {"equal": True, "shape": [2, 3, 16, 16], "m6lit": []}


def test_export_needs_a_matching_image_tokenizer(tmp_path: Path) -> None:
    ckpt, vq_folder, _, _ = _checkpoint(tmp_path, codebook_size=16)
    with pytest.raises(ExportError, match="pass its image tokenizer folder"):
        export_checkpoint(ckpt, tmp_path / "a")
    with pytest.raises(ExportError, match="--image_tokenizer='.*nowhere': not a directory"):
        export_checkpoint(ckpt, tmp_path / "b", image_tokenizer=str(tmp_path / "nowhere"))
    ckpt2, _, _, _ = _checkpoint(tmp_path / "x" if (tmp_path / "x").mkdir() is None else tmp_path, codebook_size=32)
    with pytest.raises(ExportError, match="model.config.image_codebook_size=32 disagrees with image tokenizer"):
        export_checkpoint(ckpt2, tmp_path / "c", image_tokenizer=str(vq_folder))
