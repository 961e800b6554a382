"""FeatureWriter: `m6lit predict` with `model.predict_task: features` writes pooled features to sharded safetensors.

The m6lit CLI adds it to every run (options `--features.*`); predictions without features (captions, images) pass
it by, and nothing is created then.

Layout of `output_dir` (one set per rank when several ranks predict, prefixed `rank<N>-`):

- `features-00000.safetensors`, ...: one tensor `features` [rows, D] each, at most `shard_size` rows;
- `index.jsonl`: one line per row, `{"shard", "row", "index", "origin", "key" | "image_path"}`, where `origin` is the
  sample's source (`file:line`, `shard:key`, `dataset[row i]`, `demo(seed=s)[i]`), `key` a WebDataset sample's
  `__key__`, `image_path` a JSONL sample's image file; a sample skipped as bad has no line.

A shard is written to a temporary name and renamed into place, and its index lines are appended after it, so the
folder is consistent after an interruption at any point. Running the same command again resumes: rows whose origin
is already in the index are not written again, and a shard file the index does not mention (an interruption between
the rename and the index) is replaced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import save_file

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class FeatureWriter(BasePredictionWriter):
    """Write `predict_step`'s `features` [B, D] with one index line per row.

    Args:
        output_dir: folder for shards and index; a relative path is taken inside the run's log directory
            (`trainer.log_dir`, or `trainer.default_root_dir` without a logger).
        shard_size: rows per shard file.
        dtype: stored dtype (float32, float16, bfloat16).
        resume: continue a folder that already holds an index (False: an existing index is an error).
    """

    def __init__(self, output_dir: str = "features", shard_size: int = 4096, dtype: str = "float32",
                 resume: bool = True) -> None:
        super().__init__(write_interval="batch")
        if shard_size < 1:
            raise ValueError(f"FeatureWriter: shard_size={shard_size} must be >= 1")
        if dtype not in _DTYPES:
            raise ValueError(f"FeatureWriter: dtype={dtype!r} must be one of {sorted(_DTYPES)}")
        self.output_dir = output_dir
        self.shard_size = shard_size
        self.dtype = _DTYPES[dtype]
        self.resume = resume
        self._dir: Optional[Path] = None
        self._prefix = ""
        self._done: set[str] = set()
        self._pending: list[torch.Tensor] = []
        self._pending_rows: list[dict[str, Any]] = []
        self._next_shard = 0
        self._indexed_shards: set[str] = set()
        self._prepared = False
        self.written = 0
        self.skipped_as_done = 0
        self.skipped_as_bad = 0

    @property
    def index_path(self) -> Path:
        assert self._dir is not None
        return self._dir / f"{self._prefix}index.jsonl"

    def _shard_name(self, number: int) -> str:
        return f"{self._prefix}features-{number:05d}.safetensors"

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = Path(self.output_dir)
        if not folder.is_absolute():
            folder = Path(trainer.log_dir or trainer.default_root_dir) / folder
        self._dir = folder
        self._prefix = f"rank{trainer.global_rank}-" if trainer.world_size > 1 else ""
        self._pending, self._pending_rows, self._done = [], [], set()
        self.written = self.skipped_as_done = self.skipped_as_bad = 0
        shards = self._read_index()
        self._indexed_shards, self._prepared = shards, False
        self._next_shard = 1 + max((int(name.rsplit("-", 1)[1].split(".")[0]) for name in shards), default=-1)
        if self._done:
            rank_zero_info(f"FeatureWriter: resuming {folder}: {len(self._done)} rows already written")

    def _read_index(self) -> set[str]:
        """Origins (into `_done`) and shard names of an existing index; a malformed line is an error naming it."""
        path = self.index_path
        if not path.exists():
            return set()
        if not self.resume:
            raise FileExistsError(f"FeatureWriter: {path} exists and resume=False; choose another output_dir")
        shards: set[str] = set()
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                try:
                    record = json.loads(line)
                    shard, origin = record["shard"], record["origin"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}:{number}: not a FeatureWriter index line ({err}); remove the folder "
                                     f"or the line to start over") from err
                if not (self._dir / shard).exists():
                    raise FileNotFoundError(f"{path}:{number}: shard {shard} is missing; the folder is incomplete")
                shards.add(shard)
                self._done.add(origin)
        return shards

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        if not isinstance(prediction, dict) or "features" not in prediction:
            return  # not features (captions or images, written by CaptionWriter / ImageWriter)
        features = prediction["features"]
        rows = features.shape[0]
        sources = batch.get("sources") or [{} for _ in range(rows)]
        indices = list(batch_indices) if batch_indices else [None] * rows
        self.skipped_as_bad += int(batch.get("num_skipped", 0))
        if len(sources) != rows:
            raise RuntimeError(f"FeatureWriter: {rows} feature rows but {len(sources)} sample sources")
        keep = []
        for row, (source, index) in enumerate(zip(sources, indices)):
            origin = source.get("origin", f"index {index}")
            if origin in self._done:
                self.skipped_as_done += 1
                continue
            self._done.add(origin)
            keep.append(row)
            self._pending_rows.append({"index": index, **source, "origin": origin})
        if keep:
            self._pending.append(features[keep].detach().to("cpu", self.dtype))
        while sum(len(p) for p in self._pending) >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, rows: int) -> None:
        """Write the first `rows` pending rows as the next shard, then their index lines."""
        assert self._dir is not None
        stacked = torch.cat(self._pending)
        chunk, rest = stacked[:rows], stacked[rows:]
        records, self._pending_rows = self._pending_rows[:rows], self._pending_rows[rows:]
        self._pending = [rest] if len(rest) else []
        if not self._prepared:  # first shard of this run: the folder, without an interrupted run's leftovers
            self._dir.mkdir(parents=True, exist_ok=True)
            strays = [*self._dir.glob(f"{self._prefix}features-*.safetensors"),
                      *self._dir.glob(f".{self._prefix}features-*.tmp")]
            for stray in strays:
                if stray.name not in self._indexed_shards:
                    stray.unlink()
            self._prepared = True
        name = self._shard_name(self._next_shard)
        tmp = self._dir / f".{name}.tmp"
        save_file({"features": chunk.contiguous()}, str(tmp))
        os.replace(tmp, self._dir / name)
        with self.index_path.open("a", encoding="utf-8") as index:
            index.write("".join(json.dumps({"shard": name, "row": i, **r}, ensure_ascii=False) + "\n"
                                for i, r in enumerate(records)))
        self._next_shard += 1
        self.written += len(records)
        rank_zero_info(f"FeatureWriter: {name} ({len(records)} rows, {self.written} this run)")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        left = sum(len(p) for p in self._pending)
        if left:
            self._flush(left)
        if not (self.written or self.skipped_as_done):
            return  # this predict run made no features
        notes = []
        if self.skipped_as_done:
            notes.append(f"{self.skipped_as_done} already in the index")
        if self.skipped_as_bad:
            notes.append(f"{self.skipped_as_bad} bad samples skipped (see the warnings)")
        rank_zero_info(f"FeatureWriter: wrote {self.written} feature rows to {self._dir}"
                       + (f" ({'; '.join(notes)})" if notes else ""))


def load_features(folder: str | os.PathLike, rank: Optional[int] = None) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Features of a FeatureWriter folder in index order, with their index records: one rank's with `rank`;
    otherwise the single-process index, or every rank's in rank order with each origin once (a distributed sampler
    pads the last batches by repeating samples)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if rank is not None:
        paths = [folder / f"rank{rank}-index.jsonl"]
    elif (folder / "index.jsonl").exists():
        paths = [folder / "index.jsonl"]
    else:
        paths = sorted(folder.glob("rank*-index.jsonl"), key=lambda p: int(p.name[4:].split("-")[0]))
    if not paths or not all(p.exists() for p in paths):
        raise FileNotFoundError(f"{folder}: no FeatureWriter index here")
    records, seen = [], set()
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                if record["origin"] not in seen:
                    seen.add(record["origin"])
                    records.append(record)
    shards: dict[str, torch.Tensor] = {}
    rows = []
    for record in records:
        if record["shard"] not in shards:
            shards[record["shard"]] = load_file(str(folder / record["shard"]))["features"]
        rows.append(shards[record["shard"]][record["row"]])
    return (torch.stack(rows) if rows else torch.empty(0)), records
