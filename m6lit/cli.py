"""`m6lit` command line: LightningCLI over M6LitModule + ImageTextDataModule.

    m6lit fit --config configs/demo.yaml
    m6lit validate --config configs/demo.yaml --ckpt_path checkpoints/last.ckpt
    m6lit fit --config configs/demo.yaml --print_config
    m6lit export --ckpt_path checkpoints/last.ckpt --output_dir exported/
    m6lit plan --config configs/m6-10t.yaml --gpu_memory_budget 80GB

Defaults: W&B logging offline (sync later with `wandb sync`), a rich progress bar, `predict` writing captions to
`predictions.jsonl` (`CaptionWriter`), `ModelCheckpoint` under the key
`checkpoint` (keeps `last.ckpt`, so `--ckpt_path last` resumes), atomic checkpoint writes, and the config saved to
the log directory (overwritten on a re-run) and to the W&B run.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from jsonargparse import lazy_instance

import m6lit.callbacks  # noqa: F401  (registers callback classes for short class_path names)
import m6lit.strategies  # noqa: F401  (registers the offload strategy's short name, `strategy: m6_offload`)
from m6lit.callbacks.predictions import CaptionWriter
from m6lit.checkpoint_io import AtomicCheckpointIO
from m6lit.data.datamodule import ImageTextDataModule
from m6lit.module import M6LitModule
from m6lit.tokenizer_module import ImageTokenizerModule


class M6SaveConfig(SaveConfigCallback):
    """Writes config.yaml to the log dir (overwriting a previous run's) and pushes it to the W&B run."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                config = self.parser.dump(self.config, skip_none=False, format="yaml")
                import yaml

                logger.experiment.config.update({"m6lit": yaml.safe_load(config)}, allow_val_change=True)


def text_budget(max_seq_len: int, image_size: int, patch_size: int) -> int:
    """Text tokens that fit beside the image patches in one sequence."""
    return max_seq_len - (image_size // patch_size) ** 2


class M6CLI(LightningCLI):
    """LightningCLI with m6lit's defaults and argument links (vocab/pad/eos ids from the tokenizer, image size and
    text budget from the model config)."""

    module_class: type[LightningModule] = M6LitModule

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", M6SaveConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("trainer_defaults", {
            "logger": lazy_instance(WandbLogger, project="m6lit", save_dir="runs", offline=True),
            "callbacks": [RichProgressBar(), CaptionWriter()],
        })
        super().__init__(self.module_class, ImageTextDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.dirpath": "checkpoints", "checkpoint.save_last": True,
                             "checkpoint.filename": "step{step:07d}", "checkpoint.auto_insert_metric_name": False})
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.pad_token_id", "model.config.pad_token_id", apply_on="instantiate")
        parser.link_arguments("data.eos_token_id", "model.config.eos_token_id", apply_on="instantiate")
        parser.link_arguments("data.image_codebook_size", "model.config.image_codebook_size", apply_on="instantiate")
        parser.link_arguments("data.image_grid_size", "model.config.image_grid_size", apply_on="instantiate")
        parser.link_arguments("model.config.image_size", "data.image_size")
        parser.link_arguments(("model.config.max_seq_len", "model.config.image_size", "model.config.patch_size"),
                              "data.max_text_len", compute_fn=text_budget)

    def _parse_ckpt_path(self) -> None:
        """Take the model's architecture (`model.config`) from a `--ckpt_path` checkpoint, nothing else.

        Lightning would apply every saved hyperparameter over the command line, so e.g. `--model.max_new_tokens`
        would be silently ignored at `predict`; the weights only need the architecture to match.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        if "config" in hparams:
            self.config = self.parser.parse_object({subcommand: {"model": {"config": hparams["config"]}}},
                                                   self.config)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


class TokenizerCLI(M6CLI):
    """The CLI for a config whose `model.class_path` is the image tokenizer's module (`ImageTokenizerModule`):
    the same defaults, checkpointing and data, with the tokenizer's own links (image size only)."""

    module_class = ImageTokenizerModule

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.dirpath": "checkpoints", "checkpoint.save_last": True,
                             "checkpoint.filename": "step{step:07d}", "checkpoint.auto_insert_metric_name": False})
        parser.link_arguments("model.init_args.image_size", "data.image_size")


def _model_class_path(argv: list[str]) -> Optional[str]:
    """The `model.class_path` the command line selects (stacked `--config` files, later ones win), if any."""
    import yaml

    found: Optional[str] = None
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg in ("--config", "--model", "--model.class_path") and i + 1 < len(argv) else None
        if arg.startswith(("--config=", "--model=", "--model.class_path=")):
            arg, value = arg.split("=", 1)
        if value is None:
            continue
        if arg == "--config" and Path(value).is_file():
            model = (yaml.safe_load(Path(value).read_text()) or {}).get("model")
            if isinstance(model, dict) and "class_path" in model:
                found = str(model["class_path"])
        elif arg in ("--model", "--model.class_path") and not value.lstrip().startswith(("{", "/")):
            found = value
    return found


# Subcommands outside Lightning's fit/validate/test/predict: name -> "module:function", each function taking argv.
EXTRA_COMMANDS = {
    "export": "m6lit.export:main",
    "plan": "m6lit.strategies.planner:main",
}


def main(args: Optional[list[str]] = None) -> None:
    """Console entry point (`m6lit` and `python -m m6lit`): Lightning subcommands plus `export` and `plan`."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_COMMANDS:
        module_name, function_name = EXTRA_COMMANDS[argv[0]].split(":")
        getattr(importlib.import_module(module_name), function_name)(argv[1:])
        return
    class_path = _model_class_path(argv)
    if class_path is not None and class_path.split(".")[-1] == ImageTokenizerModule.__name__:
        TokenizerCLI(args=args)
        return
    M6CLI(args=args)
