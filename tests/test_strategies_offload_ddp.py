"""DDPOffloadStrategy on two gloo CPU ranks (Lightning's launcher starts the second rank of
tests/scripts/offload_ddp_fit.py; Lightning's DistributedSampler splits the data), against one process.

- Two ranks × batch 2, block 1 streamed (blocks 1-3 after a delink at step 2), clipping that triggers: equal
  **bitwise** to one process × two accumulated micro-batches of 2 over the same samples, and the ranks stay identical
  at every step.
  That reference is the exact equivalent: each rank's loss is its micro-batch's token mean, and DDP averages the
  gradients, (g0 + g1) / 2, which is what accumulation computes, g0 / 2 + g1 / 2 (halving is exact in floating point,
  and a sum of two is the same either way round). One process with a batch of 4 is not bitwise: each weight gradient
  would then be one matmul summing 4 rows, a different summation order (about 1e-7 apart), and the MoE balance
  statistics would be taken over 4 samples instead of per micro-batch.
- Rank 0 alone writes checkpoints; a resume from the checkpoint after the delink continues exactly.
- Streamed gradients are averaged in fp32 or in their own dtype, as configured.
- `SelectiveOffloadStrategy` asked for several devices fails at Trainer construction, naming this strategy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from _dist import spawn
from _fakes import ContractBatches, LossRecorder, collate, tiny_config
from lightning.pytorch.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from m6lit.callbacks import PseudoToReal
from m6lit.module import M6LitModule
from m6lit.strategies import DDPOffloadStrategy, SelectiveOffloadStrategy

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "scripts"))
import offload_ddp_fit as fit_script  # noqa: E402

STEPS, DELINK = 4, 2
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="gloo on two local processes")


def _run(out: Path, **extra: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), str(HERE / "scripts")]),
           "M6LIT_TEST_OUT": str(out), "M6LIT_STEPS": str(STEPS), "M6LIT_DELINK_STEP": str(DELINK), **extra}
    proc = subprocess.run([sys.executable, str(HERE / "scripts" / "offload_ddp_fit.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("offload_ddp")
    return out, _run(out, M6LIT_CKPT_DIR=str(out / "ckpt"))


class _StepStates(L.Callback):
    """Every parameter after each optimizer step (the last micro-batch of each accumulation)."""

    def __init__(self, accumulate: int) -> None:
        self.accumulate = accumulate
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.accumulate == 0:
            self.states[trainer.global_step] = {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters()}


Losses = list[list[float]]
States = dict[int, dict[str, torch.Tensor]]


def _one_process_reference(accelerator: str = "cpu", precision: str = "32-true", accumulate: int = 1,
                           steps: int = STEPS, delink: bool = True) -> tuple[Losses, States]:
    """Resident training in this process: micro-batches of 2 in the order two ranks' DistributedSamplers (Lightning
    shuffles training data, seed 0) hand them out — rank 0's batch, then rank 1's — accumulated over both ranks'
    `accumulate` micro-batches. Returns the per-micro-batch losses of each rank's samples (undoing Lightning's
    division by the accumulation) and the parameters after each step."""
    data = ContractBatches(64)
    ranks = [list(DistributedSampler(data, num_replicas=2, rank=r, shuffle=True, seed=0)) for r in (0, 1)]
    b = fit_script.BATCH
    order = [i for start in range(0, len(ranks[0]), b) for r in (0, 1) for i in ranks[r][start:start + b]]
    recorder, states = LossRecorder(), _StepStates(2 * accumulate)
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=steps,
                        accumulate_grad_batches=2 * accumulate, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        deterministic=True, gradient_clip_val=fit_script.CLIP,
                        callbacks=[recorder, states, *([PseudoToReal(delink_step=DELINK, optimizer_state="copy")]
                                                       if delink else [])])
    loader = StatefulDataLoader(data, batch_size=b, sampler=order, collate_fn=collate)
    trainer.fit(fit_script.make_module(), loader)
    losses = [[loss * 2 * accumulate for _, loss in recorder.rows[r::2]] for r in (0, 1)]
    return losses, states.states


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@linux_only
def test_two_ranks_equal_one_process_bitwise_and_each_other_across_a_delink(full_run) -> None:
    _, ranks = full_run
    assert [r["world"] for r in ranks] == [2, 2]
    for step in range(1, STEPS + 1):
        assert _equal(ranks[0]["states"][step], ranks[1]["states"][step]), f"ranks differ after step {step}"
    assert ranks[0]["losses"] != ranks[1]["losses"], "each rank trains on its own shard of the data"
    assert ranks[0]["blocks"] == 4
    assert ranks[0]["streamed"][DELINK] == ["model.blocks.1"]
    assert ranks[0]["streamed"][STEPS] == ["model.blocks.1", "model.blocks.2", "model.blocks.3"]
    coefs = [r["clip_coefs"] for r in ranks]
    assert coefs[0] == coefs[1] and all(c < 1.0 for c in coefs[0]), "clipping by the global norm, on both ranks"
    new = [k for k in ranks[0]["states"][STEPS] if k.startswith("model.blocks.3.")]
    after = ranks[0]["states"][DELINK + 1]
    assert new and all(not torch.equal(after[k], ranks[0]["states"][STEPS][k]) for k in new), \
        "the delinked, streamed blocks keep training"

    losses, states = _one_process_reference()
    assert [[loss for _, loss in r["losses"]] for r in ranks] == losses
    for step in range(1, STEPS + 1):
        assert _equal(ranks[0]["states"][step], states[step]), f"differs from one process after step {step}"


@linux_only
def test_rank_zero_writes_the_checkpoints_and_a_resume_after_the_delink_is_exact(full_run, tmp_path: Path) -> None:
    out, ranks = full_run
    assert [r["writes"] for r in ranks] == [STEPS, 0]
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == [f"step={s}.ckpt" for s in range(1, STEPS + 1)]
    resumed = _run(tmp_path, M6LIT_CKPT=str(out / "ckpt" / f"step={DELINK + 1}.ckpt"))
    for r, full in zip(resumed, ranks):
        assert r["losses"] == full["losses"][DELINK + 1:]
        assert r["blocks"] == 4
        assert _equal(r["states"][STEPS], full["states"][STEPS])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_two_gpus_bf16_ranks_stay_identical_and_track_one_gpu(tmp_path: Path) -> None:
    """On two GPUs (NCCL) under bf16-mixed, with the all-reduces overlapped with backward on the copy stream: the
    ranks stay bitwise identical (every rank receives the same sums and steps them with the same kernels), and the
    losses track one GPU with two accumulated micro-batches (bf16 stream copies round differently
    from autocast's casts of resident weights, so within a tolerance)."""
    ranks = _run(tmp_path, M6LIT_ACCELERATOR="gpu", M6LIT_PRECISION="bf16-mixed")
    for step in range(1, STEPS + 1):
        assert _equal(ranks[0]["states"][step], ranks[1]["states"][step]), f"ranks differ after step {step}"
    losses, _ = _one_process_reference("gpu", "bf16-mixed")
    got = torch.tensor([[loss for _, loss in r["losses"]] for r in ranks])
    torch.testing.assert_close(got, torch.tensor(losses), rtol=0, atol=5e-2)


@linux_only
def test_gradient_accumulation_on_two_ranks_tracks_one_process(tmp_path: Path) -> None:
    """Two ranks × two accumulated micro-batches: streamed gradients are averaged at every micro-batch (they leave the
    device) and summed on the host, resident ones accumulate under DDP's no_sync and are averaged once; one process
    accumulating all four micro-batches adds the same gradients in another association, ((a + b) + c) + d rather
    than (a + b) + (c + d), so the ranks are identical to each other and the losses equal one process to 1e-5."""
    ranks = _run(tmp_path, M6LIT_ACCUMULATE="2", M6LIT_STEPS="2", M6LIT_DELINK_STEP="")
    for step in (1, 2):
        assert _equal(ranks[0]["states"][step], ranks[1]["states"][step]), f"ranks differ after step {step}"
    losses, _ = _one_process_reference(accumulate=2, steps=2, delink=False)
    got = torch.tensor([[loss * 2 for _, loss in r["losses"]] for r in ranks])  # undo the division by 2
    assert got.shape == (2, 4)
    torch.testing.assert_close(got, torch.tensor(losses), rtol=0, atol=1e-5)
    assert torch.equal(got[:, :2], torch.tensor(losses)[:, :2]), "the first step's forwards are the same"


def _check_reduce(rank: int, world: int) -> None:
    strategy = DDPOffloadStrategy(reduce_dtype="float32")
    strategy.cluster_environment = LightningEnvironment()
    strategy.cluster_environment.set_world_size(world)
    strategy.cluster_environment.set_global_rank(rank)
    assert strategy.world_size == world and strategy.global_rank == rank
    g = torch.Generator().manual_seed(rank)
    local = torch.randn(257, generator=g).to(torch.bfloat16)
    everyone = [torch.randn(257, generator=torch.Generator().manual_seed(r)).to(torch.bfloat16) for r in range(world)]
    grad = local.clone()
    assert strategy._reduce_grad(grad)() is grad
    expected32 = (sum(t.float() for t in everyone) / world).to(torch.bfloat16)
    assert torch.equal(grad, expected32), "summed in fp32, the average rounded to bf16 once"
    strategy.reduce_dtype = "grad"
    grad = local.clone()
    strategy._reduce_grad(grad)()
    own = everyone[0].clone()
    for t in everyone[1:]:
        own += t
    assert torch.equal(grad, own / world), "summed in the gradient's own dtype"
    strategy.reduce_dtype = "float32"
    exact = torch.randn(64, generator=g)
    grad = exact.clone()
    strategy._reduce_grad(grad)()
    every32 = [torch.empty_like(exact) for _ in range(world)]
    torch.distributed.all_gather(every32, exact)
    assert torch.equal(grad, sum(every32[1:], every32[0]) / world)


@linux_only
def test_streamed_gradients_average_in_the_configured_dtype() -> None:
    spawn(_check_reduce, 2)


def _check_replicas_start_from_rank_zero(rank: int, world: int) -> None:
    torch.manual_seed(rank)  # a different initialisation on every rank
    module = M6LitModule(tiny_config(num_unique_blocks=2), warmup_steps=1)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=DDPOffloadStrategy(offload=fit_script.OFFLOAD),
                        max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    trainer.fit(module, torch.utils.data.DataLoader(ContractBatches(16), batch_size=2, collate_fn=collate))
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    every = [torch.empty_like(flat) for _ in range(world)]
    torch.distributed.all_gather(every, flat)
    assert all(torch.equal(every[0], other) for other in every[1:]), "replicas differ after a step"


@linux_only
def test_replicas_start_from_rank_zeros_parameters() -> None:
    """Ranks initialised with different seeds train identical replicas: rank 0's parameters (streamed ones
    included) are broadcast before placement. Two ranks forked by the test, Lightning joining their process group."""
    spawn(_check_replicas_start_from_rank_zero, 2)


def _text_only(rows: list[dict]) -> dict:
    return {k: v for k, v in collate(rows).items() if k != "pixel_values"}


def _check_unused_streamed_parameters_fail(rank: int, world: int) -> None:
    loader = torch.utils.data.DataLoader(ContractBatches(16), batch_size=2, collate_fn=_text_only)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=DDPOffloadStrategy(offload=["model.embed.patches"]),
                        max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    with pytest.raises(RuntimeError, match=r"streamed parameters got no gradient in this backward "
                                           r"\(model\.embed\.patches\."):
        trainer.fit(fit_script.make_module(), loader)


@linux_only
def test_a_streamed_parameter_without_a_gradient_is_named_not_a_hang() -> None:
    """Text-only batches leave the streamed patch embedding without gradients: the step stops with its name (the
    ranks' all-reduces would otherwise pair up with the wrong tensors). Two ranks forked by the test, Lightning
    joining their process group."""
    spawn(_check_unused_streamed_parameters_fail, 2)
    with pytest.raises(ValueError, match="does not take gpu_step_window"):
        DDPOffloadStrategy(gpu_step_window="8GB")


@pytest.mark.parametrize("kwargs", [{"devices": 2}, {"devices": 1, "num_nodes": 2}])
def test_single_device_offload_refuses_several_devices_and_names_the_data_parallel_form(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=r"DDPOffloadStrategy \(strategy: m6_offload_ddp"):
        L.Trainer(strategy=SelectiveOffloadStrategy(offload=["model.blocks.1"]), accelerator="cpu", logger=False,
                  **kwargs)
    with pytest.raises(ValueError, match="trains one process on one device"):
        L.Trainer(strategy="m6_offload", accelerator="cpu", logger=False, **kwargs)


def test_short_name_launcher_sampler_and_bad_arguments() -> None:
    assert "m6_offload_ddp" in StrategyRegistry
    trainer = L.Trainer(strategy="m6_offload_ddp", accelerator="cpu", devices=2, logger=False)
    strategy = trainer.strategy
    assert isinstance(strategy, DDPOffloadStrategy)
    assert isinstance(strategy.launcher, _SubprocessScriptLauncher)
    assert strategy.world_size == 2 and strategy.is_global_zero and strategy.root_device == torch.device("cpu")
    assert trainer.distributed_sampler_kwargs == {"num_replicas": 2, "rank": 0}
    with pytest.raises(ValueError, match="reduce_dtype='fp16'"):
        DDPOffloadStrategy(reduce_dtype="fp16")
    with pytest.raises(ValueError, match="either offload patterns or gpu_memory_budget"):
        DDPOffloadStrategy(offload=["model.blocks.1"], gpu_memory_budget="80GB")


def _readme_yaml() -> str:
    """The YAML block of the README's `m6_offload_ddp` subsection (so the test keeps the README true)."""
    part = (HERE.parent / "README.md").read_text().split("### Selective offload on many GPUs", 1)[1]
    return part.split("```yaml\n", 1)[1].split("```", 1)[0]


def test_readme_yaml_class_path_and_the_short_name_with_options_on_the_command_line(tmp_path: Path) -> None:
    from m6lit.cli import _strategy_short_name_with_options

    argv = ["fit", "--trainer.strategy", "m6_offload_ddp", "--trainer.strategy.prefetch", "2"]
    assert _strategy_short_name_with_options(argv)[2] == "m6lit.strategies.DDPOffloadStrategy"
    assert _strategy_short_name_with_options(["--trainer.strategy=m6_offload_ddp", "--trainer.strategy.prefetch=2"])[
        0] == "--trainer.strategy=m6lit.strategies.DDPOffloadStrategy"
    (tmp_path / "run.yaml").write_text(_readme_yaml())
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    out = subprocess.run([sys.executable, "-m", "m6lit", "fit", "--config", str(HERE.parent / "configs" / "demo.yaml"),
                          "--config", str(tmp_path / "run.yaml"), "--trainer.strategy.prefetch", "2",
                          "--print_config"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import yaml

    strategy = yaml.safe_load(out.stdout)["trainer"]["strategy"]
    assert strategy["class_path"] == "m6lit.strategies.DDPOffloadStrategy"
    assert strategy["init_args"]["offload"] == ["model.blocks.[8-23]"] and strategy["init_args"]["prefetch"] == 2
    assert strategy["init_args"]["reduce_dtype"] == "float32"
