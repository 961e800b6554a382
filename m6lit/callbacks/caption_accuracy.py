"""CaptionAccuracy: does the model describe the demo images? Per-attribute accuracy of greedy captions.

At each validation it captions the first scenes of the validation data's demo sources (image + caption prompt,
greedy decoding), reads the attributes back with :func:`m6lit.data.demo.parse_caption` and compares them with the
scene each image was drawn from (:func:`m6lit.data.demo.score_caption`). The scenes come from the demo sources
themselves (a scene is a pure function of its source's seed and index), so nothing extra travels in the batches.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from m6lit.data.demo import CAPTION_ATTRIBUTES, DemoImageText, DemoScene, score_caption
from m6lit.data.tasks import MixedDataset, TaskDataset, collate

GROUP_ALL = "all"


def demo_sources(dataset: Any) -> list[DemoImageText]:
    """The demo sources behind a data module split (a ``TaskDataset`` over one source or a ``MixedDataset``)."""
    source = dataset.source if isinstance(dataset, TaskDataset) else dataset
    sources = source.sources if isinstance(source, MixedDataset) else [source]
    return [s for s in sources if isinstance(s, DemoImageText)]


def accuracy_table(scores: list[tuple[DemoScene, dict[str, tuple[int, int]]]]) -> dict[str, dict[str, float]]:
    """``{group: {attribute: accuracy}}`` over scored scenes; groups are ``all`` and ``<n>shape`` per shape count
    (attributes pooled over shapes: correct ÷ checked), plus ``exact``: the share of scenes with nothing wrong."""
    groups: dict[str, list[dict[str, tuple[int, int]]]] = {GROUP_ALL: []}
    for scene, score in scores:
        groups[GROUP_ALL].append(score)
        groups.setdefault(f"{len(scene.shapes)}shape", []).append(score)
    table: dict[str, dict[str, float]] = {}
    for group in sorted(groups, key=lambda g: (g != GROUP_ALL, g)):
        rows = groups[group]
        table[group] = {a: sum(r[a][0] for r in rows) / max(1, sum(r[a][1] for r in rows))
                        for a in CAPTION_ATTRIBUTES}
        table[group]["exact"] = sum(all(c == n for c, n in r.values()) for r in rows) / max(1, len(rows))
    return table


def format_table(table: dict[str, dict[str, float]], counts: dict[str, int]) -> str:
    """A plain-text table: one row per attribute, one column per scene group (with its number of scenes)."""
    groups = list(table)
    heads = [f"{g} ({counts.get(g, 0)})" for g in groups]
    width = max(len(h) for h in heads) + 2
    lines = ["attribute ".ljust(12) + "".join(h.rjust(width) for h in heads)]
    for attribute in next(iter(table.values())):
        lines.append(attribute.ljust(12) + "".join(f"{table[g][attribute]:.3f}".rjust(width) for g in groups))
    return "\n".join(lines)


class CaptionAccuracy(Callback):
    """Log ``val/caption/<group>/<attribute>`` accuracies of greedy captions of the demo validation scenes, and
    print them as a table when fitting (or validating) ends.

    Groups: ``all`` and ``1shape``, ``2shape``, … by the scene's number of shapes. Attributes: background, count
    (number of shapes named), kind, color, size, position, and exact (the whole caption right). Every rank scores
    the same scenes (identical results, no collective); text-only scenes are left out.

    Args:
        num_samples: scenes to caption, taken in order from the validation demo sources (first source first).
        max_new_tokens: generation length (default: long enough for the longest reference caption among them).
        batch_size: prompts per ``generate`` call.
        every_n_validations: score at every n-th validation run.
    """

    def __init__(self, num_samples: int = 128, max_new_tokens: Optional[int] = None, batch_size: int = 64,
                 every_n_validations: int = 1) -> None:
        if num_samples < 1 or batch_size < 1 or every_n_validations < 1:
            raise ValueError("CaptionAccuracy: num_samples, batch_size and every_n_validations must be >= 1")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"CaptionAccuracy: max_new_tokens={max_new_tokens} must be >= 1")
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.every_n_validations = every_n_validations
        self._runs = 0
        self.last_table: dict[str, dict[str, float]] = {}
        self.last_counts: dict[str, int] = {}
        self.last_step: Optional[int] = None

    def _scenes(self, trainer: Trainer) -> tuple[list[DemoScene], list[dict]]:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "dataset"):
            raise ValueError("CaptionAccuracy needs m6lit's ImageTextDataModule (data:) with demo validation data")
        sources = demo_sources(datamodule.dataset("val"))
        if not sources:
            raise ValueError("CaptionAccuracy: data.val has no demo source (kind: demo); the metric compares "
                             "captions with the scenes the demo generator drew")
        scenes, samples = [], []
        for source in sources:
            for index in range(len(source)):
                if len(scenes) == self.num_samples:
                    return scenes, samples
                scene = source.scene(index)
                if not scene.text_only:
                    scenes.append(scene)
                    samples.append(source[index])
        return scenes, samples

    def score(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, dict[str, float]]:
        """Caption the scenes greedily and return (and keep as ``last_table``) the accuracy table."""
        scenes, samples = self._scenes(trainer)
        datamodule = trainer.datamodule
        builder = datamodule.builder("predict")
        examples = [builder.build(sample, key=i) for i, sample in enumerate(samples)]
        config = pl_module.model.config
        room = config.max_seq_len - config.num_patches - max(len(e["prefix"]) for e in examples)
        longest = max(len(e["reference"]) for e in examples)
        max_new_tokens = min(room, self.max_new_tokens or longest + 8)
        tokenizer = datamodule.tokenizer
        scores = []
        for start in range(0, len(examples), self.batch_size):
            chunk = examples[start:start + self.batch_size]
            batch = collate(chunk, pad_token_id=datamodule.pad_token_id)
            batch = {k: v.to(pl_module.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            with torch.no_grad():
                tokens = pl_module.generate(batch, max_new_tokens=max_new_tokens, do_sample=False)
            texts = tokenizer.batch_decode(tokens.clamp(min=0).tolist(), skip_special_tokens=True)
            scores.extend((scene, score_caption(scene, text)) for scene, text in zip(scenes[start:], texts))
        self.last_table = accuracy_table(scores)
        self.last_counts = {GROUP_ALL: len(scores)}
        for scene, _ in scores:
            key = f"{len(scene.shapes)}shape"
            self.last_counts[key] = self.last_counts.get(key, 0) + 1
        self.last_step = trainer.global_step
        return self.last_table

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._runs += 1
        if (self._runs - 1) % self.every_n_validations:
            return
        table = self.score(trainer, pl_module)
        for group, row in table.items():
            for attribute, value in row.items():
                pl_module.log(f"val/caption/{group}/{attribute}", value, batch_size=1)
        summary = "  ".join(f"{group} " + " ".join(f"{a[:4]} {v:.2f}" for a, v in row.items())
                            for group, row in table.items() if group in (GROUP_ALL, "1shape"))
        rank_zero_info(f"[step {trainer.global_step}] caption accuracy: {summary}")

    def report(self) -> str:
        """The last table as text, headed by the step it was measured at."""
        return (f"caption accuracy on {self.last_counts.get(GROUP_ALL, 0)} validation scenes at step "
                f"{self.last_step} (greedy):\n{format_table(self.last_table, self.last_counts)}")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.last_table:
            rank_zero_info(self.report())

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.last_table and trainer.state.fn == "validate":
            rank_zero_info(self.report())
