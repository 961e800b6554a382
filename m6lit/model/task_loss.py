"""Per-task language-model loss: each task's token-mean cross-entropy, then a weighted mean over the tasks present.

A token-mean over the whole batch lets long targets (144-256 image codes) swamp short ones (a 40-70 token caption);
averaging per task first gives every task the weight it was given, whatever its target length.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .m6 import IGNORE_INDEX

__all__ = ["per_task_loss"]


def per_task_loss(logits: Tensor, labels: Tensor, task_ids: Tensor, weights: Sequence[float]) -> tuple[
        Tensor, Tensor, Tensor]:
    """(weighted loss, per-task mean losses [n], per-task target-token counts [n]) for `n = len(weights)` tasks.

    Labels are aligned with the inputs (shifted here, as in `lm_loss`); `task_ids` [B] index `weights`. Tasks with no
    target token in the batch get loss 0 and drop out of the weighted mean; a batch without targets gives 0.
    """
    n = len(weights)
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="none").view(targets.shape)  # [B, T-1]
    valid = (targets != IGNORE_INDEX).float()
    onehot = F.one_hot(task_ids, n).float()  # [B, n]
    sums = onehot.t() @ (nll * valid).sum(1)  # [n]
    counts = onehot.t() @ valid.sum(1)  # [n]
    means = sums / counts.clamp(min=1)
    w = torch.tensor(list(weights), dtype=means.dtype, device=means.device) * (counts > 0)
    return (w * means).sum() / w.sum().clamp(min=1e-12), means, counts
