"""`init_from`: filling an `M6Model` with the weights of a folder written by `m6lit export` (fine-tuning from an
export). Pure model code: torch, safetensors and the model's own HF config class; no Lightning."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from .hf import M6ForConditionalGeneration, M6HFConfig
from .m6 import M6Model

# M6Config keys that change no parameter and not what the weights mean, so a fine-tuning run may set them freely
TRAINING_ONLY_KEYS = frozenset({"dropout", "balance_loss_coef", "z_loss_coef", "init_std"})


def load_exported_weights(model: M6Model, path: str | os.PathLike[str]) -> None:
    """Fill `model` with the weights of an exported folder (fine-tuning from an export).

    The export's config must equal `model.config` except for training-only keys (`TRAINING_ONLY_KEYS`) and
    `num_unique_blocks`, which may be larger in `model` when it refines the export's sharing: a pseudo export then
    starts a real (delinked) model, each new block a copy of the block its layers shared. Anything else is a
    `ValueError` naming every key that differs.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"init_from={str(folder)!r}: no config.json there; expected a folder written by `m6lit export`")
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as err:
        raise ValueError(f"init_from={str(folder)!r}: config.json cannot be read: {err}") from err
    if model_type != M6HFConfig.model_type:
        raise ValueError(f"init_from={str(folder)!r}: config.json has model_type={model_type!r}, not "
                         f"{M6HFConfig.model_type!r}")
    try:
        exported = M6HFConfig.from_pretrained(folder).to_m6_config()
    except (OSError, TypeError, ValueError) as err:
        raise ValueError(f"init_from={str(folder)!r}: config.json is not an M6 config: {err}") from err
    mine, theirs = model.config.to_dict(), exported.to_dict()
    differ = [k for k in sorted(set(mine) | set(theirs))
              if k not in TRAINING_ONLY_KEYS | {"num_unique_blocks"} and mine.get(k) != theirs.get(k)]
    if differ:
        detail = "; ".join(f"{k}: model.config={mine.get(k)!r}, export={theirs.get(k)!r}" for k in differ)
        raise ValueError(f"init_from={str(folder)!r}: the exported config disagrees with model.config on {differ} "
                         f"({detail}); set model.config to the export's values")
    source_block = _block_sources(model.layer_to_block, exported.layer_to_block(), folder)
    state = _read_weights(folder)
    prefix = M6ForConditionalGeneration.base_model_prefix + "."
    weights: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not key.startswith(prefix):
            raise ValueError(f"init_from={str(folder)!r}: unexpected weight {key!r} (not under {prefix!r})")
        weights[key[len(prefix):]] = tensor
    def source_key(key: str) -> str:
        parts = key.split(".")
        if parts[0] == "blocks":
            parts[1] = str(source_block[int(parts[1])])
        elif key == "lm_head.weight" and model.config.tie_embeddings:
            return "embed.tokens.weight"
        return ".".join(parts)

    expected = model.state_dict()
    sources = {key: source_key(key) for key in expected}
    missing = sorted(key for key, source in sources.items() if source not in weights)
    unexpected = sorted(set(weights) - set(sources.values()))
    if missing or unexpected:
        raise ValueError(f"init_from={str(folder)!r}: the weights do not match the config — missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    mismatched = [k for k, s in sources.items() if tuple(weights[s].shape) != tuple(expected[k].shape)]
    if mismatched:
        raise ValueError(f"init_from={str(folder)!r}: shape mismatch for {mismatched[:8]}")
    with torch.no_grad():
        for key, tensor in model.state_dict(keep_vars=True).items():
            tensor.copy_(weights[sources[key]])


def _block_sources(new_map: Sequence[int], old_map: Sequence[int], folder: Path) -> dict[int, int]:
    """For each block of the model, the exported block its layers used (all of them must have used the same one)."""
    source: dict[int, int] = {}
    for layer, (new, old) in enumerate(zip(new_map, old_map)):
        if source.setdefault(new, old) != old:
            raise ValueError(f"init_from={str(folder)!r}: the model's sharing ({len(set(new_map))} blocks) does not "
                             f"refine the export's ({len(set(old_map))} blocks) at layer {layer}; use the export's "
                             f"num_unique_blocks or a multiple of it with the same sharing_layout")
    return source


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an export's safetensors file or shards."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"init_from={str(folder)!r}: no model.safetensors (or index) found")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            state.update(load_file(folder / name))
        except Exception as err:
            raise ValueError(f"init_from={str(folder)!r}: cannot read {name} ({type(err).__name__}: {err})") from err
    return state
