"""M6 training objectives and batch collation: samples → tokenized examples → the batch contract.

Each sample gets one task, chosen from ``(seed, key)`` alone (``key`` is the dataset index, or a hash of the
sample's origin for streamed sources), so a sample always gets the same task and the same corruption:

- ``caption`` (image samples only): prefix = ``"caption:"``, target = caption + EOS.
- ``denoise``: T5 span corruption. Prefix = ``"denoise:"`` + the text with spans replaced by sentinels, target =
  each sentinel followed by the span it replaced, then EOS. An image sample keeps its image (image + masked text
  → text, one of M6's objectives).
- ``lm``: prefix = ``"text:"``, target = text + EOS. The image is dropped, so this is plain language modelling.
- ``generate`` (image samples, with an image tokenizer): prefix = ``"image:"`` + caption (the caption dropped with
  probability ``caption_dropout``, for classifier-free guidance), target = begin-of-image + the image's codes (as
  vocabulary ids) + end-of-image. The pixels are not an input.

Text-only samples never get ``caption``. Prefix plus target must fit ``max_text_len`` tokens; a longer sample is
a bad sample (error, or skip with a warning). :func:`collate` pads examples into the batch contract of
``DESIGN.md``: ``input_ids``, ``attention_mask``, ``labels`` (aligned with ``input_ids``, −100 on prefix and
padding), ``prefix_len``, ``pixel_values`` + ``image_mask`` (only if some row has an image), ``num_skipped``, and
for prediction ``reference_ids`` and ``sources`` (per row: ``origin``, plus ``key`` / ``image_path`` when known).
"""

from __future__ import annotations

import bisect
import math
import random
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset
from transformers import ByT5Tokenizer, PreTrainedTokenizerBase

from ..model.processing import image_to_tensor as _image_to_tensor
from ..model.image_generation import CAPTION_PROMPT, GENERATE_PROMPT
from ..model.image_vocab import ImageVocab
from .sources import BadSampleError, OnBadSample, handle_bad_sample, worker_info
from .tokenizer import sentinel_ids

__all__ = [
    "PROMPTS",
    "TASKS",
    "ExampleBuilder",
    "ImageCodes",
    "MapStream",
    "MixedDataset",
    "TaskDataset",
    "TaskMix",
    "TaskStream",
    "collate",
    "image_to_tensor",
    "span_corrupt",
]

TASKS: tuple[str, ...] = ("caption", "denoise", "lm", "generate")
#: sample fields that say where a sample came from; prediction batches carry them per row (``sources``).
SOURCE_FIELDS: tuple[str, ...] = ("origin", "key", "image_path")
#: task prompt texts; each is the start of the prefix (≥ 1 token with any tokenizer).
PROMPTS: dict[str, str] = {"caption": CAPTION_PROMPT, "denoise": "denoise:", "lm": "text:",
                           "generate": GENERATE_PROMPT}


@dataclass
class TaskMix:
    """Relative weights of the objectives (need not sum to 1); text-only samples use denoise and lm only."""

    caption: float = 0.5
    denoise: float = 0.25
    lm: float = 0.25
    generate: float = 0.0

    def validate(self) -> None:
        """Raise ``ValueError`` unless all weights are ≥ 0 and at least one is > 0."""
        weights = [self.caption, self.denoise, self.lm, self.generate]
        if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
            raise ValueError(f"task_mix weights must be finite, >= 0 and not all 0, got {self}")


def image_to_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """RGB, resize the shorter side to ``image_size``, center-crop, scale to [−1, 1]: float32 ``[3, S, S]``
    (implemented in ``m6lit.model.processing``, which the exported image processor runs too)."""
    return _image_to_tensor(image, image_size)


def _split_lengths(total: int, parts: int, rng: random.Random) -> list[int]:
    """``total`` split into ``parts`` positive lengths, uniformly at random."""
    cuts = sorted(rng.sample(range(1, total), parts - 1)) if parts > 1 else []
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def span_corrupt(
    ids: Sequence[int] | Sequence[Sequence[int]],
    sentinels: Sequence[int],
    rng: random.Random,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
) -> tuple[list[int], list[int]]:
    """T5 span corruption of ``ids`` → (inputs with sentinels, targets of sentinel + dropped span pairs).

    About ``noise_density`` of the tokens are dropped, in spans of mean length ``mean_span_length``; kept and
    dropped spans alternate starting with a kept one (unless everything is dropped). Substituting each sentinel
    in the inputs by the tokens that follow it in the targets gives back ``ids``. ``ids`` may instead be a list of
    units (lists of ids, e.g. the bytes of one character): spans then start and end at unit boundaries only.
    """
    units = [list(u) if isinstance(u, (list, tuple)) else [u] for u in ids]
    length = len(units)
    if length == 0:
        raise ValueError("cannot corrupt an empty sequence")
    num_noise = min(max(round(length * noise_density), 1), max(length - 1, 1))
    num_keep = length - num_noise
    num_spans = max(round(num_noise / mean_span_length), 1)
    num_spans = min(num_spans, num_noise, max(num_keep, 1), len(sentinels))
    noise_lengths = _split_lengths(num_noise, num_spans, rng)
    keep_lengths = _split_lengths(num_keep, num_spans, rng) if num_keep else [0]
    inputs: list[int] = []
    targets: list[int] = []
    position = 0
    for span, (keep, noise) in enumerate(zip(keep_lengths, noise_lengths)):
        inputs.extend(i for unit in units[position : position + keep] for i in unit)
        position += keep
        inputs.append(sentinels[span])
        targets.append(sentinels[span])
        targets.extend(i for unit in units[position : position + noise] for i in unit)
        position += noise
    return inputs, targets


class ImageCodes:
    """Pixels → the ``generate`` target: begin-of-image, the frozen image tokenizer's codes as vocabulary ids,
    end-of-image, in the id layout of :class:`m6lit.model.image_vocab.ImageVocab`. ``tokenizer`` is a transformers
    ``JanusVQVAE`` (see ``m6lit.model.image_tokenizer``)."""

    def __init__(self, tokenizer: Any, text_vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab = ImageVocab(text_vocab_size, int(tokenizer.config.num_embeddings),
                                int(tokenizer.config.num_patches))

    @property
    def text_vocab_size(self) -> int:
        return self.vocab.text_vocab_size

    @property
    def codebook_size(self) -> int:
        return self.vocab.codebook_size

    @property
    def grid_size(self) -> int:
        return self.vocab.grid_size

    @property
    def vocab_size(self) -> int:
        """Text ids + begin/end-of-image + codes."""
        return self.vocab.vocab_size

    def target(self, pixel_values: torch.Tensor) -> list[int]:
        """``[BOI, codes + offset..., EOI]`` of one image ``[3, S, S]``."""
        with torch.no_grad():
            codes = self.tokenizer.encode(pixel_values.unsqueeze(0)).image_tokens.view(-1)
        return [self.vocab.boi, *(codes + self.vocab.code_offset).tolist(), self.vocab.eoi]


class ExampleBuilder:
    """Turns a sample ``{"image", "text", "origin"}`` into a tokenized example for :func:`collate`.

    An example is ``{"prefix": LongTensor, "target": LongTensor, "pixel_values": FloatTensor | None,
    "task": str, "reference": LongTensor | None}``. With ``predict=True`` every sample gets the caption prompt as
    its whole prefix, an empty target, and its text (+ EOS) as ``reference``. With ``truncate_text`` a text
    too long for ``max_text_len`` is cut (at a character boundary) to fit instead of being a bad sample.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_text_len: int = 224,
        image_size: int = 32,
        task_mix: TaskMix | None = None,
        noise_density: float = 0.15,
        mean_span_length: float = 3.0,
        seed: int = 0,
        on_bad_sample: OnBadSample = "error",
        predict: bool = False,
        truncate_text: bool = False,
        image_codes: ImageCodes | None = None,
        caption_dropout: float = 0.1,
    ) -> None:
        self.truncate_text = truncate_text
        self.task_mix = task_mix if task_mix is not None else TaskMix()
        self.task_mix.validate()
        if self.task_mix.generate > 0 and image_codes is None:
            raise ValueError("task_mix.generate > 0 needs an image tokenizer (data.image_tokenizer: <folder>)")
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        self.image_codes = image_codes
        self.caption_dropout = caption_dropout
        if not 0.0 < noise_density < 1.0:
            raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
        if mean_span_length < 1.0:
            raise ValueError(f"mean_span_length must be >= 1, got {mean_span_length}")
        self.tokenizer = tokenizer
        self.eos = int(tokenizer.eos_token_id)
        self.prompts = {task: self.encode(prompt) for task, prompt in PROMPTS.items()}
        shortest = 2 + max(len(p) for p in self.prompts.values())
        if max_text_len < shortest:
            raise ValueError(f"max_text_len must be >= {shortest} (longest prompt + 1 text token + EOS)")
        self.sentinels = sentinel_ids(tokenizer) if self.task_mix.denoise > 0 and not predict else []
        self.max_text_len = max_text_len
        self.image_size = image_size
        self.noise_density = noise_density
        self.mean_span_length = mean_span_length
        self.seed = seed
        self.on_bad_sample = on_bad_sample
        self.predict = predict

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def units(self, text: str, text_ids: list[int]) -> list[list[int]]:
        """``text_ids`` grouped per character for a byte-level tokenizer (ByT5: one id per UTF-8 byte, so a Chinese
        character is 3 ids), else one token per unit; spans and truncation never split a unit."""
        if isinstance(self.tokenizer, ByT5Tokenizer) and len(text_ids) == len(text.encode("utf-8")):
            units, position = [], 0
            for ch in text:
                width = len(ch.encode("utf-8"))
                units.append(text_ids[position : position + width])
                position += width
            return units
        return [[i] for i in text_ids]

    def choose_task(self, has_image: bool, key: int) -> str:
        """The task of the sample with ``key``: a pure function of ``(seed, key, has_image)``."""
        mix = self.task_mix
        weights = [mix.caption if has_image else 0.0, mix.denoise, mix.lm, mix.generate if has_image else 0.0]
        if sum(weights) <= 0:
            raise ValueError("a text-only sample needs the denoise or lm task, but task_mix gives both weight 0")
        return random.Random(f"m6lit-task:{self.seed}:{key}").choices(TASKS, weights=weights)[0]

    def __call__(self, sample: dict | None, key: int) -> dict | None:
        """The example of ``sample`` (``None`` in, ``None`` out); a too-long text is a bad sample."""
        if sample is None:
            return None
        try:
            return self.build(sample, key)
        except BadSampleError as err:
            handle_bad_sample(err, self.on_bad_sample)
            return None

    def build(self, sample: dict, key: int) -> dict:
        """Like calling the builder, but always raises ``BadSampleError`` for a bad sample."""
        origin = str(sample.get("origin", f"sample {key}"))
        text_ids = self.encode(sample["text"])
        if not text_ids:
            raise BadSampleError(origin, "text is empty after tokenization")
        units = self.units(sample["text"], text_ids)
        while True:
            prefix, target, task, image = self._layout(units, sample.get("image"), key)
            excess = len(prefix) + len(target) - self.max_text_len
            if excess <= 0 or not self.truncate_text or self.predict or len(units) <= 1:
                break
            while excess > 0 and len(units) > 1:  # drop whole characters from the end until it fits
                excess -= len(units.pop())
        total = len(prefix) + len(target)
        if total > self.max_text_len:
            raise BadSampleError(
                origin,
                f"text too long: {len(text_ids)} tokens, {total} with the {task} prompt and EOS "
                f"> max_text_len {self.max_text_len} (data.truncate_text: true cuts it instead)",
            )
        return {
            "prefix": torch.tensor(prefix, dtype=torch.long),
            "target": torch.tensor(target, dtype=torch.long),
            "pixel_values": image_to_tensor(image, self.image_size) if image is not None else None,
            "task": task,
            "reference": torch.tensor(text_ids + [self.eos], dtype=torch.long) if self.predict else None,
            **({"source": {k: str(sample[k]) for k in SOURCE_FIELDS if sample.get(k) is not None}}
               if self.predict else {}),
        }

    def _layout(self, units: list[list[int]], image: Any, key: int) -> tuple[list[int], list[int], str, Any]:
        """``(prefix, target, task, image)`` of a text given as units, under the sample's task."""
        text_ids = [i for unit in units for i in unit]
        if self.predict:
            return self.prompts["caption"], [], "caption", image
        task = self.choose_task(image is not None, key)
        if task == "denoise":
            rng = random.Random(f"m6lit-noise:{self.seed}:{key}")
            inputs, spans = span_corrupt(units, self.sentinels, rng, self.noise_density, self.mean_span_length)
            return self.prompts["denoise"] + inputs, spans + [self.eos], task, image
        if task == "generate":
            assert self.image_codes is not None  # the constructor checked it
            drop = random.Random(f"m6lit-cfg:{self.seed}:{key}").random() < self.caption_dropout
            prefix = self.prompts["generate"] + ([] if drop else text_ids)
            return prefix, self.image_codes.target(image_to_tensor(image, self.image_size)), task, None
        return self.prompts[task], text_ids + [self.eos], task, (None if task == "lm" else image)


def collate(examples: Sequence[dict | None], pad_token_id: int, pad_to_multiple_of: int = 8) -> dict[str, Any]:
    """Pad tokenized examples into the batch contract; ``None`` entries are skipped samples, counted.

    ``T`` is the longest prefix+target rounded up to ``pad_to_multiple_of``. If every example was skipped the
    batch has zero rows (``input_ids`` of shape ``[0, 0]``) and only ``num_skipped`` says why.
    """
    rows = [e for e in examples if e is not None]
    num_skipped = len(examples) - len(rows)
    lengths = [len(e["prefix"]) + len(e["target"]) for e in rows]
    longest = max(lengths, default=0)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    batch_size = len(rows)
    input_ids = torch.full((batch_size, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.bool)
    labels = torch.full((batch_size, width), -100, dtype=torch.long)
    prefix_len = torch.zeros(batch_size, dtype=torch.long)
    for row, (example, length) in enumerate(zip(rows, lengths)):
        start = len(example["prefix"])
        input_ids[row, :start] = example["prefix"]
        input_ids[row, start:length] = example["target"]
        labels[row, start:length] = example["target"]
        attention_mask[row, :length] = True
        prefix_len[row] = start
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "prefix_len": prefix_len,
        "task_ids": torch.tensor([TASKS.index(e["task"]) for e in rows], dtype=torch.long),
    }
    images = [e["pixel_values"] for e in rows]
    first = next((im for im in images if im is not None), None)
    if first is not None:
        pixel_values = torch.zeros((batch_size, *first.shape), dtype=torch.float32)
        image_mask = torch.zeros(batch_size, dtype=torch.bool)
        for row, image in enumerate(images):
            if image is not None:
                pixel_values[row] = image
                image_mask[row] = True
        batch["pixel_values"] = pixel_values
        batch["image_mask"] = image_mask
    references = [e.get("reference") for e in rows]
    if any(r is not None for r in references):
        ref_width = max(len(r) for r in references if r is not None)
        reference_ids = torch.full((batch_size, ref_width), pad_token_id, dtype=torch.long)
        for row, reference in enumerate(references):
            if reference is not None:
                reference_ids[row, : len(reference)] = reference
        batch["reference_ids"] = reference_ids
    if any("source" in e for e in rows):
        batch["sources"] = [e.get("source", {}) for e in rows]
    batch["num_skipped"] = torch.tensor(num_skipped, dtype=torch.long)
    return batch


class MixedDataset(Dataset):
    """Map-style mix of map-style sources.

    Without weights it is their concatenation. With weights (one per source) it has the same total length, and
    source ``i`` fills a share ``weight_i / sum(weights)`` of the positions (largest-remainder rounding), cycling
    through a seeded permutation of its items, so small sources are repeated and large ones subsampled. Shuffling
    is left to the sampler.
    """

    def __init__(self, sources: Sequence[Dataset], weights: Sequence[float] | None = None, seed: int = 0) -> None:
        if not sources:
            raise ValueError("MixedDataset needs at least one source")
        self.sources = list(sources)
        sizes = [len(s) for s in self.sources]
        if weights is None:
            self._offsets = np.cumsum([0, *sizes])
            self._source_of = None
            return
        if len(weights) != len(self.sources):
            raise ValueError(f"got {len(weights)} weights for {len(self.sources)} sources")
        if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
            raise ValueError(f"source weights must be finite, >= 0 and not all 0, got {list(weights)}")
        total = sum(sizes)
        quotas = [total * w / sum(weights) for w in weights]
        counts = [math.floor(q) for q in quotas]
        by_remainder = sorted(range(len(quotas)), key=lambda i: counts[i] - quotas[i])
        for i in by_remainder[: total - sum(counts)]:
            counts[i] += 1
        source_of, local = [], []
        for i, (count, size) in enumerate(zip(counts, sizes)):
            if count == 0:
                continue
            perm = np.random.default_rng([abs(seed), i]).permutation(size)
            source_of.append(np.full(count, i, dtype=np.int64))
            local.append(np.resize(perm, count))
        self._source_of = np.concatenate(source_of)
        self._local = np.concatenate(local)

    def __len__(self) -> int:
        return int(self._offsets[-1]) if self._source_of is None else len(self._source_of)

    def locate(self, index: int) -> tuple[int, int]:
        """``(source number, index within that source)`` of position ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range [0, {len(self)})")
        if self._source_of is None:
            source = bisect.bisect_right(self._offsets, index) - 1
            return source, index - int(self._offsets[source])
        return int(self._source_of[index]), int(self._local[index])

    def __getitem__(self, index: int) -> dict | None:
        source, local = self.locate(index)
        return self.sources[source][local]


class TaskDataset(Dataset):
    """Map-style dataset of tokenized examples: ``builder(source[i], key=i)``; ``None`` for skipped samples."""

    def __init__(self, source: Dataset, builder: ExampleBuilder) -> None:
        self.source = source
        self.builder = builder

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict | None:
        return self.builder(self.source[index], key=index)


class SampleStream(Protocol):
    """An iterable source that can replay pass ``epoch`` from any position (for exact resume)."""

    def iterate(self, epoch: int, skip: int = 0) -> Iterator[dict | None]: ...


class MapStream:
    """A map-style source read as a stream: seeded permutation per pass (if ``shuffle``), split by rank/worker."""

    def __init__(self, source: Dataset, shuffle: bool = False, seed: int = 0) -> None:
        self.source = source
        self.shuffle = shuffle
        self.seed = seed

    def iterate(self, epoch: int, skip: int = 0) -> Iterator[dict | None]:
        """Yield this rank's and worker's share of pass ``epoch``, starting after ``skip`` items."""
        rank, world_size, worker, num_workers = worker_info()
        size = len(self.source)
        order = np.random.default_rng([abs(self.seed), epoch]).permutation(size) if self.shuffle else np.arange(size)
        mine = order[rank * num_workers + worker :: world_size * num_workers]
        for index in mine[skip:]:
            yield self.source[int(index)]


class TaskStream(IterableDataset):
    """Iterable dataset of tokenized examples mixed from several streams, resumable mid-pass.

    Each output picks a stream by ``weights`` (equal if ``None``) with a choice that depends only on
    ``(seed, epoch, rank, worker, position)``; the pass ends when a picked stream runs out. Each ``iter()`` starts
    the next pass (epoch 0, 1, …) unless :meth:`load_state_dict` was called, in which case it continues the saved
    pass at the saved position. The state is per DataLoader worker (``StatefulDataLoader`` keeps one per worker),
    so resume with the same number of workers and ranks; keep workers persistent so the pass count survives.
    The task key of a sample is a hash of its origin.
    """

    def __init__(
        self,
        streams: Sequence[SampleStream],
        builder: ExampleBuilder,
        weights: Sequence[float] | None = None,
        seed: int = 0,
    ) -> None:
        if not streams:
            raise ValueError("TaskStream needs at least one stream")
        weights = [1.0] * len(streams) if weights is None else list(weights)
        if len(weights) != len(streams) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"need one weight >= 0 per stream, not all 0; got {weights} for {len(streams)}")
        self.streams = list(streams)
        self.builder = builder
        self.weights = weights
        self.seed = seed
        self.epoch = -1
        self.position = 0
        self.consumed = [0] * len(self.streams)
        self._resume = False

    def state_dict(self) -> dict[str, Any]:
        """Pass number and position within it (for this worker)."""
        return {"epoch": self.epoch, "position": self.position, "consumed": list(self.consumed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next ``iter()`` continue the saved pass at the saved position."""
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.consumed = [int(c) for c in state["consumed"]]
        self._resume = True

    def __iter__(self) -> Iterator[dict | None]:
        if self._resume:
            self._resume = False
        else:
            self.epoch += 1
            self.position = 0
            self.consumed = [0] * len(self.streams)
        return self._run(self.epoch, self.position, list(self.consumed))

    def _run(self, epoch: int, position: int, consumed: list[int]) -> Iterator[dict | None]:
        rank, _, worker, _ = worker_info()
        iterators = [s.iterate(epoch, skip) for s, skip in zip(self.streams, consumed)]
        choices = range(len(self.streams))
        while True:
            rng = random.Random(f"m6lit-mix:{self.seed}:{epoch}:{rank}:{worker}:{position}")
            pick = rng.choices(choices, weights=self.weights)[0] if len(self.streams) > 1 else 0
            try:
                sample = next(iterators[pick])
            except StopIteration:
                return
            position += 1
            self.position = position
            self.consumed[pick] += 1
            key = zlib.crc32(str(sample.get("origin", position)).encode()) if sample is not None else 0
            yield self.builder(sample, key=key)
