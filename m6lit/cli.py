"""`m6lit` command line: LightningCLI over M6LitModule + ImageTextDataModule.

    m6lit fit --config configs/demo.yaml
    m6lit validate --config configs/demo.yaml --ckpt_path checkpoints/last.ckpt
    m6lit fit --config configs/demo.yaml --print_config
    m6lit export --ckpt_path checkpoints/last.ckpt --output_dir exported/
    m6lit plan --config configs/m6-10t.yaml --gpu_memory_budget 80GB

Defaults, all visible in `--print_config`: W&B logging offline (`trainer.logger`; sync later with `wandb sync`),
and five callbacks under their own top-level keys, so one option changes them: `checkpoint` (`M6ModelCheckpoint`:
keeps `last.ckpt` at the final step, so `--ckpt_path last` resumes, and the best checkpoint by `val/loss`),
`progress_bar` (`M6ProgressBar`), `predictions` (`CaptionWriter`: `predict` writes captions to
`predictions.jsonl` in the log directory), `features` (`FeatureWriter`: with `model.predict_task: features`,
`predict` writes pooled features to `features/` in the log directory) and `pseudo_to_real` (`PseudoToReal`, inactive until `delink_step` or
`schedule` is set). `--trainer.enable_checkpointing false` and `--trainer.enable_progress_bar false` leave the
corresponding callback out. Checkpoint writes are atomic; the config is saved to the log directory (overwritten on
a re-run) and to the W&B run. Errors in the configuration or the data print one `m6lit: error: ...` message
(`M6LIT_TRACEBACK=1` shows the traceback).
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import sys
import traceback
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any, NoReturn, Optional, Union

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, lazy_instance

import m6lit
import m6lit.callbacks  # noqa: F401  (registers callback classes for short class_path names)
import m6lit.strategies  # noqa: F401  (registers the offload strategy's short name, `strategy: m6_offload`)
from m6lit.callbacks.checkpoint import M6ModelCheckpoint, checkpoint_wandb_run_id
from m6lit.callbacks.features import FeatureWriter
from m6lit.callbacks.predictions import CaptionWriter
from m6lit.callbacks.progress import M6ProgressBar
from m6lit.callbacks.pseudo_to_real import PseudoToReal
from m6lit.checkpoint_io import AtomicCheckpointIO
from m6lit.data.datamodule import ImageTextDataModule
from m6lit.data.sources import BadSampleError
from m6lit.model.flavors import FLAVORS, flavor_values
from m6lit.module import M6LitModule
from m6lit.tagger import AttributeTagger, TaggingDataModule
from m6lit.tokenizer_module import ImageTokenizerModule

#: `model.config` keys that do not change parameter shapes or their layout: a `--model.config.<key>` given with
#: `--ckpt_path` is applied over the checkpoint's value; any other key that differs is an error.
NON_STRUCTURAL_KEYS = ("dropout", "balance_loss_coef", "z_loss_coef", "capacity_factor", "norm_eps", "init_std",
                       "router_norm_topk")
_CKPT_ALIASES = ("last", "best", "hpc", "registry")


class M6WandbLogger(WandbLogger):
    """Lightning's WandbLogger without the `anonymous=None` it always passes, which new wandb versions answer with
    a deprecation warning on every run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


class _NoTips(logging.Filter):
    """Drops Lightning's advertising tips ("💡 Tip: ... try installing litlogger") from the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡")


class M6ArgumentParser(LightningArgumentParser):
    """Parser whose errors are one short message instead of the whole usage text (options: `--help`)."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        prog = self.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {message.strip()}\n(options: {prog} --help)\n")
        sys.exit(2)


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


def _explicit_config_keys(argv: list[str]) -> list[str]:
    """`model.config` keys given one by one on the command line (`--model.config.d_model 64`)."""
    keys = []
    for token in argv:
        if token.startswith("--model.config."):
            keys.append(token[len("--model.config."):].split("=", 1)[0])
    return keys


_SHORT_NAMES = {"m6_offload": "m6lit.strategies.SelectiveOffloadStrategy",
                "m6_offload_ddp": "m6lit.strategies.DDPOffloadStrategy"}


def _strategy_short_name_with_options(argv: list[str]) -> list[str]:
    """`--trainer.strategy m6_offload --trainer.strategy.<option> ...`: a registered short name is a plain string to
    the parser, which then has nowhere to put the options; name the class instead, so the options apply."""
    if not any(a.startswith("--trainer.strategy.") for a in argv):
        return argv
    out = list(argv)
    for i, token in enumerate(out):
        if token == "--trainer.strategy" and i + 1 < len(out) and out[i + 1] in _SHORT_NAMES:
            out[i + 1] = _SHORT_NAMES[out[i + 1]]
        elif token.startswith("--trainer.strategy=") and token.split("=", 1)[1] in _SHORT_NAMES:
            out[i] = "--trainer.strategy=" + _SHORT_NAMES[token.split("=", 1)[1]]
    return out


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"m6lit: error: {message}\n")
    sys.exit(2)


def _add_checkpoint_and_progress(parser: LightningArgumentParser, dirpath: str = "checkpoints",
                                 monitor: Optional[str] = None) -> None:
    """The `checkpoint` (`M6ModelCheckpoint`: `last.ckpt` plus `step<N>.ckpt`, the best by `monitor` when given) and
    `progress_bar` (`M6ProgressBar`) groups every m6lit CLI injects."""
    parser.add_lightning_class_args(M6ModelCheckpoint, "checkpoint")
    defaults: dict[str, Any] = {"checkpoint.dirpath": dirpath, "checkpoint.save_last": True,
                                "checkpoint.filename": "step{step:07d}", "checkpoint.auto_insert_metric_name": False}
    if monitor is not None:
        defaults.update({"checkpoint.monitor": monitor, "checkpoint.mode": "min"})
    parser.set_defaults(defaults)
    parser.add_lightning_class_args(M6ProgressBar, "progress_bar")


class M6CLI(LightningCLI):
    """LightningCLI with m6lit's defaults and argument links (vocab/pad/eos ids from the tokenizer, image size and
    text budget from the model config)."""

    module_class: type[LightningModule] = M6LitModule
    datamodule_class: type[LightningDataModule] = ImageTextDataModule

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._argv = list(sys.argv[1:] if kwargs.get("args") is None else kwargs["args"])
        kwargs.setdefault("save_config_callback", M6SaveConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("parser_class", M6ArgumentParser)
        kwargs.setdefault("parser_kwargs", {"prog": "m6lit", "description": (
            "m6lit: train M6-style multimodal MoE models with Lightning. Subcommands: fit, validate, test, predict "
            "(Lightning's), and `m6lit export` (a checkpoint to a Hugging Face folder) and `m6lit plan` (memory and "
            "offload estimate for a config); `m6lit <subcommand> --help` lists each one's options.")})
        kwargs.setdefault("trainer_defaults", {
            "logger": lazy_instance(M6WandbLogger, project="m6lit", save_dir="runs", offline=True),
        })
        super().__init__(self.module_class, self.datamodule_class, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        _add_checkpoint_and_progress(parser, monitor="val/loss")
        parser.add_lightning_class_args(CaptionWriter, "predictions")
        parser.add_lightning_class_args(FeatureWriter, "features")
        parser.add_lightning_class_args(PseudoToReal, "pseudo_to_real")
        # M6LitModule's default M6Config() has already filled num_unique_blocks from ITS num_layers (4); as a
        # parser default that would silently share the blocks of any config that sets num_layers alone
        parser.set_defaults({"model.config.num_unique_blocks": None})
        parser.add_argument("--flavor", type=Optional[str], default=None,
                            help=f"a named model architecture whose values become the model.config defaults (any "
                                 f"model.config key still overrides it): one of {sorted(FLAVORS)} "
                                 f"(m6lit.model.flavors)")
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.pad_token_id", "model.config.pad_token_id", apply_on="instantiate")
        parser.link_arguments("data.eos_token_id", "model.config.eos_token_id", apply_on="instantiate")
        parser.link_arguments("data.image_codebook_size", "model.config.image_codebook_size", apply_on="instantiate")
        parser.link_arguments("data.image_grid_size", "model.config.image_grid_size", apply_on="instantiate")
        parser.link_arguments("model.config.image_size", "data.image_size")
        parser.link_arguments(("model.config.max_seq_len", "model.config.image_size", "model.config.patch_size"),
                              "data.max_text_len", compute_fn=text_budget)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as Lightning does, with the selected `flavor`'s values as the `model.config` defaults: below every
        config file and option, so the YAML and the command line override single keys of it."""
        flavor = None
        if self.module_class is M6LitModule:
            flavor = _selected(list(sys.argv[1:] if args is None else args)).get("flavor")
        if flavor is not None:
            defaults = {f"model.config.{key}": value for key, value in flavor_values(str(flavor)).items()}
            for subparser in (getattr(self, "_subcommand_parsers", None) or {None: parser}).values():
                subparser.set_defaults(defaults)
        super().parse_arguments(parser, args)

    def _resolve_ckpt_path(self, subcommand: str, ckpt_path: str) -> Optional[Path]:
        """The file `--ckpt_path` names (`last` = `<checkpoint.dirpath>/last.ckpt` if present), or None."""
        if ckpt_path in _CKPT_ALIASES:
            if ckpt_path != "last":
                return None
            dirpath = self.config[subcommand].get("checkpoint", {}).get("dirpath")
            last = Path(dirpath or "checkpoints") / "last.ckpt"
            return last if last.is_file() else None
        path = Path(ckpt_path)
        if not path.is_file():
            _fail(f"--ckpt_path {ckpt_path}: no such checkpoint file")
        return path

    def _parse_ckpt_path(self) -> None:
        """Take the model's architecture (`model.config`) from a `--ckpt_path` checkpoint, nothing else.

        Lightning would apply every saved hyperparameter over the command line, so e.g. `--model.max_new_tokens`
        would be silently ignored at `predict`; the weights only need the architecture to match. A
        `--model.config.<key>` given on the command line that differs from the checkpoint is an error when the key
        is structural (it would be dropped or fail to load) and applied (and reported) when it is not. `fit` resumes
        the checkpoint's W&B run.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        path = self._resolve_ckpt_path(subcommand, str(ckpt_path)) if ckpt_path else None
        if path is None:
            return
        try:
            checkpoint = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as err:  # torch raises zip, pickle and runtime errors alike for a damaged file
            _fail(f"--ckpt_path {path}: cannot be read as a checkpoint (damaged, truncated, or not written by "
                  f"torch.save: {type(err).__name__})")
        if not isinstance(checkpoint, dict):
            _fail(f"--ckpt_path {path}: not a Lightning checkpoint (holds a {type(checkpoint).__name__})")
        hparams = checkpoint.get("hyper_parameters", {})
        config = self.config[subcommand]
        if "config" in hparams:
            saved = dict(hparams["config"])
            given = config.model.config
            structural, applied = [], {}
            for key in dict.fromkeys(_explicit_config_keys(self._argv)):
                if key not in saved or given.get(key) == saved[key]:
                    continue
                if key in NON_STRUCTURAL_KEYS:
                    applied[key] = given.get(key)
                else:
                    structural.append(f"{key}={given.get(key)!r} (checkpoint: {saved[key]!r})")
            if structural:
                _fail(f"--ckpt_path {path}: --model.config overrides change the model's structure: "
                      f"{', '.join(structural)}; the weights cannot load into that shape. Drop them, or train a "
                      f"new model without --ckpt_path")
            if applied:
                sys.stderr.write(f"m6lit: over the checkpoint's model.config, applying "
                                 f"{', '.join(f'{k}={v!r} (checkpoint: {saved[k]!r})' for k, v in applied.items())}\n")
            self.config = self.parser.parse_object({subcommand: {"model": {"config": {**saved, **applied}}}},
                                                   self.config)
            config = self.config[subcommand]
        run_id = checkpoint_wandb_run_id(checkpoint)
        logger = config.get("trainer", {}).get("logger")
        if (subcommand == "fit" and run_id and logger is not None and not isinstance(logger, bool)
                and str(logger.get("class_path", "")).endswith("WandbLogger")
                and logger.get("init_args", {}).get("id") is None):
            logger.init_args.id = run_id

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            if "max_text_len" not in str(err):
                raise
            sub = self.config[self.subcommand] if self.subcommand else self.config
            c = sub.model.config
            raise ValueError(
                f"{err}; data.max_text_len is derived: model.config.max_seq_len ({c.max_seq_len}) minus the image "
                f"patches ((model.config.image_size {c.image_size} // model.config.patch_size {c.patch_size})^2 = "
                f"{(c.image_size // c.patch_size) ** 2}) = {text_budget(c.max_seq_len, c.image_size, c.patch_size)}"
                f" text tokens: raise model.config.max_seq_len or model.config.patch_size") from err

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        sub = self.config[self.subcommand] if self.subcommand else self.config
        trainer_config = sub.get("trainer", {})
        keys = self._parser(self.subcommand).callback_keys
        dropped = set()
        if trainer_config.get("enable_checkpointing") is False:
            dropped.add("checkpoint")
        if trainer_config.get("enable_progress_bar") is False:
            dropped.add("progress_bar")
        p2r = self._get(self.config_init, "pseudo_to_real") if "pseudo_to_real" in keys else None
        if p2r is not None and not p2r.active:
            dropped.add("pseudo_to_real")
        checkpoint = self._get(self.config_init, "checkpoint") if "checkpoint" in keys else None
        if (checkpoint is not None and checkpoint.monitor == "val/loss"
                and trainer_config.get("limit_val_batches") in (0, 0.0)):
            checkpoint.monitor = None  # no validation runs, so no val/loss: keep only last.ckpt
            checkpoint.save_top_k = 1
        self._parser(self.subcommand).callback_keys = [k for k in keys if k not in dropped]
        try:
            trainer = super().instantiate_trainer(**kwargs)
        finally:
            self._parser(self.subcommand).callback_keys = keys
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
        _add_checkpoint_and_progress(parser)
        parser.link_arguments("model.init_args.image_size", "data.image_size")


class TaggerCLI(M6CLI):
    """The CLI for a config whose `model.class_path` is `m6lit.tagger.AttributeTagger`: attribute tagging on M6
    features, with `TaggingDataModule` as `data`, m6lit's checkpointing (by `val/loss`), progress bar and W&B."""

    module_class = AttributeTagger
    datamodule_class = TaggingDataModule

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        _add_checkpoint_and_progress(parser, dirpath="checkpoints/tagger", monitor="val/loss")


class _SelectorParser(ArgumentParser):
    """A parser that reads the command line's `--config` files (stacked, with their included base recipes),
    `--model` and `--flavor` values the way the CLI does, to learn which LightningModule the config names and which
    model flavor it selects. It checks nothing else: the CLI parses and validates the whole config."""

    def __init__(self) -> None:
        super().__init__(exit_on_error=False)
        self.add_argument("--config", action=ActionConfigFile)
        self.add_argument("--model", type=Optional[Union[dict, str]])
        self.add_argument("--flavor", type=Optional[str])

    def validate(self, cfg: Namespace, skip_required: bool = False) -> None:
        """Keys of the rest of the config (data, trainer, ...) are not this parser's to check."""


def _selected(argv: list[str]) -> Namespace:
    """The `model` and `flavor` the command line selects (stacked `--config` files, later ones win); empty when the
    config cannot be read (the CLI itself then reports what is wrong)."""
    options = ("--config", "--model", "--model.class_path", "--flavor")
    wanted = []
    for i, arg in enumerate(argv):
        if arg in options and i + 1 < len(argv):
            wanted += [arg, argv[i + 1]]
        elif arg.startswith(tuple(f"{o}=" for o in options)):
            wanted.append(arg)
    try:
        return _SelectorParser().parse_args(wanted)
    except ArgumentError:
        return Namespace()


def _model_class_path(argv: list[str]) -> Optional[str]:
    """The `model.class_path` the command line selects, if any."""
    model = _selected(argv).get("model")
    if isinstance(model, str) and not model.lstrip().startswith(("{", "/")):
        return model
    if isinstance(model, (dict, Namespace)) and "class_path" in model:
        return str(model["class_path"])
    return None


# Subcommands outside Lightning's fit/validate/test/predict: name -> "module:function", each function taking argv.
EXTRA_COMMANDS = {
    "export": "m6lit.export.command:main",
    "plan": "m6lit.plan_cli:main",
}


def _raised_by_m6lit(err: BaseException) -> bool:
    """Whether `err` was raised by m6lit's own code (its innermost frame is in the package): a message for the
    user (bad config or data), not a bug whose traceback matters."""
    if isinstance(err, BadSampleError):
        return True
    frames = traceback.extract_tb(err.__traceback__)
    package = str(Path(m6lit.__file__).parent)
    return bool(frames) and frames[-1].filename.startswith(package)


def _finish_wandb() -> None:
    """Close this process's W&B run before the program ends, so its (offline) folder is complete and its id is free
    for the next `--ckpt_path` resume at once, not after an exit hook has flushed it."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def finish_distributed() -> None:
    """Destroy the process groups and drop every reference to them, so that their gloo worker threads are joined
    while the interpreter is whole.

    `destroy_process_group` alone leaves each group alive in the registry of the DeviceMesh that FSDP2 or expert
    parallelism built (meshes outlive the run in DTensor's sharding caches). Its worker threads then run on into
    interpreter finalisation, where a thread that frees a finished collective's tensors needs the GIL and aborts
    the process (SIGABRT, "terminate called without an active exception") after a run that succeeded.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    from torch.distributed.device_mesh import DeviceMesh

    torch.distributed.destroy_process_group()
    gc.collect()  # a finished trainer's reference cycles hold wrapped modules, DDP reducers and meshes
    for obj in gc.get_objects():
        registry = getattr(obj, "_pg_registry", None) if isinstance(obj, DeviceMesh) else None
        if isinstance(registry, dict):
            registry.clear()


def main(args: Optional[list[str]] = None) -> None:
    """Console entry point (`m6lit` and `python -m m6lit`): Lightning subcommands plus `export` and `plan`.

    A `ValueError`/`FileNotFoundError` that m6lit raises about the configuration or the data ends the program with
    one `m6lit: error: ...` line (exit status 1); `M6LIT_TRACEBACK=1` re-raises it with the traceback.
    """
    argv = list(sys.argv[1:] if args is None else args)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message="The anonymous setting has no effect")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoTips())
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            module_name, function_name = EXTRA_COMMANDS[argv[0]].split(":")
            getattr(importlib.import_module(module_name), function_name)(argv[1:])
            return
        class_path = _model_class_path(argv)
        try:
            if class_path is not None and class_path.split(".")[-1] == ImageTokenizerModule.__name__:
                TokenizerCLI(args=args)
            elif class_path is not None and class_path.split(".")[-1] == AttributeTagger.__name__:
                TaggerCLI(args=args)
            else:
                M6CLI(args=_strategy_short_name_with_options(argv))
        finally:
            _finish_wandb()
            finish_distributed()
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("M6LIT_TRACEBACK") or not _raised_by_m6lit(err):
            raise
        sys.stderr.write(f"m6lit: error: {err}\n(M6LIT_TRACEBACK=1 shows where)\n")
        sys.exit(1)
