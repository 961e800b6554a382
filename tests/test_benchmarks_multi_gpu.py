"""benchmarks/multi_gpu.py: the --quick run (gloo, 2 CPU processes, every phase; the scaling cases (a) and (d) to stay
fast on 2 cores) writes a stamped JSON with per-case numbers and a PNG; the pure helpers (junit parsing, scaling
efficiency) on fixed inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import multi_gpu  # noqa: E402


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on two local processes")
def test_quick_run_writes_every_phase_stamped(tmp_path: Path) -> None:
    out = tmp_path / "multi_gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "M6LIT_GIT_REV": "abc1234", "NCCL_NVLS_ENABLE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multi_gpu.py"), "--quick", "--cases", "ad",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["stamp"]["git_rev"] == "abc1234 (M6LIT_GIT_REV)"
    assert {"torch", "nccl", "device", "cuda"} <= r["stamp"].keys()
    assert r["child_env"] == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                              "NVSHMEM_DISABLE_NVLS": "1"}
    # the NCCL tests skip without two GPUs, each recorded by id
    assert list(r["correctness"]["tests"]) == list(multi_gpu.CORRECTNESS_TESTS[:2])  # one per file on --quick
    assert {t["outcome"] for t in r["correctness"]["tests"].values()} == {"skipped"}
    assert set(r["scaling"]) == {"a:1", "a:2", "d:ep", "d:replicated"}
    for key, row in r["scaling"].items():
        assert row["ok"] and row["tokens_per_s"] > 0 and row["loss_finite"], key
        assert row["world"] == row["devices"] == (1 if key == "a:1" else 2)
        assert row["tokens_per_step"] == 2 * 64 * row["world"]
        assert row["env"] == r["child_env"], "NVLink multicast off in every child, whatever the caller set"
    assert r["scaling"]["d:ep"]["strategy"] == "m6_ep" and r["scaling"]["d:replicated"]["strategy"] == "ddp"
    assert r["summary"]["a"]["efficiency"] == pytest.approx(
        r["scaling"]["a:2"]["tokens_per_s"] / (2 * r["scaling"]["a:1"]["tokens_per_s"]))
    assert r["summary"]["d"]["ep_over_replicated"] > 0
    # the size search: candidates planned from large to small, the first that fits trained
    size = r["size"]
    assert [c["layers"] for c in size["candidates"]] == [12, 8, 4]
    largest = size["largest"]
    assert largest["params"] == size["candidates"][0]["params"] and largest["params_per_gpu"] == largest["params"] / 2
    assert 1 <= largest["offloaded_blocks"] <= 12
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "largest FSDP2 + offload" in proc.stdout and "(d) m6_ep vs ddp" in proc.stdout


def test_junit_outcomes_per_test_id(tmp_path: Path) -> None:
    xml = tmp_path / "j.xml"
    xml.write_text("""<?xml version="1.0"?><testsuites><testsuite>
<testcase classname="tests.test_a" name="test_ok" time="1"/>
<testcase classname="tests.test_a" name="test_bad" time="1"><failure message="assert 1 == 2">tb</failure></testcase>
<testcase classname="tests.test_b" name="test_gpu" time="0"><skipped message="needs two CUDA devices"/></testcase>
<testcase classname="tests.test_b" name="test_setup" time="0"><error message="fixture failed"/></testcase>
</testsuite></testsuites>""")
    assert multi_gpu.parse_junit(xml) == {
        "tests/test_a.py::test_ok": {"outcome": "passed", "message": ""},
        "tests/test_a.py::test_bad": {"outcome": "failed", "message": "assert 1 == 2"},
        "tests/test_b.py::test_gpu": {"outcome": "skipped", "message": "needs two CUDA devices"},
        "tests/test_b.py::test_setup": {"outcome": "error", "message": "fixture failed"}}


def test_efficiency_is_n_gpu_rate_over_n_times_one_gpu_rate() -> None:
    assert multi_gpu.efficiency({"tokens_per_s": 100.0, "world": 1}, {"tokens_per_s": 360.0, "world": 4}) == 0.9
    assert multi_gpu.efficiency(None, {"tokens_per_s": 360.0, "world": 4}) is None
    assert multi_gpu.efficiency({"tokens_per_s": 100.0, "world": 1}, None) is None


def test_the_correctness_ids_name_existing_tests() -> None:
    for test_id in multi_gpu.CORRECTNESS_TESTS:
        path, name = test_id.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), test_id


def test_a_child_past_its_timeout_is_killed_with_the_processes_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    proc, out, _ = multi_gpu.start_child(["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], tmp_path / "log")
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        time.sleep(0.05)
    assert multi_gpu.finish_child(proc, out, 1.0) is None
    grandchild = int(pid_file.read_text())
    for _ in range(100):  # the killed sleep is reaped by init shortly after
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the background process of the timed-out command is still alive")
    code, seconds = multi_gpu.run_child(["bash", "-c", "exit 3"], 10.0, tmp_path / "log2")
    assert code == 3 and seconds < 10
