"""The exported run several export tests share: a 3-step fit with a pseudo checkpoint (2 blocks for 4 layers) after
step 1, a delink to 4 blocks after step 2 and the final checkpoint with the monitored val/loss, each exported once
per test session."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
from _fakes import ContractBatches, collate, loader, tiny_config
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from m6lit.callbacks.pseudo_to_real import PseudoToReal
from m6lit.export.command import export_checkpoint
from m6lit.module import M6LitModule

BYTE_VOCAB = 384  # the ByT5 tokenizer's size, so the exported tokenizer fits the model


class _SaveAt(Callback):
    """Saves a checkpoint right after optimizer step `step` (before that step's validation and any later delink)."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@functools.lru_cache(maxsize=None)
def exported_run(root: Path) -> dict[str, Path]:
    """Fit under `root` (once per root), export both checkpoints, and return their paths."""
    root.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0)
    module = M6LitModule(tiny_config(vocab_size=BYTE_VOCAB, num_unique_blocks=2), warmup_steps=0)
    trainer = L.Trainer(
        max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        accelerator="cpu", devices=1, val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=0,
        callbacks=[_SaveAt(1, root / "pseudo.ckpt"), PseudoToReal(delink_step=2),
                   ModelCheckpoint(dirpath=root, monitor="val/loss", save_top_k=1, filename="real")])
    trainer.fit(module, loader(size=16), loader(size=4))
    exports = root / "exports"
    paths = {"root": root, "pseudo_ckpt": root / "pseudo.ckpt", "real_ckpt": root / "real.ckpt"}
    for kind in ("pseudo", "real"):
        paths[kind] = export_checkpoint(paths[f"{kind}_ckpt"], exports / kind)
    return paths


def sample_batch(images: bool) -> dict:
    rows = collate([ContractBatches(seed=7)[i] for i in range(3)])
    rows["attention_mask"][1, 9:] = False  # one right-padded row
    rows["input_ids"][1, 9:] = 0
    if not images:
        rows.pop("pixel_values")
    return rows


def block_bytes(folder: Path) -> tuple[int, int]:
    """(bytes of the physical blocks, bytes of everything) in an export's safetensors files."""
    blocks = total = 0
    for file in folder.glob("*.safetensors"):
        for key, tensor in load_file(file).items():
            size = tensor.numel() * tensor.element_size()
            total += size
            blocks += size if key.startswith("model.blocks.") else 0
    return blocks, total
