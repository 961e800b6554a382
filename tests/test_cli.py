"""The `m6lit` command line end to end: the demo config trains, checkpoints, logs to offline W&B, delinks, resumes
exactly, validates its checkpoints, and every shipped YAML parses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from _wandb import metric, offline_runs, read_history
from m6lit.cli import main
from m6lit.model import M6Config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


# offline W&B, and a proxy that refuses everything: any attempt to reach the network fails instead of succeeding
OFFLINE_ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
               **{var: "http://127.0.0.1:9" for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var, value in OFFLINE_ENV.items():
        monkeypatch.setenv(var, value)
    monkeypatch.chdir(tmp_path)


def run_cli(*args: str, runs: str = "runs") -> Path:
    """`python -m m6lit ...` in the current directory, W&B run under `runs`; returns its offline run directory."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **OFFLINE_ENV)
    before = set(offline_runs(Path(runs)))
    out = subprocess.run([sys.executable, "-m", "m6lit", *args, "--trainer.logger.init_args.save_dir", runs],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, f"m6lit {' '.join(args)} failed:\n{out.stderr[-4000:]}"
    (run,) = set(offline_runs(Path(runs))) - before
    return run


def write_overrides(path: Path, **trainer: object) -> Path:
    path.write_text(yaml.safe_dump({"trainer": trainer}))
    return path


SHORT = ["--data.batch_size", "16", "--data.val", '[{"kind": "demo", "num_samples": 48, "seed": 1}]']


def test_demo_fit_trains_delinks_checkpoints_and_logs_offline(tmp_path: Path) -> None:
    overrides = write_overrides(
        tmp_path / "short.yaml", max_steps=40, val_check_interval=20, log_every_n_steps=5,
        callbacks=[{"class_path": "m6lit.callbacks.PseudoToReal", "init_args": {"delink_step": 20}},
                   {"class_path": "m6lit.callbacks.CaptionSamples", "init_args": {"num_samples": 2}},
                   {"class_path": "m6lit.callbacks.CaptionAccuracy", "init_args": {"num_samples": 4}}])
    run = run_cli("fit", "--config", str(DEMO), "--config", str(overrides), *SHORT)

    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 40
    assert ckpt["hyper_parameters"]["config"]["num_unique_blocks"] == 4  # delinked from 2 at step 20
    assert (tmp_path / "runs" / "config.yaml").is_file()

    rows = read_history(run)
    val = metric(rows, "val/loss")
    assert sorted(val) == [19, 39]
    assert val[39] < val[19] - 0.1, f"validation loss did not fall: {val}"
    assert metric(rows, "p2r/num_unique_blocks") == {20: 4.0}
    assert len(metric(rows, "train/loss")) >= 6
    assert list((run / "files" / "media" / "table" / "val").glob("samples_*.table.json"))
    for attribute in ("background", "count", "kind", "color", "size", "position", "exact"):
        assert sorted(metric(rows, f"val/caption/all/{attribute}")) == [19, 39]


def test_resume_from_last_reproduces_the_uninterrupted_losses(tmp_path: Path) -> None:
    tiny = ["--model.config.d_model", "64", "--model.config.d_ff", "128", "--model.config.expert_d_ff", "64",
            "--data.batch_size", "8", "--data.val", '[{"kind": "demo", "num_samples": 16, "seed": 1}]']
    delink_at_6 = [{"class_path": "m6lit.callbacks.PseudoToReal", "init_args": {"delink_step": 6}}]
    full = write_overrides(tmp_path / "full.yaml", max_steps=10, val_check_interval=5, log_every_n_steps=1,
                           callbacks=delink_at_6)
    part = write_overrides(tmp_path / "part.yaml", max_steps=4, val_check_interval=5, log_every_n_steps=1,
                           callbacks=delink_at_6)

    runs = [run_cli("fit", "--config", str(DEMO), "--config", str(full), *tiny, "--checkpoint.dirpath", "full",
                    runs="runs_full"),
            run_cli("fit", "--config", str(DEMO), "--config", str(part), *tiny, "--checkpoint.dirpath", "part",
                    runs="runs_part"),
            # the same log directory again: the saved config is overwritten, not an error
            run_cli("fit", "--config", str(DEMO), "--config", str(full), *tiny, "--checkpoint.dirpath", "part",
                    "--ckpt_path", "last", runs="runs_part")]

    uninterrupted, first, resumed = (metric(read_history(r), "train/loss") for r in runs)
    assert sorted(uninterrupted) == list(range(10))
    assert sorted(resumed) == list(range(4, 10))
    assert {s: first[s] for s in range(4)} == {s: uninterrupted[s] for s in range(4)}
    assert resumed == {s: uninterrupted[s] for s in range(4, 10)}  # exact, across the delink at step 6
    ckpt = torch.load(tmp_path / "part" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 10 and ckpt["hyper_parameters"]["config"]["num_unique_blocks"] == 4


def test_validate_and_predict_from_pseudo_and_delinked_checkpoints(tmp_path: Path) -> None:
    tiny = ["--model.config.d_model", "64", "--model.config.d_ff", "128", "--model.config.expert_d_ff", "64",
            "--data.batch_size", "8", "--data.val", '[{"kind": "demo", "num_samples": 16, "seed": 1}]']
    run_cli("fit", "--config", str(DEMO), "--config",
            str(write_overrides(tmp_path / "o.yaml", max_steps=4, val_check_interval=2, log_every_n_steps=1,
                                num_sanity_val_steps=0,
                                callbacks=[{"class_path": "m6lit.callbacks.PseudoToReal",
                                            "init_args": {"delink_step": 3}}])),
            *tiny, "--checkpoint.every_n_train_steps", "2", "--checkpoint.save_top_k", "-1")
    pseudo, real = tmp_path / "checkpoints" / "step0000002.ckpt", tmp_path / "checkpoints" / "step0000004.ckpt"
    assert torch.load(pseudo, weights_only=True)["hyper_parameters"]["config"]["num_unique_blocks"] == 2
    assert torch.load(real, weights_only=True)["hyper_parameters"]["config"]["num_unique_blocks"] == 4
    for name, ckpt in (("pseudo", pseudo), ("real", real)):
        run = run_cli("validate", "--config", str(DEMO), *tiny, "--ckpt_path", str(ckpt), runs=f"runs_{name}")
        (loss,) = [row["val/loss"] for row in read_history(run) if "val/loss" in row]
        assert 0 < loss < 10
    run_cli("predict", "--config", str(DEMO), *tiny, "--model.max_new_tokens", "6", "--ckpt_path", str(real),
            runs="runs_predict")
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and sorted(line["index"] for line in lines) == list(range(8))
    assert all(line["reference"] and len(line["caption"].encode()) <= 6 for line in lines)


SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", SHIPPED, ids=[c.name for c in SHIPPED])
def test_every_shipped_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    M6Config.from_dict(printed["model"]["config"]).validate()  # the model part is valid, not only parseable
    assert printed["trainer"]["logger"] is not None


def test_unknown_config_key_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(DEMO), "--model.config.num_experst", "8"])
    assert "num_experst" in capsys.readouterr().err


def test_console_script_and_module_entry_point() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "m6lit", "--help"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0 and "fit" in out.stdout and "validate" in out.stdout


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2, "README must keep the two fresh-machine commands (demo, tests)"
    demo, tests = commands
    assert demo.endswith("m6lit fit --config configs/demo.yaml")
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()
