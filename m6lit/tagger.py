"""Attribute tagging on M6 features: a linear or MLP multi-label head over pooled multimodal features.

`TaggingDataModule` reads any m6lit source whose samples carry ``labels`` (see `m6lit.data.labels`; the demo
source fills them from its scenes) into images, texts and multi-hot targets. `AttributeTagger` pools features of a
trained M6 model (`m6lit.model.features.multimodal_features`), frozen or fine-tuned, and trains the head with a
binary cross-entropy per (attribute, value); validation logs per attribute (torchmetrics) the exact-match
accuracy of the thresholded value set, the macro F1, and ``top1``: how often the highest-scoring value is one of
the sample's values, as ``val/tag/<attribute>/{exact,f1,top1}``.

    m6lit fit --config configs/tagger-demo.yaml --model.backbone checkpoints/last.ckpt
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchmetrics import MeanMetric
from torchmetrics.classification import MultilabelExactMatch, MultilabelF1Score

from .data.demo import DEMO_ATTRIBUTES
from .data.labels import AttributeVocab
from .data.sources import SourceSpec, build_source
from .data.tasks import image_to_tensor
from .data.tokenizer import load_tokenizer
from .model import M6Config, M6Model
from .model.features import FeatureModality, Pooling, check_feature_options, multimodal_features

__all__ = ["AttributeTagger", "TaggingDataModule", "load_backbone"]


class _Tagged(Dataset):
    """Samples of a map-style source as ``{pixel_values, text_ids, target, origin}`` (``None`` for a bad one)."""

    def __init__(self, source: Dataset, encode: Any) -> None:
        self.source, self.encode = source, encode

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Optional[dict[str, Any]]:
        sample = self.source[index]
        return None if sample is None else self.encode(sample)


class _TaggedStream(IterableDataset):
    def __init__(self, source: IterableDataset, encode: Any) -> None:
        self.source, self.encode = source, encode

    def __iter__(self) -> Any:
        for sample in self.source:
            yield None if sample is None else self.encode(sample)


class TaggingDataModule(LightningDataModule):
    """Labelled images and texts for attribute tagging.

    Args:
        train / val / test: sources (as in `data.train` of the M6 recipes); every sample needs ``labels``.
        attributes: the attribute vocabulary ``{attribute: [values]}``; may be left out when every source is
            ``kind: demo`` (the demo's own attributes). A label outside it is an error naming the sample.
        image_size: square side of the images (the backbone's ``image_size``).
        tokenizer: tokenizer of the backbone's texts (default: m6lit's byte tokenizer).
        max_text_len: longer texts are cut to this many tokens.
    """

    def __init__(self, train: Optional[list[SourceSpec]] = None, val: Optional[list[SourceSpec]] = None,
                 test: Optional[list[SourceSpec]] = None, attributes: Optional[dict[str, list[str]]] = None,
                 image_size: int = 48, tokenizer: Optional[str] = None, max_text_len: int = 128,
                 batch_size: int = 64, num_workers: int = 0,
                 on_bad_sample: Literal["error", "skip"] = "error") -> None:
        super().__init__()
        self.specs = {"train": [SourceSpec(**s) if isinstance(s, dict) else s for s in train or []],
                      "val": [SourceSpec(**s) if isinstance(s, dict) else s for s in val or []],
                      "test": [SourceSpec(**s) if isinstance(s, dict) else s for s in test or []]}
        if attributes is None:
            kinds = {s.kind for specs in self.specs.values() for s in specs}
            if kinds - {"demo"}:
                raise ValueError("data.attributes: give the attribute vocabulary ({attribute: [values]}) for "
                                 f"{sorted(kinds - {'demo'})} sources; only demo sources know their own")
            attributes = DEMO_ATTRIBUTES
        self.vocab = AttributeVocab({a: list(v) for a, v in attributes.items()})
        self.image_size = image_size
        self.tokenizer = load_tokenizer(tokenizer)
        self.max_text_len = max_text_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.on_bad_sample = on_bad_sample

    def _encode(self, sample: dict[str, Any]) -> dict[str, Any]:
        origin = sample.get("origin", "?")
        ids = self.tokenizer.encode(sample.get("text") or "", add_special_tokens=False)[: self.max_text_len]
        image = sample.get("image")
        return {"pixel_values": image_to_tensor(image, self.image_size) if image is not None else None,
                "text_ids": torch.tensor(ids, dtype=torch.long), "target": self.vocab.encode(sample.get("labels"),
                                                                                             origin),
                "origin": origin}

    def dataset(self, stage: str) -> Dataset:
        specs = self.specs[stage]
        if not specs:
            raise ValueError(f"data.{stage}: no sources given")
        if len(specs) != 1:
            raise ValueError(f"data.{stage}: attribute tagging reads one source per split, got {len(specs)}")
        source = build_source(specs[0], image_size=self.image_size, on_bad_sample=self.on_bad_sample,
                              shuffle=stage == "train")
        if isinstance(source, IterableDataset):
            return _TaggedStream(source, self._encode)
        return _Tagged(source, self._encode)

    def _loader(self, stage: str) -> DataLoader:
        data = self.dataset(stage)
        shuffle = stage == "train" and not isinstance(data, IterableDataset)
        return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=self.collate, generator=torch.Generator().manual_seed(0) if shuffle else None)

    def collate(self, rows: list[Optional[dict[str, Any]]]) -> dict[str, Any]:
        """Right-padded ``input_ids`` + ``attention_mask``, ``pixel_values`` + ``image_mask``, ``targets``,
        ``origins``, ``num_skipped`` (bad samples left out)."""
        kept = [r for r in rows if r is not None]
        b = len(kept)
        width = max((len(r["text_ids"]) for r in kept), default=0)
        input_ids = torch.full((b, width), int(self.tokenizer.pad_token_id), dtype=torch.long)
        attention_mask = torch.zeros((b, width), dtype=torch.bool)
        for i, r in enumerate(kept):
            input_ids[i, : len(r["text_ids"])] = r["text_ids"]
            attention_mask[i, : len(r["text_ids"])] = True
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                 "targets": torch.stack([r["target"] for r in kept]) if kept else
                                 torch.zeros(0, self.vocab.size),
                                 "origins": [r["origin"] for r in kept], "num_skipped": len(rows) - b}
        images = [r["pixel_values"] for r in kept]
        first = next((im for im in images if im is not None), None)
        if first is not None:
            batch["pixel_values"] = torch.stack([im if im is not None else torch.zeros_like(first) for im in images])
            batch["image_mask"] = torch.tensor([im is not None for im in images])
        return batch

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


def load_backbone(path: str | os.PathLike[str]) -> M6Model:
    """The M6 model of an m6lit checkpoint (`.ckpt` file or distributed-checkpoint folder) or an exported folder."""
    folder = Path(path)
    if folder.is_dir() and (folder / "config.json").exists():
        from .model.exported_weights import load_exported_weights
        from .model.hf import M6HFConfig

        model = M6Model(M6HFConfig.from_pretrained(folder).to_m6_config())
        load_exported_weights(model, folder)
        return model
    from .export.checkpoint import load_checkpoint, model_from_checkpoint

    return model_from_checkpoint(load_checkpoint(folder), origin=str(folder))


class AttributeTagger(LightningModule):
    """Multi-label attribute head on pooled features of an M6 backbone.

    Args:
        backbone: m6lit checkpoint or exported folder to take the M6 model from; ``None`` = a freshly initialised
            model of ``config`` (a baseline: what the head can read from random features).
        config: the model shape when ``backbone`` is ``None``.
        modality / pooling: which features (see `m6lit.model.features.multimodal_features`).
        head: ``linear`` or ``mlp`` (one hidden layer of ``hidden`` units, GELU).
        freeze_backbone: keep the backbone fixed (eval mode, no gradients); False fine-tunes it at ``backbone_lr``.
        lr / weight_decay: AdamW settings of the head.
        attributes: the attribute vocabulary (default: the data module's; kept in checkpoints).
        backbone_source: where the backbone came from (recorded in checkpoints, which rebuild it from ``config``).
    """

    def __init__(self, backbone: Optional[str] = None, config: Optional[M6Config | dict] = None,
                 modality: FeatureModality = "image", pooling: Pooling = "mean",
                 head: Literal["linear", "mlp"] = "linear", hidden: int = 256, freeze_backbone: bool = True,
                 lr: float = 1e-2, weight_decay: float = 0.0, backbone_lr: float = 1e-4,
                 attributes: Optional[dict[str, list[str]]] = None, backbone_source: Optional[str] = None) -> None:
        super().__init__()
        check_feature_options(modality, pooling, key="model")
        if head not in ("linear", "mlp"):
            raise ValueError(f"model.head={head!r}: must be 'linear' or 'mlp'")
        if backbone is None and config is None:
            raise ValueError("model.backbone (a checkpoint or exported folder) or model.config is required")
        self.save_hyperparameters()
        if isinstance(config, dict):
            config = M6Config.from_dict(config)
        self.backbone = load_backbone(backbone) if backbone is not None else M6Model(config)
        # checkpoints rebuild the backbone from its config (the weights are in the state dict), not from the path
        self.hparams.update(backbone=None, backbone_source=backbone or self.hparams.get("backbone_source"),
                            config=self.backbone.config.to_dict())
        self.head: Optional[nn.Module] = None
        self.vocab: Optional[AttributeVocab] = AttributeVocab(attributes) if attributes else None
        if self.vocab is not None:
            self._build_head(self.vocab)
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def _build_head(self, vocab: AttributeVocab) -> None:
        d, n = self.backbone.config.d_model, vocab.size
        hp = self.hparams
        self.head = (nn.Linear(d, n) if hp.head == "linear"
                     else nn.Sequential(nn.Linear(d, hp.hidden), nn.GELU(), nn.Linear(hp.hidden, n)))
        self.vocab = vocab
        self.hparams.attributes = vocab.attributes
        self.metrics = nn.ModuleDict({
            attribute: nn.ModuleDict({
                "exact": MultilabelExactMatch(num_labels=len(values)),
                "f1": MultilabelF1Score(num_labels=len(values), average="macro"),
                "top1": MeanMetric(),
            }) for attribute, values in vocab.attributes.items()})

    def setup(self, stage: str) -> None:
        vocab = getattr(getattr(self._trainer, "datamodule", None), "vocab", None)
        if self.vocab is None:
            if vocab is None:
                raise ValueError("AttributeTagger needs its attribute vocabulary: use TaggingDataModule (data:) or "
                                 "give model.attributes")
            self._build_head(vocab)
        elif vocab is not None and vocab.attributes != self.vocab.attributes:
            raise ValueError(f"the data's attributes {vocab.attributes} differ from the tagger's "
                             f"{self.vocab.attributes} (model.attributes / the checkpoint)")

    def features(self, batch: dict[str, Any]) -> Tensor:
        """Pooled backbone features [B, D] of a batch (gradients only when fine-tuning)."""
        hp = self.hparams
        args = dict(input_ids=batch.get("input_ids"), attention_mask=batch.get("attention_mask"),
                    pixel_values=batch.get("pixel_values"), image_mask=batch.get("image_mask"),
                    modality=hp.modality, pooling=hp.pooling)
        if hp.freeze_backbone:
            self.backbone.eval()
            with torch.no_grad():
                return multimodal_features(self.backbone, **args)
        return multimodal_features(self.backbone, **args)

    def forward(self, batch: dict[str, Any]) -> Tensor:
        """Logits [B, attributes x values]."""
        assert self.head is not None
        return self.head(self.features(batch))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = F.binary_cross_entropy_with_logits(self(batch), batch["targets"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["targets"]))
        return loss

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        assert self.vocab is not None
        logits = self(batch)
        targets = batch["targets"]
        self.log(f"{stage}/loss", F.binary_cross_entropy_with_logits(logits, targets), batch_size=len(targets))
        for attribute, span in self.vocab.spans().items():
            scores, truth = logits[:, span], targets[:, span]
            labelled = truth.sum(1) > 0  # top-1 is scored on samples that have a value of the attribute
            for name, metric in self.metrics[attribute].items():
                if name == "top1":
                    hit = truth.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)
                    metric.update(hit, weight=labelled.float())
                else:
                    metric.update(scores, truth.long())
                self.log(f"{stage}/tag/{attribute}/{name}", metric, batch_size=len(targets))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        assert self.head is not None
        groups = [{"params": list(self.head.parameters()), "lr": hp.lr, "weight_decay": hp.weight_decay}]
        if not hp.freeze_backbone:
            groups.append({"params": list(self.backbone.parameters()), "lr": hp.backbone_lr, "weight_decay": 0.0})
        return torch.optim.AdamW(groups)
