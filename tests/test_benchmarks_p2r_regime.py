"""benchmarks/p2r_regime.py: the decision rule and the prediction model on synthetic arms, the offload patterns
that leave a Pseudo Giant's shared blocks resident, and a short --quick run on the CPU (probes, both arms, the delink
under SelectiveOffloadStrategy, the stamped JSON and the PNG), so the one-shot GPU benchmark cannot rot unnoticed."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import p2r_regime  # noqa: E402


def _arm(label: str, seed: int, losses: list[float], times: list[float], rate: float,
         pseudo_rate: float | None = None) -> dict:
    points = [{"train_s": t, "val_loss": v, "tokens": 0, "step": i} for i, (t, v) in enumerate(zip(times, losses))]
    phases = {"real": {"tokens_per_s": rate}}
    if pseudo_rate is not None:
        phases["pseudo"] = {"tokens_per_s": pseudo_rate}
    return {"label": f"{label} seed{seed}", "seed": seed, "ok": True, "points": points,
            "final_val_loss": losses[-1], "train_s": times[-1], "tokens_per_s": rate, "phases": phases}


TIMES = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0]


def _scratch() -> list[dict]:
    losses = [4.0, 3.6, 3.3, 3.1, 2.95, 2.85, 2.78, 2.73, 2.7, 2.68]
    return [_arm("scratch", 0, losses, TIMES, 1000.0), _arm("scratch", 1, [v + 0.02 for v in losses], TIMES, 1000.0)]


def test_decision_rule_on_synthetic_arms() -> None:
    target = (2.68 + 2.70) / 2
    fast = [3.5, 3.0, 2.8, 2.7, 2.6, 2.55, 2.5, 2.48, 2.46, 2.45]  # crosses 2.69 between t=40 (2.7) and t=50 (2.6)
    shown = p2r_regime.decide(_scratch() + [_arm("p2r", s, fast, TIMES, 1000.0, 3000.0) for s in (0, 1)])
    assert shown["outcome"] == "SHOWN" and shown["target_val_loss"] == pytest.approx(target)
    assert shown["per_seed"][0]["ratio"] == pytest.approx(41.0 / 100.0)
    assert shown["pseudo_phase_speedup_per_token"] == pytest.approx(3.0)

    slow = [4.2, 3.8, 3.5, 3.3, 3.1, 3.0, 2.9, 2.8, 2.75, 2.72]  # never reaches the target
    refuted = p2r_regime.decide(_scratch() + [_arm("p2r", s, slow, TIMES, 1000.0, 2500.0) for s in (0, 1)])
    assert refuted["outcome"] == "REFUTED AT THIS SCALE"
    assert [s["ratio"] for s in refuted["per_seed"]] == [None, None]
    # the same curves without the system asymmetry (pseudo phase < 2x faster) refute nothing: partial
    level = p2r_regime.decide(_scratch() + [_arm("p2r", s, slow, TIMES, 1000.0, 1500.0) for s in (0, 1)])
    assert level["outcome"] == "PARTIAL"
    mixed = p2r_regime.decide(_scratch() + [_arm("p2r", 0, fast, TIMES, 1000.0, 3000.0),
                                            _arm("p2r", 1, slow, TIMES, 1000.0, 3000.0)])
    assert mixed["outcome"] == "PARTIAL"
    failed = _scratch() + [_arm("p2r", 0, fast, TIMES, 1000.0, 3000.0), {"label": "p2r seed1", "ok": False}]
    assert p2r_regime.decide(failed)["outcome"] == "INCOMPLETE"


def test_predicted_ratio_token_model() -> None:
    # equal rates and equally useful tokens: no gain
    assert p2r_regime.predicted_ratio(1000.0, 1000.0, 0.5, 1.0) == pytest.approx(1.0)
    # 4x faster pseudo phase: its half of the budget covers scratch's tokens after a quarter of the time
    assert p2r_regime.predicted_ratio(4000.0, 1000.0, 0.5, 1.0) == pytest.approx(0.25)
    # 1.5x worth-weighted: the pseudo half brings 0.75 of scratch's tokens, the real phase the last 0.25
    assert p2r_regime.predicted_ratio(3000.0, 1000.0, 0.5, 0.5) == pytest.approx(0.75)


def test_offload_patterns_leave_the_pseudo_blocks_resident() -> None:
    args = argparse.Namespace(pseudo_blocks=2, layers=8, batch=4, seq=16, plan_fraction=0.9)
    half = p2r_regime.Candidate("h", "half").strategy_kwargs(args, 10e9)
    assert half["offload"] == ["model.blocks.[3,5,7]"] and half["micro_batch_tokens"] == 64
    assert p2r_regime.Candidate("a", "all").strategy_kwargs(args, 10e9)["offload"] == ["model.blocks.[2-7]"]
    plan = p2r_regime.Candidate("p", "plan", accumulate=2).strategy_kwargs(args, 10e9)
    assert plan["gpu_memory_budget"] == int(9e9) and plan["micro_batch_tokens"] == 32 and "offload" not in plan


def test_quick_run_trains_both_arms_and_writes_stamped_results(tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "M6LIT_GIT_REV": "abc1234"}
    command = [sys.executable, str(ROOT / "benchmarks" / "p2r_regime.py"), "--quick", "--time_budget", "28",
               "--seeds", "0", "--candidates", "plan+ckpt delayed", "--evals", "3", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("Decision rule (fixed before running)")
    data = json.loads(out.read_text())
    assert data["git_rev"] == "abc1234 (M6LIT_GIT_REV)" and data["device"].startswith("CPU") and data["torch"]
    assert data["rule"] == p2r_regime.RULE
    assert [p["label"] for p in data["probes"]] == ["pseudo resident", "real plan+ckpt delayed"]
    assert all(p["ok"] and p["timed_tokens_per_s"] > 0 for p in data["probes"])
    assert data["best_real"]["name"] == "plan+ckpt delayed"
    assert "prediction" in data, (data.get("outcome"), [(p["label"], p["wall_s"]) for p in data["probes"]])
    assert set(data["prediction"]["time_ratio_if_a_pseudo_token_is_worth"]) == {"worth_1.0", "worth_0.7", "worth_0.5"}
    scratch, p2r = data["arms"]
    assert scratch["ok"] and p2r["ok"], (scratch.get("error"), p2r.get("error"))
    assert scratch["offload"]["offloaded_names"] and scratch["offload"]["steps_with_streamed_units"] > 0
    assert scratch["offload"]["delayed_steps"] > 0 and "pseudo" not in scratch["phases"]
    # the P2R arm: resident pseudo phase, an exactly function-preserving delink, then streamed real blocks
    assert p2r["phases"]["pseudo"]["tokens_per_s"] > 0 and p2r["phases"]["real"]["tokens_per_s"] > 0
    (event,) = p2r["p2r_history"]
    assert event["p2r/loss_after"] == event["p2r/loss_before"]
    assert event["p2r/unique_params_after"] > event["p2r/unique_params_before"]
    assert p2r["offload"]["offloaded_names"] and p2r["offload"]["steps_with_streamed_units"] > 0
    assert p2r["delink_s"] is not None and p2r["delink_at_planned_s"] == pytest.approx(0.5 * p2r["planned_train_s"])
    assert p2r["delink_at_planned_s"] <= p2r["delink_at_train_s"] < p2r["train_s"]
    assert data["outcome"]["outcome"] == "INCOMPLETE"  # one seed: the rule needs two of each
    assert data["total_s"] < 28
    assert out.with_suffix(".png").is_file()
