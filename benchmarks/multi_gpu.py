"""The many-GPU strategies on one multi-GPU machine: NCCL correctness, scaling, and the largest FSDP2 + offload model.

Phases, each within its share of `--time_budget` seconds (unused time passes to the next phase):
  correctness  the scale-out tests' NCCL variants, run by pytest in a subprocess (DDP + offload in bf16, FSDP2 with
               CPU offload, FSDP2 with a delink and an expert split mid-run, expert-parallel dispatch across a delink);
               pass/fail per test id from pytest's junit XML
  scaling      tokens/s on 1 and N GPUs (N = every visible GPU, or `--gpus`), the same micro-batch per rank (weak
               scaling), bf16-mixed, clipping off, text-only batches (the image patch embedding is frozen):
                 a  Lightning's DDP, everything resident (`ddp`)
                 b  DDP + every other block streamed from the host (`m6_offload_ddp`, DDPOffloadStrategy)
                 c  FSDP2, fully_shard per block + root (`m6_fsdp`)
                 d  an MoE model on N GPUs: experts split over all of them (`m6_ep`) against experts replicated
                    under plain DDP, at the same global batch
               efficiency = tok/s on N / (N × tok/s on 1), goal >= 0.9 for a-c; for d the ratio EP / replicated,
               goal > 1
  size         the largest dense model that trains under FSDP2 with activation checkpointing and CPU offload of the
               fewest trailing blocks `m6lit plan`'s estimate (`parallel_estimate`, "m6_fsdp+offload") needs to fit
               the GPUs, within the host's memory; candidates from large to small, the first that completes its
               steps wins; parameters, parameters per GPU, MFU (6 N T over 989 TFLOP/s per GPU)
Every training run is a small Lightning script (this file with `--worker SPEC`) started in a subprocess with
`Trainer(devices=N)`: Lightning's own launcher starts the other ranks. Every child process gets
NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 in its environment (NVLink
multicast off). The JSON (stamped with git revision, torch, CUDA and NCCL versions and the device) and a PNG of the
scaling bars are rewritten after every case, so a run cut short keeps what it measured; a table is printed at the
end. `--logs DIR` keeps every child's log there.

    python benchmarks/multi_gpu.py --logs /tmp/multi_gpu_logs   # 2 or 4 H200s, < 9 min (--time_budget 520)
    python benchmarks/multi_gpu.py --quick --out /tmp/m.json   # gloo, 2 CPU processes, tiny shapes (checks the script)
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # the budget counts the imports too

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

CHILD_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(CHILD_ENV)  # before torch initialises NCCL; every subprocess inherits it

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from stamp import stamp  # noqa: E402
from train_throughput import text_batches  # noqa: E402

from m6lit.cli import finish_distributed  # noqa: E402
from m6lit.model import M6Config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "multi_gpu.json"
PEAK_BF16 = 989e12  # H200 SXM dense bf16 datasheet figure, per GPU
GOAL_EFFICIENCY = 0.9
CORRECTNESS_TESTS = (
    "tests/test_strategies_offload_ddp.py::test_cuda_two_gpus_bf16_ranks_stay_identical_and_track_one_gpu",
    "tests/test_strategies_parallel.py::test_fsdp2_cpu_offload_on_two_gpus_matches_the_cpu_run",
    "tests/test_strategies_parallel.py::test_fsdp2_changes_with_cpu_offload_on_two_gpus_match_the_cpu_run",
    "tests/test_strategies_parallel.py::test_expert_parallel_on_two_gpus_matches_one_process_across_a_delink",
)
SCALING_CASES = {"a": ("dense", "ddp"), "b": ("dense", "m6_offload_ddp"), "c": ("dense", "m6_fsdp"),
                 "d": ("moe", "m6_ep")}
SHARES = {"correctness": 0.28, "scaling": 0.45, "size": 0.27}  # of the budget left after startup
FROZEN = "model.embed.patches."  # text-only batches never reach the patch embedding


# ------------------------------------------------------------------------------------------------ shapes
def shapes(quick: bool) -> dict[str, Any]:
    """The scaling models (a ~0.9 B dense trunk; an MoE model of ~0.75 B, ~0.55 B of it in 16 experts per layer
    pair) and the per-rank micro-batch."""
    if quick:
        trunk = dict(vocab_size=256, d_model=64, n_heads=4, d_ff=176, num_layers=4, max_seq_len=64, image_size=32,
                     patch_size=8)
        moe = dict(trunk, moe_layers=2, num_experts=4, top_k=2, expert_d_ff=88)
        return {"dense": dict(trunk, moe_layers="none"), "moe": moe, "batch": 2, "seq": 64}
    trunk = dict(vocab_size=32000, d_model=2048, n_heads=16, d_ff=5632, num_layers=16, max_seq_len=2048,
                 image_size=224, patch_size=16)
    moe = dict(trunk, d_model=1024, n_heads=16, d_ff=2816, moe_layers=2, num_experts=16, top_k=2, expert_d_ff=1408)
    return {"dense": dict(trunk, moe_layers="none"), "moe": moe, "batch": 4, "seq": 2048}


def size_candidates(quick: bool) -> list[dict[str, Any]]:
    """Dense models from large to small for the size search (d_model 5120, 40 heads, SwiGLU 13824: ~0.32 B per
    layer)."""
    if quick:
        base = dict(vocab_size=256, d_model=64, n_heads=4, d_ff=176, max_seq_len=64, image_size=32, patch_size=8,
                    moe_layers="none")
        return [dict(base, num_layers=n) for n in (12, 8, 4)]
    base = dict(vocab_size=32000, d_model=5120, n_heads=40, d_ff=13824, max_seq_len=2048, image_size=224,
                patch_size=16, moe_layers="none")
    return [dict(base, num_layers=n) for n in (96, 80, 64, 56, 48, 40, 32, 24)]


# ------------------------------------------------------------------------------------------------ worker (one rank)
def make_strategy(name: str, options: dict[str, Any]) -> Any:
    from lightning.pytorch.strategies import DDPStrategy

    from m6lit.strategies import DDPOffloadStrategy, ExpertParallelStrategy, FSDP2Strategy

    kinds = {"ddp": DDPStrategy, "m6_offload_ddp": DDPOffloadStrategy, "m6_fsdp": FSDP2Strategy,
             "m6_ep": ExpertParallelStrategy}
    if name not in kinds:
        raise ValueError(f"strategy {name!r}: choose one of {sorted(kinds)}")
    return kinds[name](**options)


def worker(spec_path: Path) -> None:
    """One Lightning fit of `warmup + steps` optimizer steps under the spec's strategy on `devices` ranks (this
    process is rank 0; Lightning's launcher starts the others with the same command line); rank 0 writes the
    timing of the last `steps` to the spec's `result` path."""
    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    from m6lit.module import M6LitModule

    spec = json.loads(spec_path.read_text())
    cuda = spec["accelerator"] == "gpu"
    config = M6Config(**spec["config"])
    warmup, steps = spec["warmup"], spec["steps"]
    if not cuda:
        torch.set_num_threads(1)  # a CPU run of 1 rank against 2 compares like with like (one core per rank)
    torch.manual_seed(0)
    module = M6LitModule(config, warmup_steps=1)
    for name, p in module.named_parameters():
        if name.startswith(FROZEN):
            p.requires_grad_(False)
    params = sum(p.numel() for p in module.parameters())
    marks: dict[str, Any] = {"losses": []}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == warmup:
                sync()
                marks["t0"] = time.perf_counter()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            marks["losses"].append(loss.detach())
            if batch_idx == warmup + steps - 1:
                sync()
                marks["t1"] = time.perf_counter()

    class Cycle(Dataset):
        def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
            self.items = items

        def __len__(self) -> int:
            return warmup + steps + 1

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return self.items[i % len(self.items)]

    trainer = L.Trainer(accelerator=spec["accelerator"], devices=spec["devices"],
                        strategy=make_strategy(spec["strategy"], spec.get("options", {})),
                        precision=spec["precision"], max_steps=warmup + steps, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[Timer()])
    loader = DataLoader(Cycle(text_batches(config.vocab_size, spec["batch"], spec["seq"])), batch_size=None,
                        shuffle=False, pin_memory=cuda)
    t_fit = time.perf_counter()
    trainer.fit(module, loader)
    if trainer.global_rank != 0:
        return
    elapsed = marks["t1"] - marks["t0"]
    tokens = spec["batch"] * spec["seq"] * trainer.world_size * steps
    losses = [float(x) for x in marks["losses"]]
    result = {"params": params, "world": trainer.world_size, "step_s": elapsed / steps,
              "tokens_per_s": tokens / elapsed, "tokens_per_step": tokens // steps,
              "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
              "host_rss_peak_bytes": _rss_peak(), "fit_s": time.perf_counter() - t_fit,
              "losses": losses, "env": {k: os.environ.get(k) for k in CHILD_ENV},
              "loss_finite": all(x == x and abs(x) != float("inf") for x in losses)}
    Path(spec["result"]).write_text(json.dumps(result))


def _rss_peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------------ driver helpers
class Clock:
    """Seconds since the start; progress lines carry them."""

    def __init__(self, budget: float) -> None:
        self.t0 = T_START
        self.budget = budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)


def child_env() -> dict[str, str]:
    return {**os.environ, **CHILD_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def start_child(command: list[str], log: Path) -> tuple[subprocess.Popen, Any, float]:
    """Start `command` in its own process group with the child environment, output to `log`."""
    out = log.open("w")
    proc = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, out, time.perf_counter()


def finish_child(proc: subprocess.Popen, out: Any, timeout: float) -> Optional[int]:
    """Wait up to `timeout` seconds; past it, kill the group (the command and the ranks it launched). Returns the
    exit code, or None on timeout."""
    try:
        code: Optional[int] = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    out.close()
    return code


def run_child(command: list[str], timeout: float, log: Path) -> tuple[Optional[int], float]:
    """`command` run to its end or `timeout`. Returns (exit code or None on timeout, seconds)."""
    proc, out, t0 = start_child(command, log)
    return finish_child(proc, out, timeout), time.perf_counter() - t0


def tail(path: Path, chars: int = 1500) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def parse_junit(path: Path) -> dict[str, dict[str, str]]:
    """Outcome (passed / failed / error / skipped) and message per test id (`file::name`) from pytest's junit XML."""
    out: dict[str, dict[str, str]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        test_id = f"{module}.py::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or "")[:500]
                break
        out[test_id] = {"outcome": outcome, "message": message}
    return out


def efficiency(one: Optional[dict], many: Optional[dict]) -> Optional[float]:
    """tok/s on N / (N × tok/s on 1), or None when either run is missing."""
    if not one or not many or not one.get("tokens_per_s") or not many.get("tokens_per_s"):
        return None
    return many["tokens_per_s"] / (many["world"] * one["tokens_per_s"])


def host_memory() -> int:
    """The host memory this process may use: MemTotal, or the container's cgroup limit when that is lower."""
    with open("/proc/meminfo") as f:
        total = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:")), None)
    if total is None:
        raise RuntimeError("/proc/meminfo has no MemTotal line")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


# ------------------------------------------------------------------------------------------------ phases
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cuda = torch.cuda.is_available() and not args.quick
        self.gpus = args.gpus or (torch.cuda.device_count() if self.cuda else 2)
        self.clock = Clock(args.time_budget)
        self.work = args.logs or Path(tempfile.mkdtemp(prefix="m6lit_multi_gpu_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.shapes = shapes(args.quick)
        self.results: dict[str, Any] = {
            "stamp": stamp(), "args": {k: str(v) for k, v in vars(args).items()}, "child_env": CHILD_ENV,
            "gpus": self.gpus, "accelerator": "gpu" if self.cuda else "cpu (gloo)", "shapes": self.shapes,
            "logs": str(self.work), "goal_efficiency": GOAL_EFFICIENCY, "correctness": {}, "scaling": {},
            "summary": {}, "size": {}}
        self.runs = 0

    def save(self) -> None:
        self.results["elapsed_s"] = self.clock.elapsed()
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.results, indent=1))
        plot(self.results, self.args.out.with_suffix(".png"))

    def train(self, label: str, config: dict, strategy: str, devices: int, timeout: float,
              options: Optional[dict] = None, batch: Optional[int] = None, seq: Optional[int] = None,
              steps: Optional[int] = None, warmup: Optional[int] = None) -> dict[str, Any]:
        """One worker fit in a subprocess; the worker's result, or the failure with the log's tail."""
        self.runs += 1
        spec_path = self.work / f"spec{self.runs}.json"
        result_path = self.work / f"result{self.runs}.json"
        log = self.work / f"run{self.runs}.log"
        spec = {"config": config, "strategy": strategy, "options": options or {}, "devices": devices,
                "accelerator": "gpu" if self.cuda else "cpu", "precision": "bf16-mixed" if self.cuda else "32-true",
                "batch": batch or self.shapes["batch"], "seq": seq or self.shapes["seq"],
                "warmup": self.args.warmup if warmup is None else warmup,
                "steps": self.args.steps if steps is None else steps, "result": str(result_path)}
        spec_path.write_text(json.dumps(spec))
        self.clock.log(f"{label}: {strategy} on {devices} {'GPU' if self.cuda else 'process'}(es), "
                       f"timeout {timeout:.0f}s")
        code, seconds = run_child([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                                  timeout, log)
        row: dict[str, Any] = {"strategy": strategy, "devices": devices, "options": spec["options"],
                               "wall_s": seconds}
        if code == 0 and result_path.exists():
            row.update(json.loads(result_path.read_text()), ok=True)
            dense = config.get("moe_layers") == "none"  # 6 N T counts every parameter: dense models only
            row["mfu"] = (6 * row["params"] * row["tokens_per_s"] / (devices * PEAK_BF16)
                          if self.cuda and dense else None)
            self.clock.log(f"{label}: {row['tokens_per_s']:,.0f} tok/s ({row['step_s'] * 1e3:.1f} ms/step, "
                           f"{seconds:.0f}s wall)")
        else:
            row.update(ok=False, error="timeout" if code is None else f"exit {code}", log_tail=tail(log))
            self.clock.log(f"{label}: FAILED ({row['error']}); log tail:\n{tail(log, 600)}")
        return row

    # ---------------------------------------------------------------- 1. correctness
    def correctness(self, budget: float) -> None:
        """One pytest process per test id, all at once (each test runs its own 2-rank jobs; Lightning picks a free
        port per job, and NCCL communicators of different processes may share the GPUs), within `budget`."""
        res = self.results["correctness"]
        if not self.cuda or self.gpus < 2:
            # the ids still go through pytest (they skip without two GPUs): the collection and parsing are checked
            res["note"] = "no two CUDA devices: the NCCL tests skip (recorded as skipped)"
        # --quick: one id per test file (they skip on the CPU; collection and parsing are what is checked)
        ids = CORRECTNESS_TESTS[:2] if self.args.quick else CORRECTNESS_TESTS
        self.clock.log(f"correctness: {len(ids)} tests in parallel, timeout {budget:.0f}s")
        jobs = []
        for i, test_id in enumerate(ids):
            junit, log = self.work / f"junit{i}.xml", self.work / f"pytest{i}.log"
            command = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", f"--junitxml={junit}",
                       test_id]
            jobs.append((test_id, junit, log, start_child(command, log)))
        deadline = time.perf_counter() + budget
        res["tests"] = {}
        for test_id, junit, log, (proc, out, t0) in jobs:
            code = finish_child(proc, out, deadline - time.perf_counter())
            outcome = parse_junit(junit).get(test_id) if junit.exists() else None
            row = dict(outcome or {"outcome": "not run (timeout)" if code is None else "missing", "message": ""})
            row.update(exit_code=code, wall_s=time.perf_counter() - t0)
            if row["outcome"] not in ("passed", "skipped"):
                row["log_tail"] = tail(log, 4000)
            res["tests"][test_id] = row
            self.clock.log(f"  {row['outcome']:8s} {test_id.split('::')[1]} ({row['wall_s']:.0f}s)")
        res["wall_s"] = max(r["wall_s"] for r in res["tests"].values())
        self.save()

    # ---------------------------------------------------------------- 2. scaling
    def scaling(self, budget: float) -> None:
        end = self.clock.elapsed() + budget
        plan = []  # (key, model, strategy, devices, options)
        layers = self.shapes["dense"]["num_layers"]
        every_other = [f"model.blocks.[{','.join(str(i) for i in range(1, layers, 2))}]"]
        for case in self.args.cases:
            model, strategy = SCALING_CASES[case]
            options = {"offload": every_other} if strategy == "m6_offload_ddp" else {}
            if case == "d":
                plan += [("d:ep", model, "m6_ep", self.gpus, {}), ("d:replicated", model, "ddp", self.gpus, {})]
            else:
                plan += [(f"{case}:1", model, strategy, 1, options), (f"{case}:{self.gpus}", model, strategy,
                                                                       self.gpus, options)]
        for i, (key, model, strategy, devices, options) in enumerate(plan):
            left = end - self.clock.elapsed()
            if left < 5:
                self.results["scaling"][key] = {"ok": False, "error": "not run: the scaling share of the budget "
                                                                      "was spent"}
                continue
            # 1.5x an even share of what is left (a slow case may use a finished one's slack), at least 60 s (the
            # first run compiles FlexAttention into the inductor cache the later runs read)
            timeout = min(left, max(60.0, 1.5 * left / (len(plan) - i)))
            self.results["scaling"][key] = self.train(key, self.shapes[model], strategy, devices, timeout, options)
            self.summarise()
            self.save()

    def summarise(self) -> None:
        sc, summary = self.results["scaling"], {}
        for case in "abc":
            one, many = sc.get(f"{case}:1"), sc.get(f"{case}:{self.gpus}")
            eff = efficiency(one if one and one.get("ok") else None, many if many and many.get("ok") else None)
            if one or many:
                summary[case] = {"strategy": SCALING_CASES[case][1], "efficiency": eff, "goal": GOAL_EFFICIENCY,
                                 "meets_goal": None if eff is None else eff >= GOAL_EFFICIENCY}
        ep, rep = sc.get("d:ep"), sc.get("d:replicated")
        if ep or rep:
            ok = ep and rep and ep.get("ok") and rep.get("ok")
            ratio = ep["tokens_per_s"] / rep["tokens_per_s"] if ok else None
            summary["d"] = {"strategy": "m6_ep vs ddp", "ep_over_replicated": ratio, "goal": "> 1",
                            "meets_goal": None if ratio is None else ratio > 1}
        self.results["summary"] = summary

    # ---------------------------------------------------------------- 3. size
    def size(self, budget: float) -> None:
        from m6lit.module import M6LitModule
        from m6lit.strategies.parallel_estimate import parallel_estimate

        res = self.results["size"]
        end = self.clock.elapsed() + budget
        n = self.gpus
        gpu_bytes = (torch.cuda.get_device_properties(0).total_memory if self.cuda
                     else self.args.quick_gpu_bytes)
        host_bytes = host_memory()
        res.update(gpu_bytes=gpu_bytes, host_bytes=host_bytes, gpu_fraction=0.85, host_fraction=0.7, tries=[])
        reserve = 2 * 2**30 if self.cuda else 0  # CUDA context and allocator slack
        micro_tokens = self.args.size_batch * size_candidates(self.args.quick)[0]["max_seq_len"]
        planned = []
        for config in size_candidates(self.args.quick):
            with torch.device("meta"):
                module = M6LitModule(M6Config(**config))
            params = sum(p.numel() for p in module.parameters())
            layers = config["num_layers"]
            choice = None
            for k in range(1, layers + 1):  # offload the last k blocks: the fewest that fit the GPU
                offload = [f"model.blocks.[{layers - k}-{layers - 1}]"]
                est = parallel_estimate(module, "m6_fsdp+offload", n, offload=offload, activation_checkpointing=True,
                                        micro_batch_tokens=micro_tokens, reserve_bytes=reserve)
                if est.gpu_total <= 0.85 * gpu_bytes:
                    choice = (k, offload, est)
                    break
            entry = {"layers": layers, "params": params}
            if choice is None:
                entry.update(plan="does not fit the GPUs even with every block offloaded", est_gpu_bytes=est.gpu_total)
            else:
                k, offload, est = choice
                # setup holds a full fp32 copy per rank on the host before sharding; then the offloaded shards
                host_need = n * max(4 * params, est.host_total)
                entry.update(offloaded_blocks=k, offload=offload, est_gpu_bytes=est.gpu_total,
                             est_host_bytes_per_rank=est.host_total, host_need_bytes=host_need)
                if host_need > 0.7 * host_bytes:
                    entry["plan"] = "host memory"
                else:
                    entry["plan"] = "fits"
                    planned.append((config, params, offload, k))
            res.setdefault("candidates", []).append(entry)
        self.clock.log(f"size: {len(planned)} of {len(res['candidates'])} candidates fit the plan; trying from the "
                       f"largest")
        for config, params, offload, k in planned:
            left = end - self.clock.elapsed()
            if left < 10:
                break
            row = self.train(f"size {params / 1e9:.3g}B", config, "m6_fsdp", n, left,
                             options={"activation_checkpointing": True, "cpu_offload": offload},
                             batch=self.args.size_batch, seq=config["max_seq_len"], steps=self.args.size_steps,
                             warmup=1)
            row.update(offloaded_blocks=k, params=params)
            if row.get("ok"):
                row["params_per_gpu"] = params / n
            res["tries"].append(row)
            self.save()
            if row.get("ok"):
                res["largest"] = {k2: row.get(k2) for k2 in ("params", "params_per_gpu", "offloaded_blocks",
                                                             "tokens_per_s", "step_s", "mfu", "peak_gpu_bytes",
                                                             "host_rss_peak_bytes", "loss_finite")}
                break
        self.save()


# ------------------------------------------------------------------------------------------------ report
def table(results: dict) -> str:
    lines = ["", f"Multi-GPU ({results['gpus']} x {results['stamp']['device']}, {results['accelerator']})", ""]
    lines.append("correctness (NCCL tests)")
    for t, r in results["correctness"].get("tests", {}).items():
        lines.append(f"  {r['outcome']:8s} {t}")
    lines += ["", f"{'run':16s} {'strategy':15s} {'GPUs':>4s} {'tok/s':>12s} {'ms/step':>9s} {'peak GB':>8s} "
                  f"{'MFU':>6s}"]
    for key, r in results["scaling"].items():
        if r.get("ok"):
            peak = f"{r['peak_gpu_bytes'] / 1e9:8.1f}" if r.get("peak_gpu_bytes") else f"{'-':>8s}"
            mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else f"{'-':>6s}"
            lines.append(f"{key:16s} {r['strategy']:15s} {r['devices']:4d} {r['tokens_per_s']:12,.0f} "
                         f"{r['step_s'] * 1e3:9.1f} {peak} {mfu}")
        else:
            lines.append(f"{key:16s} {r.get('strategy', '-'):15s} {r.get('devices', 0):4d} {r.get('error')}")
    lines.append("")
    for case, s in results["summary"].items():
        value = s.get("efficiency", s.get("ep_over_replicated"))
        what = "efficiency" if "efficiency" in s else "EP / replicated"
        shown = "n/a" if value is None else f"{value:.3f}"
        lines.append(f"({case}) {s['strategy']:15s} {what} {shown} (goal {s['goal']}): "
                     f"{'met' if s['meets_goal'] else 'not met' if s['meets_goal'] is False else 'n/a'}")
    largest = results["size"].get("largest")
    lines.append("")
    if largest:
        mfu = "n/a" if largest["mfu"] is None else f"{100 * largest['mfu']:.1f}%"
        lines.append(f"largest FSDP2 + offload: {largest['params'] / 1e9:.2f} B parameters "
                     f"({largest['params_per_gpu'] / 1e9:.2f} B per GPU, {largest['offloaded_blocks']} blocks "
                     f"offloaded), {largest['tokens_per_s']:,.0f} tok/s, MFU {mfu}")
    else:
        lines.append("largest FSDP2 + offload: none trained")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = results["scaling"]
    n = results["gpus"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    cases = [c for c in "abc" if f"{c}:1" in sc or f"{c}:{n}" in sc]
    width = 0.35
    for j, (suffix, label) in enumerate(((1, "1 GPU × N (linear)"), (n, f"{n} GPUs"))):
        values = []
        for c in cases:
            r = sc.get(f"{c}:{suffix}", {})
            tps = r.get("tokens_per_s", 0.0) if r.get("ok") else 0.0
            values.append(tps * (n if suffix == 1 else 1))
        left.bar([i + j * width for i in range(len(cases))], values, width, label=label)
    for i, c in enumerate(cases):
        eff = results["summary"].get(c, {}).get("efficiency")
        if eff is not None:
            left.text(i + width / 2, 0, f"{eff:.2f}", ha="center", va="bottom")
    left.set_xticks([i + width / 2 for i in range(len(cases))], [f"({c}) {SCALING_CASES[c][1]}" for c in cases])
    left.set_ylabel("tokens/s")
    left.set_title(f"scaling (efficiency on the bars, goal ≥ {GOAL_EFFICIENCY})")
    left.legend()
    keys = [k for k in ("d:replicated", "d:ep") if k in sc]
    right.bar(keys, [sc[k].get("tokens_per_s", 0.0) if sc[k].get("ok") else 0.0 for k in keys],
              color=["tab:gray", "tab:green"][:len(keys)])
    right.set_ylabel("tokens/s")
    right.set_title(f"(d) MoE on {n}: experts replicated vs expert parallel")
    fig.suptitle(f"{results['stamp']['device']} · {results['stamp']['git_rev']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time_budget", type=float, default=520.0, help="seconds for the whole run")
    parser.add_argument("--gpus", type=int, default=None, help="N (default: every visible GPU; 2 on --quick)")
    parser.add_argument("--phases", nargs="+", default=["correctness", "scaling", "size"],
                        choices=["correctness", "scaling", "size"])
    parser.add_argument("--cases", default="abcd", help="scaling cases to run (default all)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per scaling run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--size_batch", type=int, default=2, help="micro-batch rows per rank in the size search")
    parser.add_argument("--size_steps", type=int, default=2, help="timed steps per size try (after one warm-up)")
    parser.add_argument("--quick_gpu_bytes", type=float, default=2.5e6,
                        help="--quick: the pretend GPU memory the size plan fits into")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {RESULTS}); the PNG beside it")
    parser.add_argument("--logs", type=Path, default=None,
                        help="folder for every child's log, spec and result (default: a new temporary folder)")
    parser.add_argument("--quick", action="store_true", help="gloo, 2 CPU processes, tiny shapes (checks the script)")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        try:
            worker(args.worker)
        finally:
            finish_distributed()
        return
    if args.quick:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 2)
        args.size_steps = 1
    bad = set(args.cases) - set(SCALING_CASES)
    if bad:
        parser.error(f"--cases {args.cases!r}: unknown {sorted(bad)}; choose from {''.join(SCALING_CASES)}")
    args.out = args.out or RESULTS
    if not args.quick and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --quick on the CPU")
    bench = Bench(args)
    if bench.cuda and bench.gpus < 2:
        parser.error(f"{bench.gpus} GPU visible: this benchmark needs at least 2")
    bench.clock.log(f"{bench.gpus} x {bench.results['stamp']['device']}, budget {args.time_budget:.0f}s, "
                    f"phases {args.phases}, NCCL {bench.results['stamp']['nccl']}, env {CHILD_ENV}")
    bench.save()
    shares = {p: SHARES[p] for p in args.phases}
    for i, phase in enumerate(args.phases):
        rest = sum(shares[p] for p in args.phases[i:])
        budget = bench.clock.left() * shares[phase] / rest - 2
        if budget < 5:
            bench.results[phase]["skipped"] = "the time budget was spent"
            bench.clock.log(f"{phase}: skipped (budget spent)")
            continue
        getattr(bench, phase)(budget)
    bench.save()
    print(table(bench.results))
    bench.clock.log(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
