"""Reading a Lightning checkpoint for export: the file (or a distributed-checkpoint folder), the `M6Model` it
describes with its weights, and what it records about its run (steps, delinks, monitored validation metrics)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from m6lit.export.errors import ExportError
from m6lit.model import M6Config, M6Model


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a Lightning checkpoint on CPU with `weights_only=True` — a file, or the folder a distributed checkpoint
    (FSDP2, `save_distributed_checkpoint`) writes; clear errors for a missing or unreadable one."""
    path = Path(path)
    if path.is_dir() and (path / "meta.pt").is_file():
        ckpt = _read_distributed_checkpoint(path)
    elif not path.is_file():
        raise ExportError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = ckpt if path.is_dir() else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ExportError(f"checkpoint {str(path)!r} cannot be read ({type(err).__name__}: {err}); is it a complete "
                          f"Lightning checkpoint?") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ExportError(f"checkpoint {str(path)!r} has no 'state_dict'; not a Lightning checkpoint")
    if "config" not in ckpt.get("hyper_parameters", {}):
        raise ExportError(f"checkpoint {str(path)!r} has no hyper_parameters['config'] (the model config); was it "
                          f"saved by m6lit's M6LitModule?")
    return ckpt


def _read_distributed_checkpoint(folder: Path) -> dict[str, Any]:
    """A Lightning distributed-checkpoint folder as one checkpoint dict: the shards consolidated with torch's own
    `dcp_to_torch_save` (through a temporary file) plus the `meta.pt` Lightning writes beside them."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix="m6lit-dcp-") as tmp:
        out = Path(tmp) / "shards.pt"
        try:
            dcp_to_torch_save(folder, out)
            shards = torch.load(out, map_location="cpu", weights_only=True)
            meta = torch.load(folder / "meta.pt", map_location="cpu", weights_only=True)
        except Exception as err:
            raise ExportError(f"distributed checkpoint {str(folder)!r} cannot be read ({type(err).__name__}: "
                              f"{err})") from err
    return {**meta, "state_dict": shards.get("state_dict", {})}


def model_from_checkpoint(ckpt: dict[str, Any], origin: str = "checkpoint") -> M6Model:
    """The `M6Model` a checkpoint describes, with its weights (the module's `model.` entries, loaded strictly)."""
    try:
        config = M6Config.from_dict(dict(ckpt["hyper_parameters"]["config"])).validate()
    except (TypeError, ValueError) as err:
        raise ExportError(f"{origin}: hyper_parameters['config'] is not a valid M6Config: {err}") from err
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    with torch.device("meta"):
        model = M6Model(config)
    missing = sorted(set(model.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise ExportError(f"{origin}: the weights do not match hyper_parameters['config'] — missing {missing[:8]}, "
                          f"unexpected {unexpected[:8]}")
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.tokens.weight
    unset = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unset:
        raise ExportError(f"{origin}: no values for {unset[:8]} in the checkpoint")
    return model.eval()


def training_record(ckpt: dict[str, Any]) -> dict[str, Any]:
    """What the checkpoint says about its run: steps, epoch, delink events and monitored validation metrics."""
    record: dict[str, Any] = {"global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch"),
                              "lightning_version": ckpt.get("pytorch-lightning_version"), "delinks": [],
                              "metrics": []}
    for key, state in (ckpt.get("callbacks") or {}).items():
        if not isinstance(state, dict):
            continue
        name = str(key)
        if name.startswith("PseudoToReal"):
            record["delinks"] = [(int(step), int(blocks)) for step, blocks in state.get("done", [])]
        elif name.startswith("ModelCheckpoint") and state.get("monitor"):
            for label, value in (("best", state.get("best_model_score")), ("at this checkpoint",
                                                                          state.get("current_score"))):
                if value is not None:
                    record["metrics"].append((str(state["monitor"]), label, float(value), "ModelCheckpoint"))
        elif name.startswith("EarlyStopping") and state.get("best_score") is not None:
            monitor = _state_key_field(name, "monitor")
            if monitor:
                record["metrics"].append((monitor, "best", float(state["best_score"]), "EarlyStopping"))
    seen: set[tuple[str, str, float]] = set()
    unique = []
    for metric in record["metrics"]:
        if metric[:3] not in seen and math.isfinite(metric[2]):
            seen.add(metric[:3])
            unique.append(metric)
    record["metrics"] = unique
    return record


def _state_key_field(state_key: str, field: str) -> str | None:
    """A field of a Lightning callback state key such as "EarlyStopping{'monitor': 'val/loss', 'mode': 'min'}"."""
    marker = f"'{field}': '"
    if marker not in state_key:
        return None
    return state_key.split(marker, 1)[1].split("'", 1)[0]
