"""Sample sources: JSONL manifests, WebDataset tar shards, Hugging Face datasets, and the built-in demo set.

Every source yields the same sample form, ``{"image": PIL.Image (RGB) | None, "text": str, "origin": str}``,
where ``origin`` says where the sample came from (``file:line``, ``shard:key``, ``dataset[row i]``) so that any
later error can point at it; JSONL samples with an image also carry ``image_path``, WebDataset samples ``key``
(their ``__key__``), so predictions can be matched to their images. A bad sample raises :class:`BadSampleError` naming its origin and the reason, or, with
``on_bad_sample="skip"``, is logged (logger ``m6lit.data``, one warning per sample), counted, and replaced by
``None`` so the batch collation can count it too. Nothing is dropped silently.

Map-style sources (demo, JSONL, HF) let Lightning insert its distributed sampler; WebDataset shards are an
iterable source that splits shards across ranks and workers itself.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import webdataset as wds
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from .demo import DemoImageText

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadSampleError",
    "HFSource",
    "JsonlSource",
    "OnBadSample",
    "SourceSpec",
    "WebDatasetSource",
    "build_source",
    "check_text",
    "handle_bad_sample",
    "open_image",
    "worker_info",
]

logger = logging.getLogger("m6lit.data")

OnBadSample = Literal["error", "skip"]
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")


class BadSampleError(ValueError):
    """A sample that cannot be used; the message is ``"<origin>: <reason>"``."""

    def __init__(self, origin: str, reason: str) -> None:
        super().__init__(f"{origin}: {reason}")
        self.origin = origin
        self.reason = reason


def handle_bad_sample(error: BadSampleError, on_bad_sample: OnBadSample) -> None:
    """Raise ``error`` (``"error"``) or log one warning for it (``"skip"``); the caller counts and drops it."""
    if on_bad_sample == "error":
        raise error
    if on_bad_sample != "skip":
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    logger.warning("skipping bad sample %s", error)


def open_image(data: str | Path | bytes, origin: str) -> Image.Image:
    """Read and fully decode an image file or encoded bytes to RGB; ``BadSampleError`` if missing or corrupt."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise BadSampleError(origin, f"image file not found: {path}")
        source: Any = path
        label = str(path)
    else:
        source = io.BytesIO(data)
        label = "image bytes"
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadSampleError(origin, f"cannot decode {label}: {err}") from err


def check_text(value: Any, origin: str, field: str = "text") -> str:
    """Return ``value`` if it is a non-empty string, else raise ``BadSampleError`` saying what is wrong."""
    if value is None:
        raise BadSampleError(origin, f"missing {field!r}")
    if not isinstance(value, str):
        raise BadSampleError(origin, f"{field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadSampleError(origin, f"empty {field!r}")
    return value


def worker_info() -> tuple[int, int, int, int]:
    """``(rank, world_size, worker, num_workers)`` as WebDataset's splitters see them."""
    return wds.utils.pytorch_worker_info()


def _labels(record: Any) -> dict:
    """``{"labels": ...}`` when a sample record carries attribute labels (read by ``m6lit.data.labels``), else ``{}``."""
    labels = record.get("labels") if isinstance(record, dict) else None
    return {} if labels is None else {"labels": labels}


class JsonlSource(Dataset):
    """Map-style source over a JSONL manifest: ``{"image": "rel/path.jpg", "text": "..."}`` or ``{"text": "..."}``.

    Image paths are relative to ``image_root`` (default: the manifest's directory). Only line offsets are kept in
    memory; each line is parsed when read, so errors name ``file:line``. Blank lines are not samples and are
    ignored. ``num_skipped`` counts the bad samples skipped by this process.
    """

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None = None,
        on_bad_sample: OnBadSample = "error",
        image_key: str = "image",
        text_key: str = "text",
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"JSONL manifest not found: {self.path}")
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.on_bad_sample = on_bad_sample
        self.image_key = image_key
        self.text_key = text_key
        self.num_skipped = 0
        offsets, line_numbers = [], []
        position = 0
        with open(self.path, "rb") as f:
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(position)
                    line_numbers.append(line_number)
                position += len(line)
        if not offsets:
            raise ValueError(f"JSONL manifest {self.path} has no samples")
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._line_numbers = np.asarray(line_numbers, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def origin(self, index: int) -> str:
        """``"<manifest>:<line>"`` of sample ``index``."""
        return f"{self.path}:{int(self._line_numbers[index])}"

    def __getitem__(self, index: int) -> dict | None:
        origin = self.origin(index)
        with open(self.path, "rb") as f:
            f.seek(int(self._offsets[index]))
            raw = f.readline()
        try:
            return self._parse(raw, origin)
        except BadSampleError as err:
            handle_bad_sample(err, self.on_bad_sample)
            self.num_skipped += 1
            return None

    def _parse(self, raw: bytes, origin: str) -> dict:
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise BadSampleError(origin, f"line is not valid UTF-8: {err}") from err
        except json.JSONDecodeError as err:
            raise BadSampleError(origin, f"malformed JSON: {err}") from err
        if not isinstance(record, dict):
            raise BadSampleError(origin, f"expected a JSON object, got {type(record).__name__}")
        text = check_text(record.get(self.text_key), origin, self.text_key)
        image_path = record.get(self.image_key)
        if image_path is None:
            return {"image": None, "text": text, "origin": origin, **_labels(record)}
        if not isinstance(image_path, str) or not image_path:
            raise BadSampleError(origin, f"{self.image_key!r} must be a non-empty path string, got {image_path!r}")
        path = self.image_root / image_path
        return {"image": open_image(path, origin), "text": text, "origin": origin, "image_path": str(path),
                **_labels(record)}


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "the 'hf' data source needs the Hugging Face `datasets` package: pip install 'm6lit[data]'"
        ) from err
    return datasets


class HFSource(Dataset):
    """Map-style source over a Hugging Face dataset on local disk.

    ``builder=None`` loads ``path`` with ``datasets.load_from_disk`` (a ``DatasetDict`` is indexed by ``split``);
    otherwise ``datasets.load_dataset(builder, data_files=path, split=split)`` (e.g. ``builder="json"`` or
    ``"parquet"``). The image column may hold ``datasets.Image`` values, encoded bytes, or file paths (relative to
    ``image_root``, default the dataset's directory); ``image_column=None`` or a null cell means text-only.
    Images are decoded here, not by ``datasets``, so a corrupt one is reported as ``dataset[row i]``.
    """

    def __init__(
        self,
        path: str | Path,
        builder: str | None = None,
        split: str = "train",
        image_column: str | None = "image",
        text_column: str = "text",
        image_root: str | Path | None = None,
        on_bad_sample: OnBadSample = "error",
    ) -> None:
        datasets = _import_datasets()
        path = Path(path)
        if builder is None:
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"HF dataset {path} has no split {split!r}; it has {sorted(loaded)}")
                loaded = loaded[split]
            self.name = str(path)
        else:
            loaded = datasets.load_dataset(builder, data_files=str(path), split=split)
            self.name = f"{builder}:{path}"
        columns = loaded.column_names
        if text_column not in columns:
            raise ValueError(f"HF dataset {self.name} has no text column {text_column!r}; columns: {columns}")
        if image_column is not None and image_column not in columns:
            raise ValueError(
                f"HF dataset {self.name} has no image column {image_column!r}; columns: {columns} "
                "(set image_column to null for text-only data)"
            )
        if image_column is not None and isinstance(loaded.features[image_column], datasets.Image):
            loaded = loaded.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = loaded
        self.image_column = image_column
        self.text_column = text_column
        self.image_root = Path(image_root) if image_root is not None else (path if path.is_dir() else path.parent)
        self.on_bad_sample = on_bad_sample
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict | None:
        origin = f"{self.name}[row {index}]"
        try:
            return self._read(index, origin)
        except BadSampleError as err:
            handle_bad_sample(err, self.on_bad_sample)
            self.num_skipped += 1
            return None

    def _read(self, index: int, origin: str) -> dict:
        try:
            row = self.dataset[index]
        except (OSError, ValueError, TypeError) as err:
            raise BadSampleError(origin, f"cannot read row: {err}") from err
        text = check_text(row[self.text_column], origin, self.text_column)
        value = row[self.image_column] if self.image_column is not None else None
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if value is None:
            image = None
        elif isinstance(value, Image.Image):
            image = value.convert("RGB")
        elif isinstance(value, (bytes, bytearray)):
            image = open_image(bytes(value), origin)
        elif isinstance(value, str):
            image = open_image(self.image_root / value, origin)
        else:
            raise BadSampleError(origin, f"unsupported image value of type {type(value).__name__}")
        return {"image": image, "text": text, "origin": origin, **_labels(row)}


def _expand_shards(urls: str | Sequence[str]) -> list[str]:
    if isinstance(urls, str):
        if Path(urls).is_dir():
            shards = sorted(str(p) for p in Path(urls).glob("*.tar"))
        else:
            shards = wds.shardlists.expand_urls(urls)
    else:
        shards = [str(u) for u in urls]
    if not shards:
        raise ValueError(f"no WebDataset shards found for {urls!r}")
    missing = [s for s in shards if "://" not in s and not s.startswith("pipe:") and not Path(s).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"WebDataset shard not found: {missing[0]}{more}")
    return shards


def _buffer_shuffle(items: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    buffer: list[dict] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            k = rng.randrange(len(buffer))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class WebDatasetSource(IterableDataset):
    """Iterable source over WebDataset tar shards (image in jpg/jpeg/png/webp, text in txt or json).

    ``urls`` is a brace pattern (``data/shard-{000000..000099}.tar``), ``::``-separated list, a directory of
    ``*.tar`` files, or a list. Shards are split across ranks with ``wds.split_by_node`` and across DataLoader
    workers with ``wds.split_by_worker``; with ``shuffle``, the shard order depends on ``(seed, epoch)`` and
    samples pass through a shuffle buffer seeded by ``(seed, epoch, rank, worker)``, so a pass is reproducible.
    Errors name ``shard:key``. Give every rank the same number of samples (shard count a multiple of the world
    size, equal shard sizes), or distributed training can stall at the end of a pass.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        shuffle: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        on_bad_sample: OnBadSample = "error",
        text_key: str = "text",
    ) -> None:
        self.urls = _expand_shards(urls)
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.on_bad_sample = on_bad_sample
        self.text_key = text_key
        self.epoch = 0
        self.num_skipped = 0
        self._pending_skips = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the pass that ``iter(source)`` runs (shard order and shuffle buffer depend on it)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict | None]:
        return self.iterate(self.epoch)

    def shards(self, epoch: int = 0) -> list[str]:
        """The shards this rank and worker read in ``epoch``, in reading order."""
        order = list(self.urls)
        if self.shuffle:
            random.Random(f"m6lit-shards:{self.seed}:{epoch}").shuffle(order)
        stream = wds.split_by_worker(wds.split_by_node({"url": url} for url in order))
        return [item["url"] for item in stream]

    def iterate(self, epoch: int, skip: int = 0) -> Iterator[dict | None]:
        """Yield this rank's and worker's samples of pass ``epoch``, after dropping the first ``skip`` undecoded."""
        rank, _, worker, _ = worker_info()
        shards = self.shards(epoch)
        if not shards:
            raise ValueError(f"WebDataset {self.urls[0]}…: {len(self.urls)} shard(s) leave none for this reader (rank "
                             f"{rank}, worker {worker}); use at least as many shards as ranks x workers")
        raw: Iterator[dict] = wds.tarfile_to_samples(handler=self._on_tar_error)({"url": url} for url in shards)
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(f"m6lit-samples:{self.seed}:{epoch}:{rank}:{worker}")
            raw = _buffer_shuffle(raw, self.shuffle_buffer, rng)
        self._pending_skips = 0
        seen = 0
        for position, item in enumerate(raw):
            seen += 1
            if position < skip:
                self._pending_skips = 0
                continue
            while self._pending_skips:
                self._pending_skips -= 1
                yield None
            yield self._decode(item)
        while self._pending_skips:
            self._pending_skips -= 1
            yield None
        if seen == 0 and skip == 0 and not self.num_skipped:
            raise ValueError(f"WebDataset shards hold no samples: {', '.join(shards[:3])}"
                             f"{' …' if len(shards) > 3 else ''} (a pass over them is empty)")

    def _on_tar_error(self, exn: Exception) -> bool:
        where = next((a for a in reversed(exn.args) if isinstance(a, str)), "webdataset shard")
        if isinstance(exn, OSError) and exn.strerror:
            error = BadSampleError(str(exn.filename or where), f"cannot read shard: {exn.strerror}")
        else:
            error = BadSampleError(where, f"unreadable tar data: {exn.args[0] if exn.args else exn!r}")
        if self.on_bad_sample == "error":
            raise error from exn
        handle_bad_sample(error, self.on_bad_sample)
        self.num_skipped += 1
        self._pending_skips += 1
        return True

    def _decode(self, item: dict) -> dict | None:
        origin = f"{item.get('__url__', '?')}:{item.get('__key__', '?')}"
        try:
            return self._decode_or_raise(item, origin)
        except BadSampleError as err:
            handle_bad_sample(err, self.on_bad_sample)
            self.num_skipped += 1
            return None

    def _decode_or_raise(self, item: dict, origin: str) -> dict:
        record: dict = {}
        if "txt" in item:
            try:
                text = item["txt"].decode("utf-8")
            except UnicodeDecodeError as err:
                raise BadSampleError(origin, f"txt is not valid UTF-8: {err}") from err
        elif "json" in item:
            try:
                record = json.loads(item["json"])
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise BadSampleError(origin, f"malformed json: {err}") from err
            if not isinstance(record, dict):
                raise BadSampleError(origin, f"json must be an object, got {type(record).__name__}")
            text = record.get(self.text_key)
        else:
            raise BadSampleError(origin, "no text (expected a .txt or .json member)")
        text = check_text(text, origin)
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in item), None)
        image = open_image(item[extension], f"{origin}.{extension}") if extension else None
        return {"image": image, "text": text, "origin": origin, "key": str(item.get("__key__", "")),
                **_labels(record)}


@dataclass
class SourceSpec:
    """One data source, as written in YAML.

    Args:
        kind: ``demo`` (built-in procedural), ``jsonl`` (manifest), ``webdataset`` (tar shards), ``hf`` (datasets).
        path: manifest file, shard pattern/directory, or HF dataset directory / data files.
        image_root: directory that relative image paths start from (default: next to ``path``).
        num_samples: demo only: number of samples.
        seed: demo only: which procedural samples; webdataset: shard/sample shuffle seed offset.
        weight: share of this source when several are mixed (all set, or all unset = concatenation).
        language: demo only: caption language (``both`` picks per sample).
        text_only_fraction: demo only: fraction of samples without an image.
        max_shapes: demo only: at most this many shapes per scene (1–9).
        builder: hf only: ``datasets.load_dataset`` builder (``json``, ``parquet``…); unset = ``load_from_disk``.
        split: hf only: split to read.
        image_column: hf: image column (null = text-only); webdataset/jsonl use the ``image`` key / image members.
        text_column: hf: text column; jsonl key; webdataset json field.
    """

    kind: Literal["demo", "jsonl", "webdataset", "hf"] = "demo"
    path: str | None = None
    image_root: str | None = None
    num_samples: int = 1000
    seed: int = 0
    weight: float | None = None
    language: Literal["en", "zh", "both"] = "both"
    text_only_fraction: float = 0.0
    max_shapes: int = 3
    builder: str | None = None
    split: str = "train"
    image_column: str | None = "image"
    text_column: str = "text"


def build_source(
    spec: SourceSpec,
    image_size: int = 32,
    on_bad_sample: OnBadSample = "error",
    shuffle: bool = False,
    seed: int = 0,
    shuffle_buffer: int = 1000,
) -> Dataset:
    """Instantiate the source ``spec`` describes; ``shuffle``/``seed``/``shuffle_buffer`` apply to WebDataset."""
    if spec.kind == "demo":
        return DemoImageText(
            num_samples=spec.num_samples,
            seed=spec.seed,
            image_size=image_size,
            language=spec.language,
            text_only_fraction=spec.text_only_fraction,
            max_shapes=spec.max_shapes,
        )
    if spec.path is None:
        raise ValueError(f"a {spec.kind!r} source needs a path")
    if spec.kind == "jsonl":
        return JsonlSource(spec.path, spec.image_root, on_bad_sample, text_key=spec.text_column)
    if spec.kind == "webdataset":
        return WebDatasetSource(
            spec.path,
            shuffle=shuffle,
            seed=seed + spec.seed,
            shuffle_buffer=shuffle_buffer,
            on_bad_sample=on_bad_sample,
            text_key=spec.text_column,
        )
    if spec.kind == "hf":
        return HFSource(
            spec.path,
            builder=spec.builder,
            split=spec.split,
            image_column=spec.image_column,
            text_column=spec.text_column,
            image_root=spec.image_root,
            on_bad_sample=on_bad_sample,
        )
    raise ValueError(f"unknown source kind {spec.kind!r}; expected demo, jsonl, webdataset or hf")
