"""`m6lit export`: parity with the Lightning module in a process that cannot import m6lit, pseudo vs real size,
folder contents and model card, sharding, `init_from` round trip, and clear errors that leave no half-written folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from _fakes import ContractBatches, collate, fit, loader, tiny_config
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from m6lit.callbacks.pseudo_to_real import PseudoToReal
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from m6lit.export import (
    NO_METRICS,
    ExportError,
    export_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
)
from m6lit.model import M6Model, lm_loss
from m6lit.module import M6LitModule

BYTE_VOCAB = 384  # the ByT5 tokenizer's size, so the exported tokenizer fits the model


class _SaveAt(Callback):
    """Saves a checkpoint right after optimizer step `step` (before that step's validation and any later delink)."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-step fit validating every step: a pseudo checkpoint (2 blocks for 4 layers) after step 1, a delink to
    4 blocks after step 2, and the final checkpoint with the monitored val/loss."""
    root = tmp_path_factory.mktemp("run")
    L.seed_everything(0)
    module = M6LitModule(tiny_config(vocab_size=BYTE_VOCAB, num_unique_blocks=2), warmup_steps=0)
    trainer = L.Trainer(
        max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        accelerator="cpu", devices=1, val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=0,
        callbacks=[_SaveAt(1, root / "pseudo.ckpt"), PseudoToReal(delink_step=2),
                   ModelCheckpoint(dirpath=root, monitor="val/loss", save_top_k=1, filename="real")])
    trainer.fit(module, loader(size=16), loader(size=4))
    exports = root / "exports"
    paths = {"root": root, "pseudo_ckpt": root / "pseudo.ckpt", "real_ckpt": root / "real.ckpt"}
    for kind in ("pseudo", "real"):
        paths[kind] = export_checkpoint(paths[f"{kind}_ckpt"], exports / kind)
    return paths


def _batch(images: bool) -> dict:
    rows = collate([ContractBatches(seed=7)[i] for i in range(3)])
    rows["attention_mask"][1, 9:] = False  # one right-padded row
    rows["input_ids"][1, 9:] = 0
    if not images:
        rows.pop("pixel_values")
    return rows


def _block_bytes(folder: Path) -> tuple[int, int]:
    """(bytes of the physical blocks, bytes of everything) in an export's safetensors files."""
    blocks = total = 0
    for file in folder.glob("*.safetensors"):
        for key, tensor in load_file(file).items():
            size = tensor.numel() * tensor.element_size()
            total += size
            blocks += size if key.startswith("model.blocks.") else 0
    return blocks, total


# ------------------------------------------------------------------------------------------------ parity
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
print("RESULT " + json.dumps(result))
"""


def test_export_matches_the_lightning_module_in_a_process_without_m6lit(run: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    module = M6LitModule.load_from_checkpoint(run["real_ckpt"], weights_only=True).eval()
    data: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, images in (("image", True), ("text", False)):
            batch = _batch(images)
            for key in ("input_ids", "attention_mask", "prefix_len", "pixel_values"):
                if key in batch:
                    data[f"{name}.{key}"] = batch[key]
            data[f"{name}.logits"] = module(batch).logits
        prompts = _batch(images=True)
        prompts["attention_mask"][:, 4:] = False
        prompts["attention_mask"][2, 2:] = False
        prompts["input_ids"] = prompts["input_ids"][:, :4].masked_fill(~prompts["attention_mask"][:, :4], 0)
        prompts["attention_mask"] = prompts["attention_mask"][:, :4]
        tokens = module.model.generate(prompts["input_ids"], attention_mask=prompts["attention_mask"],
                                       pixel_values=prompts["pixel_values"], max_new_tokens=6, eos_token_id=-1)
    left_ids = torch.zeros_like(prompts["input_ids"])
    left_mask = torch.zeros_like(prompts["input_ids"])
    for row in range(3):
        n = int(prompts["attention_mask"][row].sum())
        left_ids[row, 4 - n:] = prompts["input_ids"][row, :n]
        left_mask[row, 4 - n:] = 1
    data.update({"left.input_ids": left_ids, "left.attention_mask": left_mask,
                 "left.pixel_values": prompts["pixel_values"], "left.tokens": tokens})
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


# ------------------------------------------------------------------------------------------------ sharing, size
def test_pseudo_export_stores_each_block_once_and_reloads_shared(run: dict[str, Path]) -> None:
    pseudo_blocks, pseudo_total = _block_bytes(run["pseudo"])
    real_blocks, real_total = _block_bytes(run["real"])
    assert pseudo_blocks * 4 == real_blocks * 2  # K/L = 2/4 of the delinked export's block bytes
    assert pseudo_total < real_total
    pseudo = AutoModelForCausalLM.from_pretrained(run["pseudo"], trust_remote_code=True).eval()
    assert len(pseudo.model.blocks) == 2 and pseudo.model.layer_to_block == [0, 1, 0, 1]
    reference = model_from_checkpoint(load_checkpoint(run["pseudo_ckpt"]))
    batch = _batch(images=True)
    with torch.no_grad():
        assert (pseudo(**batch).logits - reference(batch).logits).abs().max() <= 1e-5


def test_folder_holds_safetensors_remote_code_tokenizer_and_no_pickles(run: dict[str, Path]) -> None:
    names = {p.name for p in run["real"].iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json", "README.md",
            "hf.py", "m6.py", "config.py", "moe.py", "attention.py", "block.py", "embeddings.py"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    for source in run["real"].glob("*.py"):
        text = source.read_text()
        assert "import m6lit" not in text and "from m6lit" not in text and "lightning" not in text, source.name
    config = json.loads((run["real"] / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "hf.M6ForConditionalGeneration"
    generation = json.loads((run["real"] / "generation_config.json").read_text())
    assert (generation["max_new_tokens"], generation["eos_token_id"], generation["pad_token_id"]) == (32, 1, 0)
    assert not [p for p in run["real"].parent.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_card_states_the_checkpoint_metrics_sharing_and_delink(run: dict[str, Path]) -> None:
    ckpt = torch.load(run["real_ckpt"], weights_only=True)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
    best = float(state["best_model_score"])
    model = model_from_checkpoint(ckpt)
    card = (run["real"] / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "mixture-of-experts" in card
    assert f"| `val/loss` | {best:.4f} | best | ModelCheckpoint |" in card
    assert "after step 2 to 4 blocks" in card and "**real**" in card
    assert f"({model.num_parameters(unique=True):,})" in card
    assert f"optimizer steps: {ckpt['global_step']}" in card
    pseudo_card = (run["pseudo"] / "README.md").read_text()
    pseudo = model_from_checkpoint(load_checkpoint(run["pseudo_ckpt"]))
    assert NO_METRICS in pseudo_card  # saved before the first validation: it says so instead of inventing one
    assert "**pseudo**: 4 logical layers run on 2 physical blocks" in pseudo_card
    assert f"({pseudo.num_parameters(unique=False):,})" in pseudo_card
    assert pseudo.num_parameters(unique=False) > pseudo.num_parameters(unique=True)


def test_sharded_export_reloads_the_same_model(run: dict[str, Path], tmp_path: Path) -> None:
    folder = export_checkpoint(run["real_ckpt"], tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    module = M6LitModule(load_checkpoint(run["real_ckpt"])["hyper_parameters"]["config"], init_from=str(folder))
    reference = model_from_checkpoint(load_checkpoint(run["real_ckpt"]))
    batch = _batch(images=True)
    with torch.no_grad():
        assert (reloaded(**batch).logits - reference(batch).logits).abs().max() <= 1e-5
        assert torch.equal(module.model(batch).logits, reference(batch).logits)


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
    batch = _batch(images=True)
    with torch.no_grad():
        assert (reloaded(**batch).logits - model(batch).logits).abs().max() <= 1e-5
        assert torch.equal(module.model.eval()(batch).logits, model(batch).logits)


def test_run_config_puts_the_data_in_the_card(run: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("model: {}\ndata:\n  train:\n  - {kind: jsonl, path: data/train.jsonl}\n  tokenizer: null\n")
    folder = export_checkpoint(run["pseudo_ckpt"], tmp_path / "with_data", run_config=config)
    card = (folder / "README.md").read_text()
    assert '- train: `{"kind": "jsonl", "path": "data/train.jsonl"}`' in card and "ByT5" in card
    assert "does not record the training data" in (run["pseudo"] / "README.md").read_text()


# ------------------------------------------------------------------------------------------------ init_from
def test_init_from_starts_training_from_the_exported_weights(run: dict[str, Path]) -> None:
    config = load_checkpoint(run["real_ckpt"])["hyper_parameters"]["config"]
    reference = model_from_checkpoint(load_checkpoint(run["real_ckpt"]))
    module = M6LitModule(config, warmup_steps=0, init_from=str(run["real"]))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(module.model.state_dict()[name], tensor), name
    first = collate([ContractBatches()[i] for i in range(4)])  # the first batch `fit` trains on
    with torch.no_grad():
        out = reference.train()(first)
        expected = float(lm_loss(out.logits, first["labels"]) + out.aux_loss)
    _, recorder = fit(module, max_steps=1)
    assert recorder.rows[0][0] == 1 and abs(recorder.rows[0][1] - expected) < 1e-5
    assert not torch.equal(module.model.embed.tokens.weight, reference.embed.tokens.weight)  # it trained


def test_init_from_a_pseudo_export_into_a_real_model_keeps_the_function(run: dict[str, Path]) -> None:
    config = load_checkpoint(run["pseudo_ckpt"])["hyper_parameters"]["config"]
    module = M6LitModule(dict(config, num_unique_blocks=4), init_from=str(run["pseudo"])).eval()
    pseudo = model_from_checkpoint(load_checkpoint(run["pseudo_ckpt"]))
    assert len(module.model.blocks) == 4
    assert torch.equal(module.model.blocks[2].attn.qkv.weight, pseudo.blocks[0].attn.qkv.weight)
    assert module.model.blocks[2].attn.qkv.weight.data_ptr() != module.model.blocks[0].attn.qkv.weight.data_ptr()
    batch = _batch(images=True)
    with torch.no_grad():
        assert (module.model(batch).logits - pseudo(batch).logits).abs().max() <= 1e-5


def test_init_from_names_every_disagreeing_key(run: dict[str, Path], tmp_path: Path) -> None:
    config = load_checkpoint(run["real_ckpt"])["hyper_parameters"]["config"]
    with pytest.raises(ValueError, match=r"\['d_ff', 'd_model'\].*d_model: model.config=48, export=32"):
        M6LitModule(dict(config, d_model=48, d_ff=96), init_from=str(run["real"]))
    with pytest.raises(ValueError, match="does not refine"):
        M6LitModule(dict(config, num_unique_blocks=2), init_from=str(run["real"]))  # fewer blocks than the export
    M6LitModule(dict(config, dropout=0.1), init_from=str(run["real"]))  # a training-only key may differ
    with pytest.raises(ValueError, match="no config.json"):
        M6LitModule(config, init_from=str(tmp_path))


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_or_corrupt_checkpoint_is_a_clear_error(run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="does not exist"):
        export_checkpoint(tmp_path / "missing.ckpt", out)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(run["real_ckpt"].read_bytes()[:5000])
    with pytest.raises(ExportError, match="truncated.ckpt.*cannot be read"):
        export_checkpoint(truncated, out)
    not_m6 = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, not_m6)
    with pytest.raises(ExportError, match=r"no hyper_parameters\['config'\]"):
        export_checkpoint(not_m6, out)
    small = tmp_path / "small_vocab.ckpt"
    model = M6Model(tiny_config())
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"config": model.config.to_dict()}}, small)
    with pytest.raises(ExportError, match="has 384 tokens but the model's vocab_size is 64"):
        export_checkpoint(small, out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_dir_needs_overwrite_and_a_failed_write_leaves_nothing(run: dict[str, Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty; pass --overwrite"):
        export_checkpoint(run["pseudo_ckpt"], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    from transformers import ByT5Tokenizer

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ByT5Tokenizer, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(run["pseudo_ckpt"], out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the old folder is untouched
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(run["pseudo_ckpt"], tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder survives
    monkeypatch.undo()
    export_checkpoint(run["pseudo_ckpt"], out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_push_without_network_fails_cleanly_with_the_folder_complete(run: dict[str, Path], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import huggingface_hub.constants

    from m6lit.cli import main

    secret = "hf_m6litTestSecretToken0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    out = tmp_path / "pushed"
    with pytest.raises(SystemExit, match="push to the Hub repo 'someone/m6-test' failed.*is complete") as exc:
        main(["export", "--ckpt_path", str(run["real_ckpt"]), "--output_dir", str(out), "--push_to_hub",
              "someone/m6-test", "--private"])
    assert secret not in str(exc.value)
    assert {"config.json", "model.safetensors", "README.md", "hf.py"} <= {p.name for p in out.iterdir()}
    for file in out.iterdir():
        assert secret.encode() not in file.read_bytes(), file.name
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert len(model.model.blocks) == 4


def test_export_folder_has_the_umask_mode_not_0700(run: dict[str, Path]) -> None:
    import os

    mask = os.umask(0)
    os.umask(mask)
    assert run["real"].stat().st_mode & 0o777 == 0o777 & ~mask
