"""benchmarks/text_to_image.py runs end to end in its `--quick` CPU mode: the scene parser reads true renders
exactly, and the JSON (stamped), the metrics plot and the prompt/image grid are written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_stamped_results(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "text_to_image.py"), "--quick", "--out_dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "text_to_image_quick.json").read_text())
    assert result["quick"] is True and result["torch"] and result["device"].startswith("CPU") and result["git_rev"]
    assert result["scene_parser"]["renders (parser check)"]["exact"] == 1.0
    names = list(result["scene_parser"])
    assert {"reconstructions (ceiling)", "unconditional", "conditional, guidance 1", "conditional, guidance 3"} <= set(
        names)
    assert any(n.endswith("rerank 2") for n in names) and any(n.startswith("shuffled prompts") for n in names)
    for row in result["scene_parser"].values():
        assert set(row) == {"background", "cell", "color", "shape", "size", "exact"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
    assert set(result["guidance_sweep"]) == {"1.0", "3.0"}
    assert all("fid" in row and "kid" in row for row in result["fid_kid"].values())
    # the tokenizer's held-out curve: scored when its step budget ran out (quick: 4 steps)
    (last,) = result["tokenizer"]["history"]
    assert last["step"] == result["tokenizer"]["steps"] == 4 and 0.0 <= last["exact"] <= 1.0
    assert (tmp_path / "text_to_image_quick.png").stat().st_size > 0
    assert (tmp_path / "text_to_image_quick_grid.png").stat().st_size > 0
    assert "exact" in out.stdout and "FID" in out.stdout


def test_tokenizer_training_stops_once_held_out_reconstructions_parse(tmp_path: Path) -> None:
    # a stop rate any tokenizer meets, scored after every step: training ends at the first check (not at the
    # quick run's 4 steps)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "text_to_image.py"), "--quick", "--out_dir",
                          str(tmp_path), "--tokenizer_check_seconds", "0", "--tokenizer_stop_at", "0"], capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    tokenizer = json.loads((tmp_path / "text_to_image_quick.json").read_text())["tokenizer"]
    assert tokenizer["steps"] == 1 and [row["step"] for row in tokenizer["history"]] == [1]
