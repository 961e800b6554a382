"""`m6lit export`: a Lightning checkpoint → a Hugging Face folder that loads with transformers alone.

    m6lit export --ckpt_path checkpoints/last.ckpt --output_dir exported/ [--config runs/config.yaml]
                 [--tokenizer DIR] [--max_shard_size 5GB] [--overwrite] [--push_to_hub USER/NAME [--private]]

The folder holds `config.json` (with `auto_map`), `model.safetensors` (sharded above `--max_shard_size`; no pickles),
`generation_config.json`, the processor (`processor_config.json`: m6lit's image preprocessing + the tokenizer files),
the model package's source as remote code and a `README.md` model card
whose figures come from the checkpoint. It is written to a hidden sibling directory and renamed into place when
complete, so an interrupted export never leaves a folder that looks finished. A pseudo (shared) model keeps its
sharing: each physical block is stored once and reloads shared.

`load_exported_weights` is the way back: it fills an `M6Model` from an exported folder (`model.init_from`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from safetensors.torch import load_file
from transformers import GenerationConfig, PreTrainedTokenizerBase

from . import __version__
from .data.tokenizer import load_tokenizer
from .model import M6Config, M6Model
from .model.hf import M6ForConditionalGeneration, M6HFConfig
from .model.processing import M6ImageProcessor, M6Processor
from .model.image_generation import IMAGE_TOKENIZER_FOLDER

# M6Config keys that change no parameter and not what the weights mean, so a fine-tuning run may set them freely
TRAINING_ONLY_KEYS = frozenset({"dropout", "balance_loss_coef", "z_loss_coef", "init_std"})
NO_METRICS = ("The checkpoint holds no validation metric (no `ModelCheckpoint` or `EarlyStopping` monitoring one), "
              "so none is reported here. Evaluate the model before relying on it.")
#: the transformers pipeline task the export runs under (transformers 5 folded "image-to-text" into it)
PIPELINE_TAG = "image-text-to-text"
#: PEFT `target_modules` that hit exactly the attention Linear layers (a bare "proj" would also hit the patch
#: embedding's Conv2d `embed.patches.proj`) and the dense FFN Linear layers (MoE experts are not Linear layers)
LORA_TARGETS = ("attn.qkv", "attn.proj")
LORA_DENSE_FFN_TARGETS = ("ffn.w_gate", "ffn.w_up", "ffn.w_down")
NO_DATA = ("The checkpoint does not record the training data (export with `--config` pointing at the run's "
           "config.yaml to list it here).")


class ExportError(ValueError):
    """A checkpoint, tokenizer, output folder or Hub push that cannot be used; the message names the culprit."""


# ---------------------------------------------------------------------------------------------------- checkpoint
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


# ---------------------------------------------------------------------------------------------------- tokenizer
def export_tokenizer(tokenizer: PreTrainedTokenizerBase, config: M6Config, origin: str) -> PreTrainedTokenizerBase:
    """Check that the tokenizer fits the model (ids within the vocabulary, same pad and EOS) and set left padding,
    which batched generation in transformers needs."""
    if len(tokenizer) > config.vocab_size:
        raise ExportError(f"tokenizer {origin} has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{config.vocab_size}; pass the tokenizer the model was trained with (--tokenizer)")
    for name in ("pad_token_id", "eos_token_id"):
        if getattr(tokenizer, name) != getattr(config, name):
            raise ExportError(f"tokenizer {origin} has {name}={getattr(tokenizer, name)} but the model config has "
                              f"{name}={getattr(config, name)}; pass the tokenizer the model was trained with")
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # what save_pretrained writes to tokenizer_config.json
    return tokenizer


# ---------------------------------------------------------------------------------------------------- model card
def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit} ({n:,})"
    return f"{n:,}"


def _git_revision() -> str | None:
    """The short commit of the m6lit source tree, when it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _data_lines(data: dict[str, Any] | None) -> list[str]:
    if not data:
        return [NO_DATA]
    lines = []
    for split in ("train", "val"):
        specs = data.get(split)
        if specs:
            shown = ", ".join(f"`{json.dumps(s, sort_keys=True)}`" for s in (specs if isinstance(specs, list)
                                                                            else [specs]))
            lines.append(f"- {split}: {shown}")
    lines.append(f"- tokenizer: `{data.get('tokenizer') or 'ByT5 (byte-level)'}`")
    return lines or ["The run's config lists no data sources."]


def model_card(model: M6Model, record: dict[str, Any], repo_name: str, data: dict[str, Any] | None = None,
               license_id: str | None = None, tokenizer_class: str = "ByT5Tokenizer") -> str:
    """README.md for the export: metadata header, architecture, parameters, sharing, experts, training, the
    checkpoint's own validation metrics (or a statement that it holds none), data, usage and limitations."""
    from huggingface_hub import ModelCardData

    c = model.config
    L, K = c.num_layers, len(model.blocks)
    moe_layers = [i for i in range(L) if c.is_moe_layer(i)]
    tags = ["m6", "m6lit", "custom_code", PIPELINE_TAG, "multimodal"]
    if moe_layers:
        tags.append("mixture-of-experts")
    card_data = ModelCardData(library_name="transformers", pipeline_tag=PIPELINE_TAG, tags=tags,
                              license=license_id)
    unique, compute = model.num_parameters(unique=True), model.num_parameters(unique=False)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    if K < L:
        sharing = (f"**pseudo**: {L} logical layers run on {K} physical blocks (layout `{c.sharing_layout}`); each "
                   f"block is stored once and reloads shared")
    else:
        sharing = f"**real**: every one of the {L} layers has its own block"
    if moe_layers:
        experts = (f"MoE FFN on layers {moe_layers}: {c.num_experts} SwiGLU experts (hidden {c.expert_hidden}), "
                   f"router `{c.router}` top-{c.top_k}, capacity "
                   f"{'dropless' if c.capacity_factor is None else f'factor {c.capacity_factor}'}")
    else:
        experts = "none (dense SwiGLU FFN in every layer)"
    delinks = record.get("delinks") or []
    if delinks:
        delink_text = "; ".join(f"after step {step} to {blocks} blocks" for step, blocks in delinks)
    elif K < L:
        delink_text = "none yet (exported as a pseudo model)"
    else:
        delink_text = "none recorded in the checkpoint"
    metrics = record.get("metrics") or []
    if metrics:
        metric_lines = ["| metric | value | which | recorded by |", "|---|---|---|---|"]
        metric_lines += [f"| `{name}` | {value:.4f} | {label} | {source} |" for name, label, value, source in metrics]
    else:
        metric_lines = [NO_METRICS]
    step = record.get("global_step")
    revision = _git_revision()
    transformers_version = f"transformers {transformers.__version__}"
    shared_lora = (f"\n  In this pseudo model a block's adapter serves every layer that shares the block ({L} layers, "
                   f"{K} blocks)." if K < L else "")
    version = f"{__version__}" + (f" (git {revision})" if revision else "")
    body = f"""
# {repo_name}

An M6-style multimodal prefix language model: image patches and text run through one transformer; the image and a
text prefix are bidirectional context and the rest of the text is generated left to right. Trained with m6lit
{version} and exported from a Lightning checkpoint.

## Model

| | |
|---|---|
| layers | {L} logical layers, d_model {c.d_model}, {c.n_heads} heads, FFN hidden {c.d_ff} |
| sharing | {sharing} |
| experts | {experts} |
| image input | {c.image_size}×{c.image_size} RGB in [-1, 1], {c.num_patches} patches of {c.patch_size}×{c.patch_size} |
| text | vocabulary {c.vocab_size}, at most {c.max_seq_len} positions including the image patches |
| unique parameters | {_count(unique)} (stored) |
| compute-equivalent parameters | {_count(compute)} (every logical layer counted with its block) |
| weights | {dtype}, safetensors |

## Training

- optimizer steps: {step if step is not None else "not recorded"} (epoch {record.get("epoch")})
- pseudo-to-real delink: {delink_text}
- Lightning {record.get("lightning_version") or "version not recorded"}

## Validation metrics (from the checkpoint)

{chr(10).join(metric_lines)}

## Data

{chr(10).join(_data_lines(data))}

## Usage

The folder carries its own model code; load it with `trust_remote_code=True` (pin a `revision` when loading from the
Hub) and transformers 5 (exported with {transformers_version}). Images go through the shipped processor
(`AutoProcessor`: m6lit's resize of the shorter side to {c.image_size}, centre crop, scaling to [-1, 1], and the
tokenizer); without text it prompts with `caption:`. Prompts are padded on the left and the whole prompt is
bidirectional context; a final EOS (which the tokenizer appends unless `add_special_tokens=False`) is dropped by
`generate`.

```python
from PIL import Image
from transformers import pipeline

captioner = pipeline("{PIPELINE_TAG}", model="{repo_name}", trust_remote_code=True)
print(captioner(images=Image.open("photo.jpg"), text="caption:", max_new_tokens=32, return_full_text=False))
```

```python
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

model = AutoModelForCausalLM.from_pretrained("{repo_name}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{repo_name}", trust_remote_code=True)
inputs = processor(images=[Image.open("photo.jpg")], text=["caption:"])
tokens = model.generate(**inputs, max_new_tokens=32)
print(processor.batch_decode(tokens[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

- Tokenizer only: `AutoTokenizer.from_pretrained("{repo_name}", trust_remote_code=True)`; or, without running any
  of the folder's code, `trust_remote_code=False` (the tokenizer is transformers' own
  `{tokenizer_class}`). Leaving `trust_remote_code` out makes transformers ask on the terminal, because
  it reads the model's config first.
- `AutoModel` loads the same class; `resize_token_embeddings` grows the embedding and the tied head together.
- accelerate: `init_empty_weights()` + `load_checkpoint_and_dispatch(model, "{repo_name}", device_map=...)` works
  as is (the head stays tied to the embedding).
- LoRA with PEFT: `target_modules={list(LORA_TARGETS)}` adapts exactly the attention projections (add
  `{list(LORA_DENSE_FFN_TARGETS)}` for the dense FFN layers; MoE experts are not `nn.Linear` and take no
  LoRA). Do not use a bare `"proj"`: it also matches the patch embedding's `Conv2d` (`embed.patches.proj`).{shared_lora}

Back into m6lit for fine-tuning: set `model.init_from: <this folder>` with the same `model.config`.

## Intended use and limitations

- Research on multimodal pretraining, captioning and generation in the domain of the training data above; it is
  not evaluated for safety, bias or factuality, and not meant for decisions about people.
- The only figures reported are those the checkpoint itself holds; quality outside the validation data is unknown.
- Prompts follow m6lit's task prefixes (`caption:`, `text:`, `denoise:`); other prompts are out of distribution.
- The model code ships with the weights (remote code); loaders that do not run it (vLLM, TGI, converters) cannot
  read this layout{", and a pseudo model's shared blocks in particular" if K < L else ""}.
"""
    return f"---\n{card_data.to_yaml()}\n---\n{body}"


# ---------------------------------------------------------------------------------------------------- writing
def _prepare_output(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"output_dir {str(output_dir)!r} is a file, not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ExportError(f"output_dir {str(output_dir)!r} is not empty; pass --overwrite to replace it")


def _publish(staging: Path, output_dir: Path) -> None:
    """Move the finished staging folder into place (replacing an old export only once the new one is complete)."""
    if output_dir.exists():
        retired = output_dir.with_name(f".{output_dir.name}.replaced-{uuid.uuid4().hex[:8]}")
        os.replace(output_dir, retired)
        os.replace(staging, output_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, output_dir)


def write_export(model: M6Model, output_dir: Path, tokenizer: PreTrainedTokenizerBase, card: str,
                 generation: GenerationConfig, max_shard_size: int | str = "5GB",
                 overwrite: bool = False, image_tokenizer: Any = None) -> Path:
    """Write the folder atomically: everything goes to a hidden sibling directory, renamed into place at the end."""
    output_dir = Path(output_dir).resolve()
    _prepare_output(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    mask = os.umask(0)
    os.umask(mask)
    staging.chmod(0o777 & ~mask)  # mkdtemp makes a private 0700 folder; the export is an ordinary one
    try:
        hf_model = M6ForConditionalGeneration.from_m6(model)
        hf_model.generation_config = generation
        hf_model.save_pretrained(staging, max_shard_size=max_shard_size)
        M6Processor(M6ImageProcessor(image_size=model.config.image_size), tokenizer).save_pretrained(staging)
        if image_tokenizer is not None:  # the frozen image tokenizer beside the model (`generate_images` reads it)
            image_tokenizer.save_pretrained(staging / IMAGE_TOKENIZER_FOLDER)
        (staging / "README.md").write_text(card, encoding="utf-8")
        pickles = sorted(p.name for p in staging.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        if pickles:
            raise ExportError(f"export would contain pickle files {pickles}")
        _publish(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def push_folder(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload a finished export with `huggingface_hub` (token from the environment or the login cache, never
    written anywhere); returns the repo URL. Any failure is an `ExportError` that says the local folder is complete."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload m6lit export")
    except Exception as err:
        raise ExportError(f"push to the Hub repo {repo_id!r} failed ({type(err).__name__}: {err}); the export in "
                          f"{str(folder)!r} is complete — upload it later with `hf upload {repo_id} {folder}`") from err
    return str(url)


def export_checkpoint(ckpt_path: str | os.PathLike[str], output_dir: str | os.PathLike[str],
                      tokenizer: str | None = None, run_config: str | os.PathLike[str] | None = None,
                      max_shard_size: int | str = "5GB", overwrite: bool = False,
                      push_to_hub: str | None = None, private: bool = False,
                      license_id: str | None = None, image_tokenizer: str | None = None) -> Path:
    """Checkpoint → Hugging Face folder (see the module docstring); every input is checked before anything is
    written. `run_config` is the run's config.yaml (data sources and tokenizer for the card); `tokenizer` overrides
    the tokenizer (default: the run config's, else ByT5)."""
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, origin=f"checkpoint {str(ckpt_path)!r}")
    data = None
    if run_config is not None:
        try:
            loaded = yaml.safe_load(Path(run_config).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ExportError(f"run config {str(run_config)!r} cannot be read: {err}") from err
        data = loaded.get("data") if isinstance(loaded, dict) else None
    tokenizer_path = tokenizer if tokenizer is not None else (data or {}).get("tokenizer")
    try:
        tok = load_tokenizer(tokenizer_path)
    except ValueError as err:
        raise ExportError(str(err)) from err
    tok = export_tokenizer(tok, model.config, repr(tokenizer_path) if tokenizer_path else "ByT5")
    hparams = ckpt["hyper_parameters"]
    sampling = {"do_sample": True, "temperature": float(hparams.get("temperature", 1.0)),
                "top_p": float(hparams.get("top_p", 1.0)), "top_k": 0} if hparams.get("do_sample") else {}
    generation = GenerationConfig(max_new_tokens=int(hparams.get("max_new_tokens", 32)), **sampling,
                                  pad_token_id=model.config.pad_token_id, eos_token_id=model.config.eos_token_id)
    vq = _image_tokenizer(model.config, image_tokenizer or (data or {}).get("image_tokenizer"))
    out = Path(output_dir).resolve()
    card = model_card(model, training_record(ckpt), push_to_hub or out.name, data, license_id, type(tok).__name__)
    out = write_export(model, out, tok, card, generation, max_shard_size, overwrite, vq)
    if push_to_hub:
        push_folder(out, push_to_hub, private)
    return out


def _image_tokenizer(config: M6Config, folder: str | None) -> Any:
    """The image tokenizer to export beside a model with image codes (checked against its config), else None."""
    if not config.image_codebook_size:
        return None
    if folder is None:
        raise ExportError("the model generates images (image_codebook_size="
                          f"{config.image_codebook_size}); pass its image tokenizer folder (--image_tokenizer, or "
                          f"--config with data.image_tokenizer)")
    from .model.image_tokenizer import load_image_tokenizer
    from .model.image_vocab import ImageVocab

    try:
        vq = load_image_tokenizer(folder, key="--image_tokenizer")
        ImageVocab.from_config(config).check_tokenizer(int(vq.config.num_embeddings), int(vq.config.num_patches),
                                                       where=f"image tokenizer {folder!r}")
    except ValueError as err:
        raise ExportError(str(err)) from err
    return vq


# ---------------------------------------------------------------------------------------------------- init_from
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


# ---------------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m6lit export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint written by an m6lit run")
    parser.add_argument("--output_dir", required=True, help="folder to create (must be empty unless --overwrite)")
    parser.add_argument("--config", dest="run_config", default=None,
                        help="the run's config.yaml: its data section (sources, tokenizer) goes into the model card")
    parser.add_argument("--tokenizer", default=None, help="local tokenizer folder (default: the run config's, "
                                                          "else ByT5)")
    parser.add_argument("--image_tokenizer", default=None, help="image tokenizer folder of a model that generates "
                        "images (default: the run config's data.image_tokenizer)")
    parser.add_argument("--max_shard_size", default="5GB", help="split model.safetensors above this size")
    parser.add_argument("--license", dest="license_id", default=None, help="license id for the card metadata")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="upload the folder to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of `m6lit export`; an `ExportError` exits with status 1 and its message, no traceback."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = export_checkpoint(args.ckpt_path, args.output_dir, tokenizer=args.tokenizer, run_config=args.run_config,
                                max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                                push_to_hub=args.push_to_hub, private=args.private, license_id=args.license_id,
                                image_tokenizer=args.image_tokenizer)
    except ExportError as err:
        raise SystemExit(f"m6lit export: error: {err}") from None
    print(f"exported {args.ckpt_path} to {out}" + (f" and pushed to {args.push_to_hub}" if args.push_to_hub else ""))
