"""Two-rank gloo fit under m6_fsdp or m6_ep (Lightning launches the second rank); each rank saves its per-step losses
and, at the end, the full model state (run by tests/test_strategies_parallel.py).

Environment: M6LIT_TEST_OUT (output folder), M6LIT_STRATEGY (fsdp | ep), M6LIT_STEPS, optional M6LIT_CKPT (resume
from), M6LIT_CKPT_DIR (checkpoint every step there), M6LIT_CONFIG (json overrides of the tiny config),
M6LIT_FSDP (json FSDP2Strategy arguments), M6LIT_ACCELERATOR (default cpu), M6LIT_DELINK_STEP (add
PseudoToReal), M6LIT_EXPERTS (json ExpertSplitMerge arguments).
"""

import json
import os
from pathlib import Path

import lightning as L
import torch
from _dist import assert_gloo_threads_joined
from _fakes import LossRecorder, tiny_config
from _parallel_data import rank_loader
from lightning.pytorch.callbacks import ModelCheckpoint

from m6lit.cli import finish_distributed
from m6lit.module import M6LitModule
from m6lit.strategies import ExpertParallelStrategy, FSDP2Strategy


def main() -> None:
    env = os.environ
    out = Path(env["M6LIT_TEST_OUT"])
    torch.manual_seed(0)
    overrides = json.loads(env.get("M6LIT_CONFIG", "{}"))
    module = M6LitModule(tiny_config(**overrides), warmup_steps=1)
    kind = env["M6LIT_STRATEGY"]
    strategy = FSDP2Strategy(**json.loads(env.get("M6LIT_FSDP", "{}"))) if kind == "fsdp" else ExpertParallelStrategy()
    recorder = LossRecorder()
    callbacks = [recorder]
    if env.get("M6LIT_DELINK_STEP"):
        from m6lit.callbacks import PseudoToReal

        callbacks.append(PseudoToReal(delink_step=int(env["M6LIT_DELINK_STEP"])))
    if env.get("M6LIT_EXPERTS"):
        from m6lit.callbacks import ExpertSplitMerge

        callbacks.append(ExpertSplitMerge(**json.loads(env["M6LIT_EXPERTS"])))
    if env.get("M6LIT_CKPT_DIR"):
        callbacks.append(ModelCheckpoint(dirpath=env["M6LIT_CKPT_DIR"], every_n_train_steps=1, save_top_k=-1,
                                         filename="{step}"))
    trainer = L.Trainer(accelerator=env.get("M6LIT_ACCELERATOR", "cpu"), devices=2, strategy=strategy, max_steps=int(env["M6LIT_STEPS"]),
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=bool(env.get("M6LIT_CKPT_DIR")), deterministic=True,
                        use_distributed_sampler=False, callbacks=callbacks)
    trainer.fit(module, rank_loader(int(env.get("LOCAL_RANK", 0)), 2), ckpt_path=env.get("M6LIT_CKPT") or None)
    param_bytes, state_bytes = _local_bytes(module, trainer.strategy.optimizers)
    state = trainer.strategy.lightning_module_state_dict()
    if kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                      broadcast_from_rank0=False))
    torch.save({"losses": recorder.rows, "state": {k: v.detach().clone() for k, v in state.items()},
                "blocks": len(module.model.blocks), "param_bytes": param_bytes, "state_bytes": state_bytes,
                "units": _units(module)},
               out / f"rank{trainer.global_rank}.pt")


def _units(module: torch.nn.Module) -> list[list[bool]]:
    """Per block: [is an FSDP unit, has activation checkpointing]."""
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import FSDPModule

    return [[isinstance(b, FSDPModule), checkpoint.state(b) is not None] for b in module.model.blocks]


def _local_bytes(module: torch.nn.Module, optimizers: list) -> tuple[int, int]:
    """Bytes this rank holds in parameters and in optimizer-state tensors (shards only; Adam's scalar step
    excluded)."""
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    params = sum(local(p).numel() * local(p).element_size() for p in module.parameters())
    state = sum(local(v).numel() * local(v).element_size() for opt in optimizers for entry in opt.state.values()
                for v in entry.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return params, state


if __name__ == "__main__":
    try:
        main()
    finally:
        finish_distributed()
    assert_gloo_threads_joined()
