"""ImageTextDataModule: configured sources → tokenized, padded batches in the m6lit batch contract.

The training loader is a ``torchdata`` ``StatefulDataLoader``: Lightning stores its position in checkpoints, so a
mid-epoch resume continues with exactly the next batch. Map-style sources (demo, JSONL, HF) are shuffled by a
seeded sampler (Lightning swaps in its ``DistributedSampler`` under DDP); if any training source is WebDataset,
the whole mix is streamed instead and split across ranks and workers by the sources themselves. Validation, test
and predict loaders are plain, unshuffled and deterministic.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from .sources import SourceSpec, WebDatasetSource, build_source
from ..model.image_tokenizer import load_image_tokenizer
from .tasks import ExampleBuilder, ImageCodes, MapStream, MixedDataset, TaskDataset, TaskMix, TaskStream, collate
from .tokenizer import load_tokenizer

__all__ = ["DEFAULT_SOURCES", "EpochShuffleSampler", "ImageTextDataModule", "LookaheadStatefulDataLoader"]

Stage = Literal["train", "val", "test", "predict"]

#: the demo sources used for a stage whose source list is not given.
DEFAULT_SOURCES: dict[str, list[SourceSpec]] = {
    "train": [SourceSpec(kind="demo", num_samples=20000, seed=0)],
    "val": [SourceSpec(kind="demo", num_samples=256, seed=1)],
    "test": [SourceSpec(kind="demo", num_samples=256, seed=2)],
    "predict": [SourceSpec(kind="demo", num_samples=16, seed=3)],
}
_STAGE_SEED_OFFSET: dict[str, int] = {"train": 0, "val": 1, "test": 2, "predict": 3}


def _as_specs(value: list[SourceSpec] | None, stage: str) -> list[SourceSpec]:
    specs = DEFAULT_SOURCES[stage] if value is None else value
    out = [SourceSpec(**s) if isinstance(s, dict) else s for s in specs]
    if not out:
        raise ValueError(f"{stage}: the source list is empty (leave it unset for the demo data)")
    given = [s.weight is not None for s in out]
    if any(given) and not all(given):
        raise ValueError(f"{stage}: give every source a weight, or none (none = concatenation)")
    return out


@contextmanager
def _quiet_torchdata() -> Iterator[None]:
    """Silence torchdata's "'set_vital' is deprecated" warning, raised for every loader it builds on new torch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
        yield


class EpochShuffleSampler(RandomSampler):
    """Shuffling sampler whose order is a pure function of ``(seed, epoch)``, with a resumable position.

    Like ``DistributedSampler``, the epoch changes only through ``set_epoch`` (Lightning calls it before every
    epoch). Its state (epoch, indices handed out) lets ``StatefulDataLoader`` resume exactly, mid-epoch or at an
    epoch boundary (a finished epoch resumes as the start of the next). It subclasses ``RandomSampler`` so that
    Lightning sees a shuffled loader and swaps in a shuffled ``DistributedSampler`` under DDP.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0
        self.yielded = 0
        self._resume_at: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order from the next pass on."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        start, self._resume_at = self._resume_at or 0, None
        generator = torch.Generator()
        generator.manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
        order = torch.randperm(len(self.data_source), generator=generator)[start:].tolist()
        self.yielded = start
        return self._run(order)

    def _run(self, order: list[int]) -> Iterator[int]:
        for index in order:
            self.yielded += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        """Epoch and number of indices handed out in it."""
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next pass continue ``state``'s epoch after its ``yielded`` indices (or start the next epoch)."""
        epoch, yielded = int(state["epoch"]), int(state["yielded"])
        if yielded >= len(self.data_source):
            self.epoch, self._resume_at = epoch + 1, None
        else:
            self.epoch, self._resume_at = epoch, yielded


class LookaheadStatefulDataLoader(StatefulDataLoader):
    """``StatefulDataLoader`` whose ``state_dict`` trails the batches it produced by ``lookahead`` batches.

    Lightning's fit loop fetches one batch ahead from a loader without a length (``_PrefetchDataFetcher``), so
    when it saves a checkpoint the loader has produced one batch more than training consumed; saving the plain
    state would skip that batch on resume. With ``lookahead=1`` the state is the one before the latest batch
    (or the finished state once the pass is exhausted), i.e. the position after the consumed batches.
    """

    def __init__(self, *args: Any, lookahead: int = 0, **kwargs: Any) -> None:
        with _quiet_torchdata():
            super().__init__(*args, **kwargs)
        if lookahead not in (0, 1):
            raise ValueError(f"lookahead must be 0 or 1, got {lookahead}")
        self.lookahead = lookahead
        self._reported: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        if not self.lookahead:
            return iterator
        self._reported = None
        return self._track(iterator)

    def _track(self, iterator: Any) -> Iterator[Any]:
        while True:
            before = iterator.state_dict()
            try:
                batch = next(iterator)
            except StopIteration:
                self._reported = iterator.state_dict()
                return
            self._reported = before
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Position after the batches the consumer has used (see the class docstring)."""
        if self.lookahead and self._reported is not None:
            return self._reported
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from ``state_dict`` at the next ``iter()``."""
        self._reported = None
        super().load_state_dict(state_dict)


@dataclass
class _Split:
    dataset: Dataset
    iterable: bool


class ImageTextDataModule(pl.LightningDataModule):
    """Image–text data for M6 training: sources → task examples (caption / denoise / lm) → contract batches.

    Args:
        train: training sources (default: 20000 demo samples, seed 0).
        val: validation sources (default: 256 demo samples, seed 1).
        test: test sources (default: 256 demo samples, seed 2).
        predict: prediction sources (default: 16 demo samples, seed 3); batches carry the caption prompt only,
            the image, and the text as ``reference_ids``.
        tokenizer: local Hugging Face tokenizer directory; null = byte-level ByT5 (offline).
        batch_size: samples per batch (fewer when bad samples are skipped).
        num_workers: DataLoader worker processes (persistent for training).
        image_size: square side of ``pixel_values``; images are resized (shorter side) and center-cropped.
        max_text_len: token budget of prefix + target; longer samples are bad samples (unless ``truncate_text``).
        truncate_text: cut a too-long text (at a character boundary) to fit ``max_text_len`` instead of treating it
            as a bad sample.
        task_mix: relative weights of the caption, denoise and lm objectives.
        noise_density: fraction of text tokens dropped by span denoising.
        mean_span_length: mean length of a dropped span.
        on_bad_sample: ``error`` stops at the first bad sample; ``skip`` logs, counts (``num_skipped``) and drops it.
        seed: training shuffle, task choice and span corruption seed (other stages derive theirs from it).
        shuffle_buffer: WebDataset training shuffle-buffer size (samples per worker).
        image_tokenizer: folder of a trained image tokenizer (frozen): image codes join the vocabulary after the
            text ids and begin/end-of-image, and the ``generate`` task becomes available.
        caption_dropout: share of ``generate`` samples whose caption is dropped (classifier-free guidance).
    """

    def __init__(
        self,
        train: list[SourceSpec] | None = None,
        val: list[SourceSpec] | None = None,
        test: list[SourceSpec] | None = None,
        predict: list[SourceSpec] | None = None,
        tokenizer: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        image_size: int = 32,
        max_text_len: int = 224,
        truncate_text: bool = False,
        task_mix: TaskMix = TaskMix(),
        noise_density: float = 0.15,
        mean_span_length: float = 3.0,
        on_bad_sample: Literal["error", "skip"] = "error",
        seed: int = 0,
        shuffle_buffer: int = 1000,
        image_tokenizer: str | None = None,
        caption_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.specs = {
            "train": _as_specs(train, "train"),
            "val": _as_specs(val, "val"),
            "test": _as_specs(test, "test"),
            "predict": _as_specs(predict, "predict"),
        }
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.max_text_len = max_text_len
        self.truncate_text = truncate_text
        self.task_mix = TaskMix(**task_mix) if isinstance(task_mix, dict) else task_mix
        self.noise_density = noise_density
        self.mean_span_length = mean_span_length
        self.on_bad_sample = on_bad_sample
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self._tokenizer = load_tokenizer(tokenizer)
        self.caption_dropout = caption_dropout
        self.image_codes: ImageCodes | None = None
        if image_tokenizer is not None:
            vq = load_image_tokenizer(image_tokenizer, key="data.image_tokenizer")
            self.image_codes = ImageCodes(vq, len(self._tokenizer))
            vq_size = self.image_codes.grid_size * 2 ** (len(vq.config.channel_multiplier) - 1)
            if vq_size != image_size:
                raise ValueError(f"data.image_tokenizer={image_tokenizer!r} encodes {vq_size}x{vq_size} images but "
                                 f"data.image_size={image_size} (linked from model.config.image_size); set "
                                 f"model.config.image_size: {vq_size}")
        # Building one example builder now reports a bad task mix, text budget or missing sentinels at once.
        self.builder("train")
        self._splits: dict[str, _Split] = {}

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer every stage uses."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """``len(tokenizer)``: the model's embedding rows (special and sentinel tokens included), plus
        begin/end-of-image and the image codes with an image tokenizer."""
        if self.image_codes is not None:
            return self.image_codes.vocab_size
        return len(self._tokenizer)

    @property
    def image_codebook_size(self) -> int:
        """Codes of the image tokenizer (0 without one)."""
        return self.image_codes.codebook_size if self.image_codes is not None else 0

    @property
    def image_grid_size(self) -> int:
        """Side of the image tokenizer's code grid (0 without one)."""
        return self.image_codes.grid_size if self.image_codes is not None else 0

    @property
    def pad_token_id(self) -> int:
        """Id that fills ``input_ids`` padding."""
        return int(self._tokenizer.pad_token_id)

    @property
    def eos_token_id(self) -> int:
        """Id that ends every target."""
        return int(self._tokenizer.eos_token_id)

    def builder(self, stage: Stage) -> ExampleBuilder:
        """The example builder of ``stage`` (its seed is ``seed`` + a per-stage offset)."""
        return ExampleBuilder(
            self._tokenizer,
            max_text_len=self.max_text_len,
            image_size=self.image_size,
            task_mix=self.task_mix,
            noise_density=self.noise_density,
            mean_span_length=self.mean_span_length,
            seed=self.seed + _STAGE_SEED_OFFSET[stage],
            on_bad_sample=self.on_bad_sample,
            predict=stage == "predict",
            truncate_text=self.truncate_text,
            image_codes=self.image_codes,
            caption_dropout=self.caption_dropout,
        )

    def dataset(self, stage: Stage) -> Dataset:
        """The dataset of tokenized examples behind ``stage``'s loader (built on first use)."""
        return self._split(stage).dataset

    def _split(self, stage: Stage) -> _Split:
        if stage not in self._splits:
            self._splits[stage] = self._build(stage)
        return self._splits[stage]

    def _build(self, stage: Stage) -> _Split:
        specs = self.specs[stage]
        shuffle = stage == "train"
        sources = [
            build_source(
                spec,
                image_size=self.image_size,
                on_bad_sample=self.on_bad_sample,
                shuffle=shuffle,
                seed=self.seed,
                shuffle_buffer=self.shuffle_buffer,
            )
            for spec in specs
        ]
        weights = [s.weight for s in specs] if specs[0].weight is not None else None
        builder = self.builder(stage)
        if any(isinstance(s, WebDatasetSource) for s in sources):
            streams = [
                s if isinstance(s, WebDatasetSource) else MapStream(s, shuffle=shuffle, seed=self.seed + i)
                for i, s in enumerate(sources)
            ]
            return _Split(TaskStream(streams, builder, weights=weights, seed=self.seed), iterable=True)
        mixed = sources[0] if len(sources) == 1 and weights is None else MixedDataset(sources, weights, self.seed)
        return _Split(TaskDataset(mixed, builder), iterable=False)

    def setup(self, stage: str) -> None:
        """Build the datasets ``stage`` (fit, validate, test, predict) needs."""
        needed = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
        for split in needed.get(stage, []):
            self._split(split)
            self._check_shards(split)

    def _check_shards(self, stage: Stage) -> None:
        """Every rank × worker of a streamed split needs at least one WebDataset shard, or the ranks would run
        different numbers of steps and DDP would fail in a collective; say so up front."""
        split = self._splits[stage]
        world_size = self.trainer.world_size if self.trainer is not None else 1
        readers = world_size * max(self.num_workers, 1)
        if not split.iterable or readers == 1:
            return
        for spec, source in zip(self.specs[stage], split.dataset.streams):
            if isinstance(source, WebDatasetSource) and len(source.urls) < readers:
                raise ValueError(
                    f"data.{stage}: the webdataset source {spec.path!r} has {len(source.urls)} shard(s) for "
                    f"{world_size} rank(s) x {max(self.num_workers, 1)} worker(s) = {readers} readers; every reader "
                    f"needs its own shard: split the data into at least {readers} (ideally equal) shards, or lower "
                    f"data.num_workers")

    def _collate(self) -> Any:
        return partial(collate, pad_token_id=self.pad_token_id, pad_to_multiple_of=8)

    def train_dataloader(self) -> StatefulDataLoader:
        """Seeded, resumable training loader (``StatefulDataLoader``)."""
        split = self._split("train")
        common: dict[str, Any] = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "collate_fn": self._collate(),
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }
        if split.iterable:
            lookahead = 1 if self.trainer is not None else 0
            return LookaheadStatefulDataLoader(split.dataset, lookahead=lookahead, **common)
        sampler = EpochShuffleSampler(split.dataset, seed=self.seed)
        with _quiet_torchdata():
            return StatefulDataLoader(split.dataset, sampler=sampler, **common)

    def _eval_loader(self, stage: Stage) -> DataLoader:
        return DataLoader(
            self._split(stage).dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self._collate(),
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        """Deterministic validation loader."""
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        """Deterministic test loader."""
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Deterministic predict loader: caption prompt + image per row, text as ``reference_ids``."""
        return self._eval_loader("predict")
