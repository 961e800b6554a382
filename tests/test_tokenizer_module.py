"""ImageTokenizerModule under the `m6lit` CLI: the tokenizer config parses beside the M6 configs, trains, logs its
codebook statistics and reconstruction grid to offline W&B, resumes exactly, and exports a loadable folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from _wandb import metric, read_history
from m6lit.cli import main
from m6lit.model.image_tokenizer import load_image_tokenizer
from m6lit.tokenizer_module import code_statistics, reconstruction_grid
from test_cli import OFFLINE_ENV, ROOT, run_cli, write_overrides

TOKENIZER = ROOT / "configs" / "tokenizer-demo.yaml"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var, value in OFFLINE_ENV.items():
        monkeypatch.setenv(var, value)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("config,kind", [("tokenizer-demo.yaml", "tokenizer"), ("demo.yaml", "m6")])
def test_both_kinds_of_config_parse(config: str, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    if kind == "tokenizer":
        assert printed["model"]["class_path"] == "m6lit.tokenizer_module.ImageTokenizerModule"
        assert printed["model"]["init_args"]["image_size"] == 48 and "image_size" not in printed["data"]  # linked
    else:
        assert printed["model"]["config"]["image_size"] == 48 and "class_path" not in printed["model"]


def test_a_recipe_that_includes_the_tokenizer_config_selects_the_tokenizer_cli(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The module class is read by jsonargparse like the rest of the config: through an included base recipe and
    stacked files, and from `--model.class_path` on the command line."""
    overlay = tmp_path / "small.yaml"
    overlay.write_text(f"config: {TOKENIZER}\nmodel.init_args.codebook_size: 64\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(overlay), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "m6lit.tokenizer_module.ImageTokenizerModule"
    assert printed["model"]["init_args"]["codebook_size"] == 64
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--model.class_path",
              "m6lit.tokenizer_module.ImageTokenizerModule", "--print_config"])
    err = capsys.readouterr().err  # the tokenizer CLI parsed it: the demo's M6 model keys are not its module's
    assert 'Parser key "model"' in err and "max_new_tokens" in err


def test_code_statistics_and_grid() -> None:
    usage, perplexity = code_statistics(torch.tensor([[0, 0, 1, 1]]), 4)
    assert usage == 0.5 and torch.isclose(perplexity, torch.tensor(2.0))
    grid = reconstruction_grid(-torch.ones(2, 3, 4, 4), torch.ones(2, 3, 4, 4))
    assert grid.shape == (8, 8, 3) and (grid[:, :4] == 0).all() and (grid[:, 4:] == 255).all()


def test_fit_logs_resumes_exactly_and_exports(tmp_path: Path) -> None:
    tiny = ["--model.init_args.image_size", "16", "--model.init_args.codebook_size", "32",
            "--model.init_args.latent_channels", "32", "--data.batch_size", "4",
            "--data.val", '[{"kind": "demo", "num_samples": 4, "seed": 1}]']
    full = write_overrides(tmp_path / "full.yaml", max_steps=6, val_check_interval=3, log_every_n_steps=1)
    part = write_overrides(tmp_path / "part.yaml", max_steps=3, val_check_interval=3, log_every_n_steps=1)
    runs = [run_cli("fit", "--config", str(TOKENIZER), "--config", str(full), *tiny, "--checkpoint.dirpath", "full",
                    "--model.init_args.export_dir", "tok_full", runs="runs_full"),
            run_cli("fit", "--config", str(TOKENIZER), "--config", str(part), *tiny, "--checkpoint.dirpath", "part",
                    runs="runs_part"),
            run_cli("fit", "--config", str(TOKENIZER), "--config", str(full), *tiny, "--checkpoint.dirpath", "part",
                    "--ckpt_path", "last", "--model.init_args.export_dir", "tok_resumed", runs="runs_part")]
    uninterrupted, first, resumed = (metric(read_history(r), "train/loss") for r in runs)
    assert sorted(uninterrupted) == list(range(6)) and sorted(resumed) == [3, 4, 5]
    assert {s: first[s] for s in range(3)} == {s: uninterrupted[s] for s in range(3)}
    assert resumed == {s: uninterrupted[s] for s in range(3, 6)}
    rows = read_history(runs[0])
    for key in ("train/codebook_usage", "train/codebook_perplexity", "train/dead_codes", "train/recon_l1",
                "val/recon_l1"):
        assert metric(rows, key), key
    assert list((runs[0] / "files" / "media" / "images").glob("val/reconstructions_*.png"))
    a, b = load_image_tokenizer(tmp_path / "tok_full"), load_image_tokenizer(tmp_path / "tok_resumed")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
