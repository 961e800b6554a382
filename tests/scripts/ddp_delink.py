"""Two-process gloo DDP run with a mid-fit delink; each rank saves parameter checksums (run by the test suite)."""

import os
from pathlib import Path

import lightning as L
import torch
from _dist import assert_gloo_threads_joined
from _fakes import loader, tiny_config

from m6lit.cli import finish_distributed
from m6lit.callbacks import PseudoToReal
from m6lit.module import M6LitModule


def checksum(module: M6LitModule) -> list[float]:
    return [float(p.detach().double().sum()) for p in module.model.parameters()]


class Probe(L.Callback):
    def __init__(self) -> None:
        self.after_delink = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            self.after_delink = checksum(pl_module)


def main() -> None:
    torch.manual_seed(0)
    module = M6LitModule(tiny_config(num_unique_blocks=2), warmup_steps=1)
    probe = Probe()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[PseudoToReal(delink_step=2, optimizer_state="rescale"), probe])
    trainer.fit(module, loader(size=32))
    out = Path(os.environ["M6LIT_TEST_OUT"])
    torch.save({"after_delink": probe.after_delink, "final": checksum(module), "blocks": len(module.model.blocks)},
               out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    try:
        main()
    finally:
        finish_distributed()
    assert_gloo_threads_joined()
