"""Two-rank gloo fit under m6_offload_ddp (Lightning's launcher starts the second rank; Lightning's DistributedSampler
splits the data); each rank saves its per-step losses and parameters and how many checkpoints it wrote (run by
tests/test_strategies_offload_ddp.py).

Environment: M6LIT_TEST_OUT (output folder), M6LIT_STEPS, optional M6LIT_CKPT (resume from), M6LIT_CKPT_DIR
(checkpoint every step there), M6LIT_DELINK_STEP (PseudoToReal to 4 blocks after that step), M6LIT_ACCELERATOR
(default cpu), M6LIT_PRECISION (default 32-true), M6LIT_ACCUMULATE (accumulate_grad_batches, default 1).
"""

import os
from pathlib import Path

import lightning as L
import torch
from _dist import assert_gloo_threads_joined
from _fakes import LossRecorder, loader, tiny_config
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from m6lit.cli import finish_distributed
from m6lit.callbacks import PseudoToReal
from m6lit.module import M6LitModule
from m6lit.strategies import DDPOffloadStrategy

OFFLOAD = ["model.blocks.[1-3]"]  # block 1 before the delink, blocks 1-3 after it
CLIP = 0.5
BATCH = 2


class CountingIO(TorchCheckpointIO):
    """Counts the checkpoint files this process writes."""

    writes = 0

    def save_checkpoint(self, *args, **kwargs) -> None:
        CountingIO.writes += 1
        super().save_checkpoint(*args, **kwargs)


class Snapshots(L.Callback):
    """Every parameter after every optimizer step (streamed ones read from their host masters) and the streamed
    units then."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.streamed: dict[int, list[str]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainer.strategy.drain()
        self.states[trainer.global_step] = {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters()}
        self.streamed[trainer.global_step] = sorted(u.name for u in trainer.strategy.streamer.units)


def make_module() -> M6LitModule:
    """Two shared blocks for four layers; fused AdamW, as the offload strategies make every Adam (so a resident
    reference steps with the same kernel)."""
    torch.manual_seed(0)
    return M6LitModule(tiny_config(num_unique_blocks=2), warmup_steps=1,
                       optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True))


def main() -> None:
    env = os.environ
    out = Path(env["M6LIT_TEST_OUT"])
    module = make_module()
    strategy = DDPOffloadStrategy(offload=OFFLOAD)
    recorder, snapshots = LossRecorder(), Snapshots()
    callbacks = [recorder, snapshots]
    if env.get("M6LIT_DELINK_STEP"):
        callbacks.append(PseudoToReal(delink_step=int(env["M6LIT_DELINK_STEP"]), optimizer_state="copy"))
    if env.get("M6LIT_CKPT_DIR"):
        callbacks.append(ModelCheckpoint(dirpath=env["M6LIT_CKPT_DIR"], every_n_train_steps=1, save_top_k=-1,
                                         filename="{step}"))
    trainer = L.Trainer(accelerator=env.get("M6LIT_ACCELERATOR", "cpu"), devices=2, strategy=strategy,
                        precision=env.get("M6LIT_PRECISION", "32-true"),
                        accumulate_grad_batches=int(env.get("M6LIT_ACCUMULATE", "1")),
                        max_steps=int(env["M6LIT_STEPS"]),
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=bool(env.get("M6LIT_CKPT_DIR")), deterministic=True,
                        gradient_clip_val=CLIP, callbacks=callbacks, plugins=[CountingIO()])
    trainer.fit(module, loader(batch_size=BATCH), ckpt_path=env.get("M6LIT_CKPT") or None)
    coefs = [row["clip_coef"] for row in strategy.step_stats]
    torch.save({"losses": recorder.rows, "states": snapshots.states, "writes": CountingIO.writes,
                "world": trainer.world_size, "clip_coefs": coefs, "blocks": len(module.model.blocks),
                "streamed": snapshots.streamed},
               out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    try:
        main()
    finally:
        finish_distributed()
    assert_gloo_threads_joined()
