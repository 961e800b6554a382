"""The model card (README.md) of an export: metadata header, architecture, sharing, experts, training record, the
checkpoint's own metrics, data, usage snippets and limitations. The usage snippets live here and nowhere else."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import transformers

from m6lit import __version__
from m6lit.model import M6Model

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
`generate`. `model.generate` is transformers' own generate (greedy, sampling, beam search), the same path m6lit uses
for its captions; a model that also generates images never emits an image id in text.

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
- Features for tagging and retrieval: `model.get_multimodal_features(input_ids=..., attention_mask=...,
  pixel_values=..., modality="joint")` gives one vector of {c.d_model} per sample (`modality="image"` or `"text"`
  reads one input only; `pooling="mean"` over valid positions, or a position index), the same vectors as
  `m6lit predict` with `model.predict_task: features` when the text is tokenized with `add_special_tokens=False`
  (m6lit reads a text without its EOS).
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
