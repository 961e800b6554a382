"""FSDP2 and expert-parallel strategies on two gloo CPU ranks (Lightning launches the second rank of
tests/scripts/parallel_fit.py), against one process; the structural-change safety rule.

- FSDP2, 2 ranks × batch 4 == one process × batch 4 with 2-batch accumulation over the same samples: losses to 1e-5
  (FSDP2 reduce-scatters gradients in another summation order), final weights to 1e-5.
- A distributed checkpoint resumes exactly (losses bitwise), into a module built with shared blocks (the
  checkpoint's delinked structure is rebuilt before sharding), and `m6lit export` reads the folder.
- Expert parallel, 2 ranks × batch 4 == one process × batch 8, with a delink mid-run: mean loss per step and final
  weights to 1e-6; the
  checkpoint holds the full experts and their optimizer state (any expert-parallel size loads it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from _fakes import LossRecorder, tiny_config
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

from m6lit.callbacks import DelinkEvent, ExpertSplitMerge, PseudoToReal
from m6lit.structure import notify_strategy
from m6lit.model import ParamMap, delink
from m6lit.module import M6LitModule
from m6lit.strategies import ExpertParallelStrategy, FSDP2Strategy
from m6lit.strategies.parallel import check_scheduled_expert_counts
from m6lit.structure import ExpertChange

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "scripts"))
from _parallel_data import FixedPrefix, Interleaved, interleaved_loader  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo on two local processes")


def _run(out: Path, strategy: str, steps: int, **extra: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), str(HERE / "scripts")]),
           "M6LIT_TEST_OUT": str(out), "M6LIT_STRATEGY": strategy, "M6LIT_STEPS": str(steps), **extra}
    proc = subprocess.run([sys.executable, str(HERE / "scripts" / "parallel_fit.py")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def _reference(steps: int, batch: int, accumulate: int, callbacks: tuple = (), **config) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    module = M6LitModule(tiny_config(**config), warmup_steps=1)
    recorder = LossRecorder()
    loader = torch.utils.data.DataLoader(FixedPrefix(64), batch_size=batch, sampler=Interleaved(64, 2, 4),
                                         collate_fn=interleaved_loader(2).collate_fn)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, accumulate_grad_batches=accumulate,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, deterministic=True, callbacks=[recorder, *callbacks])
    trainer.fit(module, loader)
    # Lightning reports the accumulated (divided) loss of each micro-batch
    return [loss * accumulate for _, loss in recorder.rows], module.state_dict()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp")
    return out, _run(out, "fsdp", 4, M6LIT_CKPT_DIR=str(out / "ckpt"))


def test_fsdp2_two_ranks_match_one_process(fsdp_run) -> None:
    _, ranks = fsdp_run
    losses, state = _reference(4, batch=4, accumulate=2)
    for rank, result in enumerate(ranks):
        assert [s for s, _ in result["losses"]] == [1, 2, 3, 4]
        got = torch.tensor([loss for _, loss in result["losses"]])
        torch.testing.assert_close(got, torch.tensor(losses[rank::2]), rtol=0, atol=1e-5)
        for name, value in result["state"].items():
            torch.testing.assert_close(value, state[name], rtol=0, atol=1e-5, msg=name)
    assert ranks[0]["state"].keys() == state.keys()


def test_fsdp2_plan_matches_the_bytes_each_rank_holds(fsdp_run) -> None:
    """`m6lit plan`'s m6_fsdp estimate of parameter + optimizer-state bytes per rank against what each rank of the
    2-rank run holds: the mean exactly (FSDP2 shards every tensor over the ranks), each rank within 10% (dim-0
    chunks of odd-sized tensors are uneven)."""
    from m6lit.strategies.parallel_estimate import parallel_estimate

    _, ranks = fsdp_run
    est = parallel_estimate(M6LitModule(tiny_config()), "m6_fsdp", 2, precision="32-true", micro_batch_tokens=48)
    held = [r["param_bytes"] + r["state_bytes"] for r in ranks]
    assert sum(held) / 2 == est.state_bytes
    for value in held:
        assert abs(value - est.state_bytes) <= 0.1 * est.state_bytes


def test_fsdp2_distributed_checkpoint_resumes_exactly_across_a_delink(fsdp_run, tmp_path: Path) -> None:
    out, ranks = fsdp_run
    folder = out / "ckpt" / "step=2.ckpt"
    assert (folder / "meta.pt").is_file() and len(list(folder.glob("*.distcp"))) == 2
    # the resuming module is built shared (2 blocks); the checkpoint holds 4: rebuilt before sharding
    # resumed with activation checkpointing (and offload patterns, a no-op on a CPU run): the same numbers
    fsdp = {"activation_checkpointing": True, "cpu_offload": ["model.blocks.[1-2]"]}
    resumed = _run(tmp_path, "fsdp", 4, M6LIT_CKPT=str(folder), M6LIT_CONFIG=json.dumps({"num_unique_blocks": 2}),
                   M6LIT_FSDP=json.dumps(fsdp))
    for rank in (0, 1):
        assert resumed[rank]["blocks"] == 4
        assert resumed[rank]["losses"] == ranks[rank]["losses"][2:]
        for name, value in resumed[rank]["state"].items():
            assert torch.equal(value, ranks[rank]["state"][name]), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 CPU offload on two GPUs")
def test_fsdp2_cpu_offload_on_two_gpus_matches_the_cpu_run(fsdp_run, tmp_path: Path) -> None:
    _, cpu = fsdp_run
    fsdp = {"activation_checkpointing": True, "cpu_offload": ["model.blocks.[1-2]"]}
    gpu = _run(tmp_path, "fsdp", 4, M6LIT_ACCELERATOR="gpu", M6LIT_FSDP=json.dumps(fsdp))
    for rank in (0, 1):
        got = torch.tensor([loss for _, loss in gpu[rank]["losses"]])
        torch.testing.assert_close(got, torch.tensor([loss for _, loss in cpu[rank]["losses"]]), rtol=0, atol=1e-4)


def test_export_reads_a_distributed_checkpoint(fsdp_run) -> None:
    from m6lit.export import load_checkpoint, model_from_checkpoint

    out, ranks = fsdp_run
    ckpt = load_checkpoint(out / "ckpt" / "step=4.ckpt")
    assert ckpt["global_step"] == 4
    model = model_from_checkpoint(ckpt)
    for name, value in model.state_dict().items():
        assert torch.equal(value, ranks[0]["state"][f"model.{name}"]), name


FSDP_OPTIONS = {"activation_checkpointing": True, "cpu_offload": ["model.blocks.[1-2]"]}
SPLIT_AT_3 = {"schedule": [{"step": 3, "op": "split", "factor": 2, "layers": "all"}]}


@pytest.fixture(scope="module")
def fsdp_change_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """2 shared blocks delinked to 4 after step 2, every MoE block's experts split 4 → 8 after step 3; activation
    checkpointing on, offload patterns given (resolved again after each change; a no-op on a CPU run)."""
    out = tmp_path_factory.mktemp("fsdp_change")
    return out, _run(out, "fsdp", 5, M6LIT_CKPT_DIR=str(out / "ckpt"), M6LIT_DELINK_STEP="2",
                     M6LIT_EXPERTS=json.dumps(SPLIT_AT_3), M6LIT_CONFIG=json.dumps({"num_unique_blocks": 2}),
                     M6LIT_FSDP=json.dumps(FSDP_OPTIONS))


def test_fsdp2_delink_and_expert_split_mid_run_match_one_process(fsdp_change_run) -> None:
    out, ranks = fsdp_change_run
    losses, state = _reference(5, batch=4, accumulate=2, num_unique_blocks=2,
                               callbacks=(PseudoToReal(delink_step=2), ExpertSplitMerge(**SPLIT_AT_3)))
    for rank, result in enumerate(ranks):
        assert result["blocks"] == 4
        assert result["units"] == [[True, True]] * 4  # every new block is an FSDP unit with its checkpointing
        got = torch.tensor([loss for _, loss in result["losses"]])
        torch.testing.assert_close(got, torch.tensor(losses[rank::2]), rtol=0, atol=1e-5)
        for name, value in result["state"].items():
            torch.testing.assert_close(value, state[name], rtol=0, atol=1e-5, msg=name)
    assert ranks[0]["state"].keys() == state.keys()  # the full state dict is gathered on rank 0
    assert ranks[0]["state"]["model.blocks.3.ffn.experts.w_gate"].shape[0] == 8
    # training continues on the new, re-sharded blocks: every block parameter moved after the split
    from m6lit.export import load_checkpoint

    after_split = load_checkpoint(out / "ckpt" / "step=3.ckpt")["state_dict"]
    block_params = [n for n in state if n.startswith("model.blocks.") and "logit_offset" not in n]
    assert after_split["model.blocks.3.ffn.experts.w_gate"].shape[0] == 8
    for name in block_params:
        assert not torch.equal(after_split[name], ranks[0]["state"][name]), name


def test_fsdp2_checkpoint_after_a_delink_and_split_resumes_exactly(fsdp_change_run, tmp_path: Path) -> None:
    out, ranks = fsdp_change_run
    # built shared with 4 experts; the checkpoint (4 blocks, 8 experts) is rebuilt before sharding; the callbacks'
    # changes are recorded as done, so they do not run again
    resumed = _run(tmp_path, "fsdp", 5, M6LIT_CKPT=str(out / "ckpt" / "step=3.ckpt"), M6LIT_DELINK_STEP="2",
                   M6LIT_EXPERTS=json.dumps(SPLIT_AT_3), M6LIT_CONFIG=json.dumps({"num_unique_blocks": 2}))
    for rank in (0, 1):
        assert resumed[rank]["losses"] == ranks[rank]["losses"][3:]
        for name, value in resumed[rank]["state"].items():
            assert torch.equal(value, ranks[rank]["state"][name]), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 CPU offload on two GPUs")
def test_fsdp2_changes_with_cpu_offload_on_two_gpus_match_the_cpu_run(fsdp_change_run, tmp_path: Path) -> None:
    # the offloaded blocks ([1-2]) after the delink and the split are other parameters than before: re-resolved
    _, cpu = fsdp_change_run
    gpu = _run(tmp_path, "fsdp", 5, M6LIT_ACCELERATOR="gpu", M6LIT_DELINK_STEP="2",
               M6LIT_EXPERTS=json.dumps(SPLIT_AT_3), M6LIT_CONFIG=json.dumps({"num_unique_blocks": 2}),
               M6LIT_FSDP=json.dumps(FSDP_OPTIONS))
    for rank in (0, 1):
        got = torch.tensor([loss for _, loss in gpu[rank]["losses"]])
        torch.testing.assert_close(got, torch.tensor([loss for _, loss in cpu[rank]["losses"]]), rtol=0, atol=1e-4)


def _check_stale_units_are_refused(rank: int, world: int) -> None:
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    for bypass in ("replace a parameter", "delink without gathering"):
        torch.manual_seed(0)
        module = M6LitModule(tiny_config(num_unique_blocks=2))
        mesh = init_device_mesh("cpu", (world,))
        for block in module.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(module.model, mesh=mesh)
        strategy = FSDP2Strategy()
        strategy._lightning_module = module
        if bypass == "replace a parameter":
            module.model.blocks[1].attn_norm.weight = nn.Parameter(torch.ones(32))
            match = r"blocks\.1 is an FSDP unit whose parameters were replaced without gathering it first"
        else:
            delink(module.model, 4)
            match = r"blocks\.0 holds DTensor shards outside an FSDP unit"
        with pytest.raises(RuntimeError, match=rf"FSDP2Strategy cannot apply .*: {match}"):
            strategy.on_parameters_changed(None)


def test_fsdp2_refuses_a_change_that_bypassed_the_gather() -> None:
    from _dist import spawn

    spawn(_check_stale_units_are_refused, 2)


def test_expert_parallel_split_and_merge_mid_run_match_one_process(tmp_path: Path) -> None:
    # split 4 → 8 after step 2 (each rank's slice 2 → 4 experts), load-weighted merge back to 4 after step 3
    schedule = {"schedule": [{"step": 2, "op": "split", "factor": 2, "layers": "all"},
                             {"step": 3, "op": "merge", "factor": 2, "layers": [1]}]}
    ranks = _run(tmp_path, "ep", 4, M6LIT_EXPERTS=json.dumps(schedule))
    losses, state = _reference(4, batch=8, accumulate=1, callbacks=(ExpertSplitMerge(**schedule),))
    mean = [(a[1] + b[1]) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(losses), rtol=0, atol=1e-6)
    assert state["model.blocks.1.ffn.experts.w_gate"].shape[0] == 4
    assert state["model.blocks.3.ffn.experts.w_gate"].shape[0] == 8
    for result in ranks:
        for name, value in result["state"].items():
            torch.testing.assert_close(value, state[name], rtol=0, atol=1e-6, msg=name)


def test_expert_parallel_two_ranks_match_one_process_across_a_delink(tmp_path: Path) -> None:
    # 2 shared blocks delinked to 4 after step 2: the clones keep their expert slices, DDP is rebuilt
    ranks = _run(tmp_path, "ep", 3, M6LIT_CKPT_DIR=str(tmp_path / "ckpt"), M6LIT_DELINK_STEP="2",
                 M6LIT_CONFIG=json.dumps({"num_unique_blocks": 2}))
    losses, state = _reference(3, batch=8, accumulate=1, callbacks=(PseudoToReal(delink_step=2),),
                               num_unique_blocks=2)
    assert ranks[0]["blocks"] == ranks[1]["blocks"] == 4
    mean = [(a[1] + b[1]) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(losses), rtol=0, atol=1e-6)
    assert ranks[0]["losses"] != ranks[1]["losses"], "the ranks must see different data"
    ckpt = torch.load(tmp_path / "ckpt" / "step=3.ckpt", weights_only=True)
    for result in (*ranks, {"state": ckpt["state_dict"]}):
        for name, value in result["state"].items():
            torch.testing.assert_close(value, state[name], rtol=0, atol=1e-6, msg=name)
    experts = ckpt["state_dict"]["model.blocks.1.ffn.experts.w_gate"]
    assert experts.shape[0] == 4  # all experts, not one rank's slice
    # `m6lit plan`'s m6_ep estimate (dense replicated, experts halved) is exactly what each rank holds
    from m6lit.strategies.parallel_estimate import parallel_estimate

    est = parallel_estimate(M6LitModule(tiny_config()), "m6_ep", 2, precision="32-true", micro_batch_tokens=48)
    assert [r["param_bytes"] + r["state_bytes"] for r in ranks] == [est.state_bytes] * 2
    moments = [s["exp_avg"] for s in ckpt["optimizer_states"][0]["state"].values()
               if s["exp_avg"].shape == experts.shape]
    assert moments and all(m.abs().sum() > 0 for m in moments)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="expert parallel over NCCL on two GPUs")
def test_expert_parallel_on_two_gpus_matches_one_process_across_a_delink(tmp_path: Path) -> None:
    """The same run as above on two GPUs (NCCL all_to_all_single with variable splits), fp32: the mean loss per
    step and the final weights track the one-process CPU run (GPU kernels sum in another order: 1e-4)."""
    ranks = _run(tmp_path, "ep", 3, M6LIT_ACCELERATOR="gpu", M6LIT_DELINK_STEP="2",
                 M6LIT_CONFIG=json.dumps({"num_unique_blocks": 2}))
    losses, state = _reference(3, batch=8, accumulate=1, callbacks=(PseudoToReal(delink_step=2),),
                               num_unique_blocks=2)
    assert ranks[0]["blocks"] == ranks[1]["blocks"] == 4
    mean = [(a[1] + b[1]) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(losses), rtol=0, atol=1e-4)
    for result in ranks:
        for name, value in result["state"].items():
            torch.testing.assert_close(value.cpu(), state[name], rtol=0, atol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------- safety rule
def _param_map() -> ParamMap:
    module = M6LitModule(tiny_config(num_unique_blocks=2))
    return delink(module.model, 4)


@pytest.mark.parametrize("strategy", [FSDPStrategy(), ModelParallelStrategy()])
def test_strategies_without_the_hook_refuse_a_structural_change(strategy) -> None:
    trainer = SimpleNamespace(strategy=strategy, global_step=7)
    with pytest.raises(RuntimeError, match=rf"{type(strategy).__name__} cannot apply a structural change \(delink of "
                                           rf"\d+ parameters \(blocks\.0\..*at global step 7"):
        notify_strategy(trainer, _param_map())


def test_single_device_subclass_without_the_hook_refuses_and_plain_single_device_passes() -> None:
    class Custom(SingleDeviceStrategy):
        pass

    notify_strategy(SimpleNamespace(strategy=SingleDeviceStrategy("cpu"), global_step=1), _param_map())
    with pytest.raises(RuntimeError, match="Custom cannot apply a structural change"):
        notify_strategy(SimpleNamespace(strategy=Custom("cpu"), global_step=1), _param_map())


def test_expert_parallel_refuses_expert_counts_its_size_does_not_divide() -> None:
    splits = ExpertSplitMerge(schedule=[{"step": 5, "op": "split", "factor": 2, "layers": "all"}])
    model = M6LitModule(tiny_config()).model  # 4 experts: 8 after the split
    trainer = SimpleNamespace(callbacks=[PseudoToReal(schedule=[DelinkEvent(3, 4)]), splits])
    with pytest.raises(ValueError, match=r"ExpertSplitMerge.schedule\[0\] \(split x2 at step 5\) leaves layer 1 "
                                         r"with 8 experts, not divisible by expert_parallel_size=3"):
        check_scheduled_expert_counts(trainer, model, done_step=0, expert_parallel_size=3)
    check_scheduled_expert_counts(trainer, model, done_step=5, expert_parallel_size=3)  # resumed after it
    check_scheduled_expert_counts(trainer, model, done_step=0, expert_parallel_size=4)
    # at the step itself, before anything is gathered or changed
    with pytest.raises(ValueError, match=r"ExpertParallelStrategy: ExpertChange would leave blocks.1 with 8 "
                                         r"experts, blocks.3 with 8 experts, not divisible by "
                                         r"expert_parallel_size=3"):
        ExpertParallelStrategy(expert_parallel_size=3).before_parameters_change(model, ExpertChange("split", 2))
    assert model.blocks[1].ffn.num_experts == 4


def test_registered_short_names_and_bad_arguments() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    assert StrategyRegistry["m6_fsdp"]["strategy"] is FSDP2Strategy
    assert StrategyRegistry["m6_ep"]["strategy"] is ExpertParallelStrategy
    with pytest.raises(TypeError, match="list of patterns, got the string 'model.blocks.0'"):
        FSDP2Strategy(cpu_offload="model.blocks.0")
    with pytest.raises(ValueError, match="expert_parallel_size=0"):
        ExpertParallelStrategy(expert_parallel_size=0)
