"""benchmarks/offload_throughput.py --quick runs on the CPU and writes its stamped JSON, table and PNG, so the GPU
benchmark cannot rot unnoticed between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_stamped_results(tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "offload_throughput.py"), "--quick", "--only",
                           "bd", "--out", str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {"git_rev", "torch", "device"} <= data.keys() and data["device"].startswith("CPU")
    cases = data["cases"]
    assert set(cases) == {f"b:{mode}:clip={clip}" for mode in ("exact", "backward", "delayed") for clip in (0, 1.0)} \
        | {"b:window:clip=1.0", "b:window-auto:clip=1.0", "d:-:clip=0", "d:-:clip=1.0"}, cases.keys()
    assert cases["b:window:clip=1.0"]["window_units"] == 2, "the quick window holds both streamed blocks"
    assert cases["b:window:clip=1.0"]["window_params"] == cases["b:window:clip=1.0"]["offloaded_params"]
    assert cases["b:exact:clip=1.0"]["engine_adam_s"] > 0 and cases["b:exact:clip=1.0"]["engine_clip_s"] > 0
    probe = data["host_probe"]
    assert all(probe[k]["ns_per_element"] > 0 for k in ("upcast", "clip", "adam", "downcast"))
    for name in ("b:exact:clip=1.0", "b:backward:clip=1.0", "b:delayed:clip=1.0", "b:window:clip=1.0",
                 "b:window-auto:clip=1.0"):
        row = cases[name]
        assert "error" not in row, row
        assert row["tokens_per_s"] > 0 and row["pcie_bytes"] > 0
        assert row["engine_busy_s"] > 0 or row["window_units"] == 2
        assert row["host_buffer_bytes"] > 0 and row["estimated_host_bytes"] >= row["host_buffer_bytes"]
    assert cases["d:-:clip=0"]["skipped"]
    assert out.with_suffix(".png").is_file()
    assert "(b) every other block streamed" in proc.stdout and "engine profile" in proc.stdout
