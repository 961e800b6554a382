"""The export folder: safetensors, remote code, tokenizer and no pickles; shards; written atomically (a failed write
leaves nothing, an old folder stays until the new one is complete) with the umask's mode; a failed push leaves the
folder complete and the token nowhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _export_run import exported_run, sample_batch
from transformers import AutoModelForCausalLM

from m6lit.export.checkpoint import load_checkpoint, model_from_checkpoint
from m6lit.export.command import export_checkpoint
from m6lit.export.errors import ExportError
from m6lit.module import M6LitModule


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return exported_run(tmp_path_factory.getbasetemp() / "exported_run")


def test_folder_holds_safetensors_remote_code_tokenizer_and_no_pickles(run: dict[str, Path]) -> None:
    names = {p.name for p in run["real"].iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json", "README.md",
            "hf.py", "m6.py", "config.py", "moe.py", "attention.py", "block.py", "embeddings.py", "processing.py",
            "processor_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    for source in run["real"].glob("*.py"):
        text = source.read_text()
        assert "import m6lit" not in text and "from m6lit" not in text and "lightning" not in text, source.name
    config = json.loads((run["real"] / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "hf.M6ForConditionalGeneration"
    generation = json.loads((run["real"] / "generation_config.json").read_text())
    assert (generation["max_new_tokens"], generation["eos_token_id"], generation["pad_token_id"]) == (32, 1, 0)
    assert not [p for p in run["real"].parent.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_sharded_export_reloads_the_same_model(run: dict[str, Path], tmp_path: Path) -> None:
    folder = export_checkpoint(run["real_ckpt"], tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    module = M6LitModule(load_checkpoint(run["real_ckpt"])["hyper_parameters"]["config"], init_from=str(folder))
    reference = model_from_checkpoint(load_checkpoint(run["real_ckpt"]))
    batch = sample_batch(images=True)
    with torch.no_grad():
        assert (reloaded(**batch).logits - reference(batch).logits).abs().max() <= 1e-5
        assert torch.equal(module.model(batch).logits, reference(batch).logits)


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
