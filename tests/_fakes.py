"""Small deterministic stand-ins shared by the training tests: a tiny model config and contract batches."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from m6lit.model import M6Config

VOCAB = 64


def tiny_config(**overrides) -> M6Config:
    """4 logical layers, MoE on every other layer, 16x16 images in 4 patches."""
    base = dict(vocab_size=VOCAB, d_model=32, n_heads=4, d_ff=64, num_layers=4, num_unique_blocks=4,
                sharing_layout="cycle", moe_layers=2, num_experts=4, top_k=2, image_size=16, patch_size=8,
                max_seq_len=48, pad_token_id=0, eos_token_id=1)
    base.update(overrides)
    return M6Config(**base)


class ContractBatches(Dataset):
    """Deterministic image+text samples in the batch contract; the target copies the image's 'colour' token so
    the task is learnable."""

    def __init__(self, size: int = 64, seq: int = 12, image_size: int = 16, seed: int = 0) -> None:
        self.size, self.seq, self.image_size, self.seed = size, seq, image_size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        colour = int(torch.randint(0, 4, (1,), generator=g))
        pixels = torch.full((3, self.image_size, self.image_size), -1.0)
        pixels[colour % 3] = 1.0
        prefix = int(torch.randint(1, 4, (1,), generator=g))
        ids = torch.randint(2, VOCAB, (self.seq,), generator=g)
        ids[prefix:] = (ids[prefix:] % 8) + 8 * colour + 2
        labels = ids.clone()
        labels[:prefix] = -100
        return {"input_ids": ids, "attention_mask": torch.ones(self.seq, dtype=torch.bool), "labels": labels,
                "prefix_len": torch.tensor(prefix), "pixel_values": pixels}


def collate(rows: list[dict]) -> dict:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def loader(size: int = 64, batch_size: int = 4, seed: int = 0) -> StatefulDataLoader:
    """Resumable loader (Lightning saves its position), so a mid-epoch resume continues with the next batch."""
    return StatefulDataLoader(ContractBatches(size, seed=seed), batch_size=batch_size, shuffle=False,
                              collate_fn=collate)


class LossRecorder:
    """Records (global_step, loss) after every training batch; optionally stops the run after step `stop`."""

    def __new__(cls, *args, **kwargs):
        import lightning as L

        class _Recorder(L.Callback):
            def __init__(self, stop: int | None = None) -> None:
                self.rows: list[tuple[int, float]] = []
                self.stop = stop

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                self.rows.append((trainer.global_step, float(outputs["loss"])))
                if self.stop is not None and trainer.global_step >= self.stop:
                    trainer.should_stop = True

        return _Recorder(*args, **kwargs)


def fit(module, max_steps: int, callbacks=(), ckpt_path=None, stop=None, dirpath=None, data_size: int = 64,
        **trainer_kwargs):
    """Deterministic CPU fit with a checkpoint after every step (when `dirpath`); returns (trainer, recorder)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    recorder = LossRecorder(stop)
    cbs = [recorder, *callbacks]
    if dirpath is not None:
        cbs.append(ModelCheckpoint(dirpath=dirpath, every_n_train_steps=1, save_last=True, save_top_k=-1,
                                   filename="{step}"))
    trainer = L.Trainer(max_steps=max_steps, callbacks=cbs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=dirpath is not None, deterministic=True,
                        accelerator="cpu", devices=1, **trainer_kwargs)
    trainer.fit(module, loader(size=data_size), ckpt_path=ckpt_path)
    return trainer, recorder
