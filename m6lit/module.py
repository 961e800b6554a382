"""M6LitModule: the LightningModule around M6Model — loss, metrics, parameter groups, LR schedule, generation.

It never decides device placement (the strategy does). Structural state (how many unique blocks, later expert
counts) lives in the model config, an `__init__` hyperparameter, so a checkpoint rebuilds the right shape before its
weights load; callbacks that change the structure update `hparams["config"]` in place.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any, Callable, Iterable, Optional, Union

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric

from .model.exported_weights import load_exported_weights
from .model import M6Config, M6Model, delink, lm_loss, token_stats
from .model.embeddings import check_token_ids
from .model.flops import training_flops
from .model.features import FeatureModality, Pooling, check_feature_options, multimodal_features
from .model.hf import generate_text
from .model.m6 import chunked_lm_loss

#: batches over which tokens/s, samples/s and MFU are averaged (host wall clock, no device sync)
THROUGHPUT_WINDOW = 10
#: dense bf16 peak of H100/H200 (SXM), the basis of `train/mfu` on those GPUs unless `peak_flops` is given
HOPPER_BF16_FLOPS = 989e12

NO_DECAY_SUFFIXES = ("embed.tokens.weight", "embed.text_pos.weight", "embed.modality.weight", "embed.patches.pos",
                     "embed.code_row.weight", "embed.code_col.weight")


def build_param_groups(model: nn.Module, prefix: str = "") -> list[dict[str, Any]]:
    """Two AdamW groups in a canonical order: weights with decay, then norms/biases/embeddings without.

    The same function builds the groups at `configure_optimizers` and after any structural change, so a rebuilt
    optimizer has the same group order as a fresh one (checkpoints then load without remapping).
    Each group carries `param_names` for readability and for state transplant.
    """
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or name.endswith(NO_DECAY_SUFFIXES) or name.endswith("bias") or "norm" in name:
            no_decay.append((prefix + name, p))
        else:
            decay.append((prefix + name, p))
    return [
        {"params": [p for _, p in decay], "param_names": [n for n, _ in decay]},
        {"params": [p for _, p in no_decay], "param_names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup from ~0 to 1 over `warmup_steps`, cosine decay to `min_lr_ratio` at the end."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _default_optimizer(params: Iterable[Any]) -> torch.optim.Optimizer:
    """AdamW lr 3e-4, betas (0.9, 0.95), wd 0.1; its fused kernel when every parameter is on CUDA (one launch per
    step, and a non-finite step is skipped on the device: see `M6LitModule.on_before_optimizer_step`)."""
    groups = list(params)
    on_cuda = all(p.is_cuda for g in groups for p in (g["params"] if isinstance(g, dict) else [g]))
    optimizer = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=on_cuda or None)
    if on_cuda:
        # fused AdamW could unscale fp16 gradients itself, and Lightning then refuses gradient clipping; without
        # that claim a GradScaler unscales first, as for any optimizer (bf16 has no scaler at all)
        optimizer._step_supports_amp_scaling = False
    return optimizer


def skips_nonfinite_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` honours a `found_inf` tensor (fused Adam/AdamW: the update is skipped on the device,
    step counters included, when it is non-zero), so a non-finite gradient needs no host read before the step."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and bool(optimizer.param_groups) and all(
        g.get("fused") for g in optimizer.param_groups)


class M6LitModule(LightningModule):
    """Trains an M6Model on the batch contract with LM loss + weighted MoE aux losses.

    Args:
        config: the model config (a plain dict is accepted too, as stored in a checkpoint's hyperparameters).
        optimizer: optimizer factory called with the parameter groups (default AdamW lr 3e-4, wd 0.1).
        warmup_steps: linear LR warmup steps.
        min_lr_ratio: final LR as a fraction of the peak (cosine decay over the run's total steps).
        max_new_tokens: caption length for `predict_step`.
        do_sample / temperature / top_p: decoding for `predict_step` (greedy by default).
        task_loss_weights: per-task loss weights (keys from `m6lit.data.tasks.TASKS`, missing tasks weigh 1): the loss
            is then each task's token mean, weighted over the tasks in the batch, instead of one token mean (image
            codes would swamp captions). Each task's loss is logged as `train/loss_<task>` either way.
        predict_task: "caption" (captions for the predict images), "generate" (images for the predict texts,
            with `data.image_tokenizer`; write them with `m6lit.callbacks.ImageWriter`) or "features" (pooled
            features of each predict sample; write them with `m6lit.callbacks.FeatureWriter`).
        feature_modality / feature_pooling: for `predict_task: features`: "joint", "image" or "text"; "mean" over
            valid positions or a position index (see `m6lit.model.features.multimodal_features`).
        image_guidance_scale / image_temperature / image_top_k / image_top_p / image_candidates: image sampling
            (classifier-free guidance scale; candidates per prompt, reranked by the model's caption likelihood).
        init_from: a folder written by `m6lit export` to start from (fine-tuning); its config must match `config`
            (a larger `num_unique_blocks` that refines its sharing is allowed). Not saved in checkpoints: they hold
            the weights themselves.
        compile_blocks: `torch.compile` the transformer blocks (True, or a dict of `torch.compile` options such as
            `{"mode": "max-autotune-no-cudagraphs"}`); blocks created by a delink or an expert split are compiled
            when they first run. The first step's time (compilation included) is logged as `train/first_step_sec`.
        loss_chunk_tokens: compute the LM loss `loss_chunk_tokens` positions at a time from the hidden states
            (no full `[B, T, V]` logits in training); None for the plain loss.
        peak_flops: the accelerator's peak FLOP/s for `train/mfu` (default: 989e12 on H100/H200, Lightning's table
            elsewhere; no MFU when unknown, e.g. on the CPU).
    """

    def __init__(self, config: M6Config = M6Config(),
                 optimizer: Optional[OptimizerCallable] = None, warmup_steps: int = 100,
                 min_lr_ratio: float = 0.1, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, init_from: Optional[str] = None,
                 compile_blocks: Union[bool, dict[str, Any]] = False, loss_chunk_tokens: Optional[int] = None,
                 peak_flops: Optional[float] = None, task_loss_weights: Optional[dict[str, float]] = None,
                 predict_task: str = "caption", image_guidance_scale: float = 3.0, image_temperature: float = 1.0,
                 image_top_k: int = 0, image_top_p: float = 1.0, image_candidates: int = 1,
                 feature_modality: FeatureModality = "joint", feature_pooling: Pooling = "mean") -> None:
        super().__init__()
        # a private copy: structural changes (delink, expert split) mutate the model's config, never the caller's
        config = M6Config.from_dict(config if isinstance(config, dict) else config.to_dict())
        config.validate()
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={min_lr_ratio} must be in [0, 1]")
        if loss_chunk_tokens is not None and loss_chunk_tokens < 1:
            raise ValueError(f"loss_chunk_tokens={loss_chunk_tokens} must be >= 1 (or None for the plain loss)")
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"peak_flops={peak_flops} must be > 0 (or None)")
        if predict_task not in ("caption", "generate", "features"):
            raise ValueError(f"model.predict_task={predict_task!r}: must be 'caption', 'generate' or 'features'")
        check_feature_options(feature_modality, feature_pooling, key="model.feature_modality/feature_pooling")
        self.save_hyperparameters(ignore=["optimizer", "init_from"])
        self.hparams["config"] = config.to_dict()
        self.optimizer_factory: Callable[..., torch.optim.Optimizer] = optimizer or _default_optimizer
        self.model = M6Model(config)
        if init_from is not None:
            load_exported_weights(self.model, init_from)
        if compile_blocks:
            self.model.compile_blocks(**(compile_blocks if isinstance(compile_blocks, dict) else {}))
        self.val_nll = MeanMetric()
        self.val_acc = MeanMetric()
        self.test_nll = MeanMetric()
        self.test_acc = MeanMetric()
        self._batch_start: Optional[float] = None
        self._host_counts: tuple[int, int, int, int] = (0, 0, 0, 0)  # samples, text tokens, image patches, width
        self._window: deque[tuple[float, int, int, float]] = deque(maxlen=THROUGHPUT_WINDOW + 1)
        self._first_step_logged = False
        self._peak: Optional[float] = None
        self._bad_loss_step: Optional[Tensor] = None
        self._bad_loss_value: Optional[Tensor] = None
        self._bad_grad_step: Optional[Tensor] = None
        self._total_steps_cache: Optional[int] = None
        self.lr_multipliers: list[Callable[[int], float]] = []

    @property
    def config(self) -> M6Config:
        return self.model.config

    # ------------------------------------------------------------------ structure
    def sync_structure_hparams(self) -> None:
        """Copy the model's current structural state into hparams so the next checkpoint rebuilds this shape."""
        self.hparams["config"] = self.model.config.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Reshape the model to the checkpoint's structure before its weights load: its number of unique blocks
        (a delinked model), then each MoE block's expert shape (experts split, segmented or merged)."""
        from .model.experts import match_expert_shapes

        saved = checkpoint.get("hyper_parameters", {}).get("config", {})
        if not saved:
            return
        want = saved.get("num_unique_blocks")
        have = len(self.model.blocks)
        if want is not None and want != have:
            if want < have:
                raise ValueError(f"checkpoint has num_unique_blocks={want} but this model already has {have}; a "
                                 f"delinked model cannot be re-shared — build the module from the checkpoint's "
                                 f"config")
            delink(self.model, want)
            rank_zero_info(f"m6lit: rebuilt the model with {want} unique blocks to match the checkpoint")
        rebuilt = match_expert_shapes(self.model, saved.get("expert_overrides"))
        if rebuilt:
            rank_zero_info(f"m6lit: rebuilt the experts of blocks {rebuilt} to match the checkpoint")
        self.sync_structure_hparams()

    # ------------------------------------------------------------------ optimisation
    def build_param_groups(self) -> list[dict[str, Any]]:
        return build_param_groups(self.model, prefix="model.")

    def lr_factor(self, step: int) -> float:
        """Scheduled LR multiplier at optimizer step `step` (warmup + cosine, times any registered multipliers).

        The run's total step count is only looked up once the cosine phase needs it (never at step <= warmup), so
        building the scheduler inside `configure_optimizers` does not touch the train loader — asking Lightning for
        `estimated_stepping_batches` that early makes it rebuild the loader and lose a resumed loader position.
        """
        warmup = self.hparams.warmup_steps
        total = self._total_steps() if step > warmup else warmup
        factor = warmup_cosine(step, self.hparams.warmup_steps, total, self.hparams.min_lr_ratio)
        for extra in self.lr_multipliers:
            factor *= extra(step)
        return factor

    def refresh_lr(self) -> None:
        """Re-apply the schedule to the optimizer groups now (after a multiplier was added mid-fit)."""
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                           scheduler.lr_lambdas):
                    group["lr"] = base * fn(scheduler.last_epoch)

    def _total_steps(self) -> int:
        trainer = self._trainer
        if trainer is None:
            return 1
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        if self._total_steps_cache is None:
            self._total_steps_cache = int(trainer.estimated_stepping_batches)
        return self._total_steps_cache

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.build_param_groups())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ steps
    def forward(self, batch: dict[str, Tensor]) -> Any:
        return self.model(batch)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Host-side work on the batch before it moves: the token-id range check (free here, a sync on the
        device) and the counts behind tokens/s and MFU."""
        if isinstance(batch, dict) and isinstance(batch.get("input_ids"), Tensor):
            ids = batch["input_ids"]
            if ids.device.type == "cpu" and ids.numel():
                check_token_ids(ids, self.model.config.vocab_size)
            self._host_counts = self._count(batch)
        return batch

    def _count(self, batch: dict[str, Any]) -> tuple[int, int, int, int]:
        """(samples, valid text tokens, valid image patches, row width in positions), read without a device sync
        (from host tensors, else from shapes)."""
        ids = batch["input_ids"]
        rows, width = ids.shape
        mask = batch.get("attention_mask")
        text = int(mask.sum()) if isinstance(mask, Tensor) and mask.device.type == "cpu" else rows * width
        patches = 0
        if isinstance(batch.get("pixel_values"), Tensor):
            image_mask = batch.get("image_mask")
            image_rows = rows
            if isinstance(image_mask, Tensor) and image_mask.device.type == "cpu":
                image_rows = int(image_mask.sum())
            patches = image_rows * self.model.config.num_patches
            width += self.model.config.num_patches
        return rows, text, patches, width

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Optional[Tensor]:
        if "num_skipped" in batch:
            self.log("data/skipped_samples", batch["num_skipped"].float().sum(), reduce_fx="sum", batch_size=1)
        if batch["input_ids"].shape[0] == 0:
            # every sample of this batch was skipped as bad input (counted above). One device: no step (None).
            # Several: every rank must join the gradient all-reduce, so a zero loss over all trainable parameters.
            self._positions = 0
            if self._trainer is None or self.trainer.world_size == 1:
                return None
            return sum(p.sum() * 0 for p in self.parameters() if p.requires_grad)
        chunk = self.hparams.get("loss_chunk_tokens")
        if chunk:
            out = self.model(batch, compute_logits=False)
            lm = chunked_lm_loss(out.hidden[:, out.image_len:], self.model.lm_head.weight, batch["labels"], chunk)
        else:
            out = self.model(batch)
            lm = self._lm_loss(out.logits, batch)
        loss = lm + out.aux_loss
        self._record_finite(loss)
        if self._reads_metrics_now():
            self.check_finite_loss()
        bs = batch["input_ids"].shape[0]
        # not `prog_bar`: Lightning turns progress-bar values into Python numbers after every batch (a host sync);
        # M6ProgressBar shows the loss from the logged metrics, read on logging steps
        self.log("train/loss", lm, batch_size=bs)
        self.log("train/ppl", torch.exp(lm.detach()), batch_size=bs)
        if out.moe_stats:
            self.log("train/aux_loss", out.aux_loss, batch_size=bs)
            self.log("train/balance_loss", out.balance_loss, batch_size=bs)
            self.log("train/z_loss", out.z_loss, batch_size=bs)
        return loss

    # ------------------------------------------------------------------ non-finite loss guard
    def _record_finite(self, loss: Tensor) -> None:
        """Remember the first global step whose loss is non-finite, on the device (no sync)."""
        bad = ~torch.isfinite(loss.detach())
        if self._bad_loss_step is None or self._bad_loss_step.device != loss.device:
            self._bad_loss_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_loss_value = torch.zeros((), dtype=torch.float32, device=loss.device)
        first = bad & (self._bad_loss_step < 0)
        self._bad_loss_step = torch.where(first, self.global_step, self._bad_loss_step)
        self._bad_loss_value = torch.where(first, loss.detach().float(), self._bad_loss_value)

    def _reads_metrics_now(self) -> bool:
        """Whether Lightning logs this step's metrics (a sync then happens anyway)."""
        trainer = self._trainer
        return trainer is not None and trainer._logger_connector.should_update_logs

    def check_finite_loss(self) -> None:
        """Raise FloatingPointError naming the first step with a non-finite loss since training started (a host
        read of the device flag). Runs on logging steps before the backward, before every checkpoint is written
        and at the end of training; a non-finite loss between those reads gives non-finite gradients, which
        `on_before_optimizer_step` refuses before the optimizer steps."""
        if self._bad_loss_step is not None:
            step = int(self._bad_loss_step)
            if step >= 0:
                raise FloatingPointError(
                    f"non-finite training loss ({float(self._bad_loss_value)}) at global step {step}; stopping — "
                    f"the last saved checkpoint is untouched")
        if self._bad_grad_step is not None:
            step = int(self._bad_grad_step)
            if step >= 0:
                raise FloatingPointError(
                    f"non-finite gradient at global step {step}; the optimizer skipped that update; stopping — the "
                    f"last saved checkpoint is untouched")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite_loss()

    def on_train_end(self) -> None:
        self.check_finite_loss()

    # ------------------------------------------------------------------ throughput
    def _peak_flops(self) -> Optional[float]:
        if self._peak is None:
            peak = self.hparams.get("peak_flops")
            if peak is None and self.device.type == "cuda":
                name = torch.cuda.get_device_name(self.device).lower()
                if "h100" in name or "h200" in name:
                    peak = HOPPER_BF16_FLOPS
                else:
                    from lightning.fabric.utilities.throughput import get_available_flops

                    peak = get_available_flops(self.device, torch.bfloat16)
            self._peak = float(peak) if peak else 0.0
        return self._peak or None

    def _lm_loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Token-mean LM loss, or the per-task weighted loss with `task_loss_weights`. Each task's loss is logged
        on the steps whose metrics are read anyway (so logging adds no host sync)."""
        from .data.tasks import TASKS
        from .model.task_loss import per_task_loss

        given = self.hparams.get("task_loss_weights") or {}
        unknown = sorted(set(given) - set(TASKS))
        if unknown:
            raise ValueError(f"model.task_loss_weights: unknown task(s) {unknown}; tasks are {list(TASKS)}")
        logging_now = self._reads_metrics_now()
        if "task_ids" not in batch or not (given or logging_now):
            return lm_loss(logits, batch["labels"])
        weights = [float(given.get(t, 1.0)) for t in TASKS]
        if given:
            loss, means, counts = per_task_loss(logits, batch["labels"], batch["task_ids"], weights)
        else:
            loss = lm_loss(logits, batch["labels"])
            with torch.no_grad():
                _, means, counts = per_task_loss(logits.detach(), batch["labels"], batch["task_ids"], weights)
        if logging_now:
            for task, mean, count in zip(TASKS, means, counts.tolist()):
                if count > 0:
                    self.log(f"train/loss_{task}", mean, batch_size=int(count))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        samples, text, patches, width = self._host_counts
        flops = training_flops(self.model.config, text, patches, width)
        if self._batch_start is not None and not self._first_step_logged:
            self._first_step_logged = True
            first = now - self._batch_start
            self.log("train/first_step_sec", torch.tensor(first), batch_size=1)
            rank_zero_info(f"m6lit: first training step took {first:.1f} s"
                           + (" (torch.compile included)" if self.hparams.get("compile_blocks") else ""))
        self._window.append((now, text + patches, samples, flops))
        # rates over the last window of batches, from host clocks: the device queue evens out over a window, so
        # no sync is needed (values are host tensors, so logging them moves nothing to the device)
        if len(self._window) >= 2:
            elapsed = now - self._window[0][0]
            done = list(self._window)[1:]
        elif self._batch_start is not None:
            elapsed, done = now - self._batch_start, list(self._window)
        else:
            elapsed, done = 0.0, []
        if elapsed > 0:
            tokens = sum(d[1] for d in done) / elapsed
            self.log("train/tokens_per_sec", torch.tensor(tokens), prog_bar=True, batch_size=1)
            self.log("train/samples_per_sec", torch.tensor(sum(d[2] for d in done) / elapsed), batch_size=1)
            peak = self._peak_flops()
            if peak:
                mfu = sum(d[3] for d in done) / elapsed / peak
                self.log("train/mfu", torch.tensor(mfu), prog_bar=True, batch_size=1)
        optimizer = self.optimizers(use_pl_optimizer=False)
        if isinstance(optimizer, torch.optim.Optimizer):
            self.log("lr", torch.tensor(float(optimizer.param_groups[0]["lr"])), prog_bar=True, batch_size=1)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the global gradient norm and refuse to apply a step whose gradients are non-finite (the parameters,
        and so the last checkpoint, stay good).

        A strategy that already has the norm (`total_grad_norm()`, e.g. the offload strategy, whose offloaded
        gradients are not host tensors here) supplies it; otherwise it is computed here. With a fused Adam/AdamW
        the refusal happens on the device (`found_inf`: the update is skipped) and the step is named when the
        metrics are next read (logging steps, checkpoint writes, the end of training); with any other optimizer
        the norm is read on the host before every step."""
        strategy = getattr(getattr(self, "_trainer", None), "strategy", None)
        norm = strategy.total_grad_norm() if callable(getattr(strategy, "total_grad_norm", None)) else None
        from_strategy = norm is not None
        target = getattr(optimizer, "_optimizer", optimizer)
        if norm is None:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            if not grads:
                if hasattr(target, "found_inf"):
                    del target.found_inf
                return
            norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        self.log("train/grad_norm", norm, batch_size=1)
        if not from_strategy and skips_nonfinite_on_device(target):
            bad = ~torch.isfinite(norm.detach())
            target.found_inf = bad.to(torch.float32)
            if self._bad_grad_step is None or self._bad_grad_step.device != bad.device:
                self._bad_grad_step = torch.full((), -1, dtype=torch.long, device=bad.device)
            self._bad_grad_step = torch.where(bad & (self._bad_grad_step < 0), self.global_step,
                                              self._bad_grad_step)
            if self._reads_metrics_now():
                self.check_finite_loss()
            return
        if not bool(torch.isfinite(norm)):
            finder = getattr(strategy, "first_nonfinite_grad", None)
            bad_name = (finder() if callable(finder) else None) or next((name for name, p in self.named_parameters()
                        if p.grad is not None and not bool(torch.isfinite(p.grad).all())), "a gradient")
            raise FloatingPointError(
                f"non-finite gradient (first in {bad_name}) at global step {self.global_step}; stopping before the "
                f"optimizer step — the last saved checkpoint is untouched")

    def _eval_step(self, batch: dict[str, Tensor], nll_metric: MeanMetric, acc_metric: MeanMetric) -> None:
        out = self.model(batch)
        nll, count, correct = token_stats(out.logits, batch["labels"])
        if int(count) > 0:
            nll_metric.update(nll / count, weight=count)
            acc_metric.update(correct.float() / count, weight=count)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_nll, self.val_acc)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_nll, self.test_acc)

    def on_validation_epoch_start(self) -> None:
        self.val_nll.reset()
        self.val_acc.reset()

    def on_test_epoch_start(self) -> None:
        self.test_nll.reset()
        self.test_acc.reset()

    def _log_eval(self, stage: str, nll_metric: MeanMetric, acc_metric: MeanMetric) -> None:
        if nll_metric.update_count == 0:
            return
        nll = nll_metric.compute()
        self.log(f"{stage}/loss", nll, prog_bar=stage == "val")
        self.log(f"{stage}/ppl", torch.exp(nll))
        self.log(f"{stage}/token_acc", acc_metric.compute())
        nll_metric.reset()
        acc_metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", self.val_nll, self.val_acc)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test", self.test_nll, self.test_acc)

    def generate(self, batch: dict[str, Tensor], **overrides: Any) -> Tensor:
        """New tokens [B, n] continuing the batch's prompts (image + prompt tokens) with the module's decoding
        settings, through `m6lit.model.hf.generate_text` (transformers' `generate` on this very model); `overrides`
        are `transformers.GenerationConfig` fields (`max_new_tokens`, `do_sample`, `eos_token_id`, ...)."""
        hp = self.hparams
        settings: dict[str, Any] = dict(max_new_tokens=hp.max_new_tokens, do_sample=hp.do_sample)
        if overrides.get("do_sample", hp.do_sample):  # sampling settings only when sampling (transformers warns)
            settings.update(temperature=hp.temperature, top_p=hp.top_p, top_k=0)
        settings.update(overrides)
        return generate_text(self.model, batch, **settings)

    def setup(self, stage: str) -> None:
        """With an image tokenizer in the data module, check that it matches the model's image vocabulary."""
        image_codes = getattr(getattr(self._trainer, "datamodule", None), "image_codes", None)
        if image_codes is not None:
            from .model.image_vocab import ImageVocab

            vocab = ImageVocab.from_config(self.config)
            vocab.check_tokenizer(image_codes.codebook_size, image_codes.grid_size)
            if vocab.text_vocab_size != image_codes.text_vocab_size:
                raise ValueError(f"model.config.vocab_size={self.config.vocab_size} leaves {vocab.text_vocab_size} "
                                 f"text ids but data.tokenizer has {image_codes.text_vocab_size}")

    def generate_images(self, texts: list[str], **overrides: Any) -> dict[str, Tensor]:
        """Images for `texts` with the module's image sampling settings (the data module's tokenizers): returns
        `images` [B, 3, S, S] in [-1, 1], `codes`, `scores` (see `m6lit.model.image_generation.generate_images`)."""
        import copy

        from .data.tasks import PROMPTS
        from .model.image_generation import generate_images

        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        image_codes = getattr(datamodule, "image_codes", None)
        if image_codes is None:
            raise ValueError("image generation needs data.image_tokenizer (the data module has no image tokenizer)")
        tokenizer = datamodule.tokenizer
        if self.__dict__.get("_image_decoder") is None:
            # kept outside the module tree: the frozen tokenizer belongs to the data, not to checkpoints
            self.__dict__["_image_decoder"] = copy.deepcopy(image_codes.tokenizer)
        decoder = self.__dict__["_image_decoder"].to(self.device)

        def encode(text: str) -> list[int]:
            return list(tokenizer.encode(text, add_special_tokens=False))

        hp = self.hparams
        settings: dict[str, Any] = dict(guidance_scale=hp.image_guidance_scale, temperature=hp.image_temperature,
                                        top_k=hp.image_top_k, top_p=hp.image_top_p, num_candidates=hp.image_candidates)
        settings.update(overrides)
        marker = encode(PROMPTS["generate"])
        eos = int(tokenizer.eos_token_id)
        return generate_images(self.model, lambda codes: decoder.decode(codes).float(),
                               [marker + encode(t) for t in texts], marker,
                               rerank_prompt=encode(PROMPTS["caption"]),
                               rerank_captions=[encode(t) + [eos] for t in texts], **settings)

    def features(self, batch: dict[str, Any]) -> Tensor:
        """Pooled features [B, D] of a predict batch (its image and its text, `reference_ids`, without the EOS),
        with the module's `feature_modality` / `feature_pooling`; a row that lacks the chosen input names its
        sample."""
        text = batch["reference_ids"]
        mask = (text != self.config.pad_token_id) & (text != self.config.eos_token_id)
        try:
            return multimodal_features(self.model, text, mask, batch.get("pixel_values"), batch.get("image_mask"),
                                       modality=self.hparams.get("feature_modality", "joint"),
                                       pooling=self.hparams.get("feature_pooling", "mean"))
        except ValueError as err:
            origins = [s.get("origin") for s in batch.get("sources") or []]
            raise ValueError(f"{err} (samples of this batch: {origins})") from err

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        if self.hparams.get("predict_task", "caption") == "features":
            return {"features": self.features(batch)}
        if self.hparams.get("predict_task", "caption") == "generate":
            tokenizer = self.trainer.datamodule.tokenizer
            texts = tokenizer.batch_decode(batch["reference_ids"], skip_special_tokens=True)
            result = self.generate_images(texts)
            return {"prompts": texts, "images": result["images"], "scores": result["scores"]}
        tokens = self.generate(batch)
        result: dict[str, Any] = {"tokens": tokens}
        tokenizer = getattr(getattr(self._trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is not None:
            result["captions"] = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return result
