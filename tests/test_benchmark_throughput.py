"""The throughput benchmark scripts run end to end in their --quick CPU mode and write stamped results."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_train_throughput_quick_runs_the_trainer_cases_and_the_anchor(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    script = _script("train_throughput")
    result = script.main(["--quick", "--cases", "dense", "pseudo", "gpt", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result, default=str))
    assert out.with_suffix(".png").stat().st_size > 0
    assert {"git_rev", "torch", "device"} <= set(saved["meta"])
    rows = {r["case"]: r for r in saved["rows"]}
    assert set(rows) == {"dense", "pseudo", "gpt"} and not any("error" in r for r in rows.values())
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["tokens_per_step"] == 2 * 32
        assert r["forward_s"] > 0 and r["backward_s"] > 0 and r["mfu_989"] > 0
    # same shapes, same FLOPs per token: the anchor and the dense M6 model are counted alike
    assert rows["gpt"]["active_params_per_token"] == rows["dense"]["active_params_per_token"]
    # the Pseudo Giant stores 2 of its Real Giant's 4 blocks
    from m6lit.model import M6Model

    real = M6Model(script.configs(True, 32)["moe"]).num_parameters()
    assert rows["pseudo"]["params"] < real


def test_train_throughput_stops_starting_cases_after_its_budget(tmp_path: Path) -> None:
    result = _script("train_throughput").main(["--quick", "--cases", "gpt", "dense", "--budget", "0",
                                               "--out", str(tmp_path / "t.json")])
    rows = {r["case"]: r for r in result["rows"]}
    assert "budget" in rows["gpt"]["error"] and "budget" in rows["dense"]["error"]


@pytest.mark.parametrize("sources", [["demo", "jsonl", "webdataset"]])
def test_data_throughput_quick_measures_every_source(tmp_path: Path, sources: list[str]) -> None:
    out = tmp_path / "data.json"
    result = _script("data_throughput").main(["--quick", "--workers", "0", "--sources", *sources,
                                              "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert [r["source"] for r in result["rows"]] == sources
    assert all(r["samples_per_s"] > 0 and r["mean_text_tokens"] > 0 for r in result["rows"])
    assert set(result["model_samples_per_s"]) == {"real", "dense1b"}
    # the bigger dense model needs fewer samples per second than the MoE Real Giant at the same MFU
    assert result["model_samples_per_s"]["dense1b"] < result["model_samples_per_s"]["real"]
