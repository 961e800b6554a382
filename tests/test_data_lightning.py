"""ImageTextDataModule under a real Lightning Trainer: checkpoints carry the loader position, so a resumed fit sees
exactly the batches an uninterrupted fit sees (mid-epoch and at an epoch boundary), and DDP sampler injection
keeps the loader stateful and shuffled."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import webdataset as wds
from PIL import Image

from m6lit.data.datamodule import ImageTextDataModule
from m6lit.data.sources import SourceSpec


class _Recorder(pl.LightningModule):
    """Records a fingerprint of every training batch; learns nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, int, tuple[int, ...]]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append((self.current_epoch, int(batch["input_ids"].sum()), tuple(batch["input_ids"].shape)))
        return (self.weight * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class _SaveAt(pl.Callback):
    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def _fit(train: list[SourceSpec], workers: int, max_steps: int, save: tuple[int, Path] | None = None,
         ckpt: Path | None = None) -> list[tuple[int, int, tuple[int, ...]]]:
    dm = ImageTextDataModule(train=train, val=[SourceSpec(num_samples=4, seed=1)], batch_size=4, image_size=16,
                             num_workers=workers)
    module = _Recorder()
    trainer = pl.Trainer(max_steps=max_steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         accelerator="cpu", callbacks=[_SaveAt(*save)] if save else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, dm, ckpt_path=ckpt)
    return module.seen


def _shards(directory: Path) -> str:
    directory.mkdir()
    for s in range(4):
        with wds.TarWriter(str(directory / f"{s:03d}.tar")) as sink:
            for i in range(6):
                sink.write({"__key__": f"k{s}_{i}", "txt": f"shard {s} sample {i}".encode(),
                            "png": Image.new("RGB", (16, 16), (40 * s, 20 * i, 9))})
    return str(directory / "{000..003}.tar")


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["map", "webdataset"])
def test_resumed_fit_sees_the_same_batches(tmp_path: Path, kind: str, workers: int) -> None:
    if kind == "map":
        train = [SourceSpec(num_samples=24)]
    else:
        train = [SourceSpec(kind="webdataset", path=_shards(tmp_path / "wds"))]
    full = _fit(train, workers, max_steps=14)
    epochs = [[s for e, s, _ in full if e == k] for k in range(2)]
    assert len(epochs[0]) == len(epochs[1]) == 6 and epochs[0] != epochs[1]
    for cut in (4, 6):
        ckpt = tmp_path / f"cut{cut}.ckpt"
        before = _fit(train, workers, max_steps=cut, save=(cut, ckpt))
        after = _fit(train, workers, max_steps=14, ckpt=ckpt)
        assert before + after == full, f"resume after step {cut} diverged"


def test_ddp_sampler_injection_keeps_a_shuffled_stateful_loader() -> None:
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _is_dataloader_shuffled, _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    dm = ImageTextDataModule(train=[SourceSpec(num_samples=24)], batch_size=4, image_size=16)
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()
    assert _is_dataloader_shuffled(loader)

    def rank_loader(rank: int) -> DataLoader:
        return _update_dataloader(loader, DistributedSampler(loader.dataset, num_replicas=2, rank=rank, seed=0))

    ranks = [rank_loader(0), rank_loader(1)]
    assert type(ranks[0]) is type(loader) and isinstance(ranks[0].batch_sampler.sampler, DistributedSampler)
    rows = [[tuple(r) for b in dl for r in b["input_ids"].tolist()] for dl in ranks]
    assert len(rows[0]) == len(rows[1]) == 12 and not set(rows[0]) & set(rows[1])
    iterator = iter(ranks[1])
    next(iterator)
    state = ranks[1].state_dict()
    expected = next(iterator)
    resumed = rank_loader(1)
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed))["input_ids"], expected["input_ids"])
