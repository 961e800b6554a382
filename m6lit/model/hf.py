"""Hugging Face wrappers: `M6HFConfig` and `M6ForConditionalGeneration` around the pure-PyTorch `M6Model`.

This file and its siblings ship as remote code with every export, so it imports only torch, transformers and the
sibling model files (relative imports). The config carries every `M6Config` field flat in `config.json`; the model's
state dict is `M6Model`'s under the prefix `model.`, so a pseudo (shared) model stores each physical block once and
reloads with the same sharing.

Generation runs through transformers' own `generate` (greedy, sampling, beam search) with a `DynamicCache`: one
cache entry per logical layer, the image patches held at the front of the cache after the first step. Prompts must
be left-padded (as for any decoder-only model in transformers; `left_pad` turns m6lit's right-padded batches into
such prompts). This is m6lit's only text generation: `M6LitModule.generate` runs it through `from_m6`, which wraps
the training model without copying it. By default the whole prompt is bidirectional context; pass `prefix_len` to
change that. The forward is `M6Model.forward`, which takes the transformers cache itself.
The config's `auto_map` names the model for `AutoModelForCausalLM`, `AutoModel` and `AutoModelForImageTextToText`
(the "image-text-to-text" pipeline, with the processor of `processing.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    GenerationMixin,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as hf_init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .config import M6Config
from .image_vocab import ImageVocab, mask_image_ids
from .features import multimodal_features
from .m6 import M6Model, left_pad, lm_loss, text_positions
from .processing import M6ImageProcessor, M6Processor

# transformers reads generation settings (top_k, temperature, ...) from a model config and refuses to save a config
# that holds them, so an M6 field with such a name is stored under another key: MoE top-k under the name
# transformers' MoE models use, any other clash with an "m6_" prefix
_GENERATION_KEYS = set(GenerationConfig._get_default_generation_params())
_RENAMED = {"top_k": "num_experts_per_tok"}
CONFIG_KEYS: dict[str, str] = {
    f.name: _RENAMED.get(f.name, f"m6_{f.name}" if f.name in _GENERATION_KEYS else f.name)
    for f in dataclasses.fields(M6Config)
}
# the Auto classes that load the model: `register_for_auto_class` records one of them (the first), the config's
# `auto_map` repeats it for the others, so `AutoModel` and the "image-text-to-text" pipeline find the model too
MODEL_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModel", "AutoModelForImageTextToText")


# transformers >= 5.20 names the output's cache `cache`, earlier 5.x releases `past_key_values`
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(MoeCausalLMOutputWithPast)} else \
    "past_key_values"

class M6HFConfig(PreTrainedConfig):
    """Transformers config of an M6 model: every `M6Config` field as a top-level attribute (validated on creation;
    `top_k` is stored as `num_experts_per_tok`, see `CONFIG_KEYS`), plus the standard aliases (`hidden_size`,
    `num_hidden_layers`, ...) that transformers' utilities look for."""

    model_type = "m6"
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "d_model",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "n_heads",
        "intermediate_size": "d_ff",
        "max_position_embeddings": "max_seq_len",
        "tie_word_embeddings": "tie_embeddings",
    }

    def __init__(self, use_cache: bool = True, **kwargs: Any) -> None:
        m6 = M6Config.from_dict({name: kwargs.pop(key) for name, key in CONFIG_KEYS.items() if key in kwargs})
        for name, value in m6.validate().to_dict().items():
            setattr(self, CONFIG_KEYS[name], value)
        self.use_cache = use_cache
        super().__init__(**kwargs)

    @classmethod
    def from_m6_config(cls, config: M6Config, **kwargs: Any) -> M6HFConfig:
        """The transformers config of an `M6Config`."""
        return cls(**{CONFIG_KEYS[name]: value for name, value in config.to_dict().items()}, **kwargs)

    def to_m6_config(self) -> M6Config:
        """The `M6Config` this config describes (a fresh, validated copy)."""
        return M6Config.from_dict({name: getattr(self, key) for name, key in CONFIG_KEYS.items()}).validate()

    def to_diff_dict(self) -> dict[str, Any]:
        """Every M6 field is written to config.json, defaults included, so an export never depends on the defaults
        of the code that reads it."""
        out = super().to_diff_dict()
        out.update({CONFIG_KEYS[name]: value for name, value in self.to_m6_config().to_dict().items()})
        return _with_all_model_classes(out)

    def to_dict(self) -> dict[str, Any]:
        return _with_all_model_classes(super().to_dict())


def _with_all_model_classes(config: dict[str, Any]) -> dict[str, Any]:
    """`auto_map` with every class of `MODEL_AUTO_CLASSES` pointing at the model save_pretrained recorded."""
    auto_map = config.get("auto_map")
    if isinstance(auto_map, dict) and MODEL_AUTO_CLASSES[0] in auto_map:
        config["auto_map"] = {**auto_map, **{name: auto_map[MODEL_AUTO_CLASSES[0]] for name in MODEL_AUTO_CLASSES}}
    return config


class M6ForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """`M6Model` as a transformers causal LM over image patches and text (loss, logits over text positions, KV cache).

    Batches follow m6lit's contract: `input_ids`/`attention_mask` [B, T], optional `pixel_values` [B, C, H, W],
    `prefix_len` [B] (text tokens, counted from each row's first valid one, that are bidirectional context; default
    0 in `forward`, the whole prompt in `generate`) and `image_mask` [B]. `labels` are aligned with `input_ids` (shifted inside, -100 ignored); the loss
    is the LM loss plus the weighted MoE aux loss, as in m6lit training.
    """

    config_class = M6HFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules: ClassVar[list[str]] = ["TransformerBlock"]
    _tied_weights_keys: ClassVar[dict[str, str]] = {"model.lm_head.weight": "model.embed.tokens.weight"}

    def __init__(self, config: M6HFConfig) -> None:
        super().__init__(config)
        self.model = M6Model(config.to_m6_config())
        self.post_init()
        self._tie_head()

    def _tie_head(self) -> None:
        """Share the LM head with the token embedding when the config ties them. `post_init` ties through
        `setattr`, which accelerate's `init_empty_weights` intercepts to give every registered parameter a fresh meta
        tensor, so the tie would be lost and `load_checkpoint_and_dispatch` could not fill the head; writing the
        parameter table directly keeps the tie in any context."""
        m6 = self.model
        if self.config.tie_word_embeddings and m6.lm_head.weight is not m6.embed.tokens.weight:
            m6.lm_head._parameters["weight"] = m6.embed.tokens.weight

    @classmethod
    def from_m6(cls, model: M6Model, **config_kwargs: Any) -> M6ForConditionalGeneration:
        """Wrap an existing `M6Model` (its parameters, not copies) without allocating or initialising new weights."""
        config = M6HFConfig.from_m6_config(model.config, **config_kwargs)
        with torch.device("meta"):
            wrapper = cls(config)
        wrapper.model = model
        return wrapper

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """M6's own initialisation; transformers marks the parameters it loaded, and the guard leaves those alone so
        only weights missing from a checkpoint are initialised."""
        with hf_init.guard_torch_init_functions():
            self.model.init_weights()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed.tokens

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed.tokens = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def set_output_embeddings(self, new_embeddings: torch.nn.Module) -> None:
        self.model.lm_head = new_embeddings

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> torch.nn.Embedding:
        """transformers' resize (embedding, head, `config.vocab_size`), keeping `M6Model.config` in step."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        self.model.config = self.config.to_m6_config()
        self._tie_head()
        return embeddings

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                pixel_values: Tensor | None = None, prefix_len: Tensor | None = None,
                image_mask: Tensor | None = None, labels: Tensor | None = None, cache: Cache | None = None,
                past_key_values: Cache | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, **kwargs: Any) -> MoeCausalLMOutputWithPast | tuple:
        """`M6Model.forward` with transformers' arguments: logits over the text positions of `input_ids`; with a
        non-empty `cache`, `input_ids` are the new tokens and `attention_mask` covers the whole text so far
        (`past_key_values` is the older name of `cache`)."""
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = bool(self.config.use_cache) and labels is None
        cache = (cache if cache is not None else DynamicCache(config=self.config)) if use_cache else None
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                 "prefix_len": prefix_len, "image_mask": image_mask}
        out = self.model({k: v for k, v in batch.items() if v is not None}, cache=cache)
        loss = lm_loss(out.logits, labels) + out.aux_loss if labels is not None else None
        result = MoeCausalLMOutputWithPast(loss=loss, aux_loss=out.aux_loss, logits=out.logits,
                                           **{_CACHE_FIELD: cache})
        return result.to_tuple() if return_dict is False else result

    def prepare_inputs_for_generation(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """transformers' inputs for each step, always with the attention mask of the text so far: `generate` drops
        an all-ones mask, but `M6Model.forward` reads from it how much of its cache is text and how much image."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, inputs: Tensor | None = None, generation_config: GenerationConfig | None = None,
                 **kwargs: Any) -> Any:
        """transformers' `generate` with m6lit's defaults: the whole (left-padded) prompt is bidirectional context
        unless `prefix_len` says otherwise, a prompt's final EOS is dropped (see `drop_final_eos`), and a
        right-padded batch or a too-long request fails up front."""
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        mask = kwargs.get("attention_mask")
        if input_ids is not None:
            inputs = None
            input_ids, mask = drop_final_eos(input_ids, mask, self.config.eos_token_id, self.config.pad_token_id)
            kwargs["input_ids"] = input_ids
            if mask is not None:
                kwargs["attention_mask"] = mask
            b, t = input_ids.shape
            if mask is not None and bool((mask[:, -1] == 0).any()):
                raise ValueError("generate: attention_mask has padding in its last column (right padding); pad "
                                 "prompts on the left for transformers' generate (tokenizer.padding_side='left')")
            if kwargs.get("prefix_len") is None:
                kwargs["prefix_len"] = (mask.long().sum(1) if mask is not None
                                        else torch.full((b,), t, dtype=torch.long, device=input_ids.device))
            config = generation_config if generation_config is not None else self.generation_config
            max_new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
            if max_new is not None:
                p = self.model.embed.patches.num_patches if kwargs.get("pixel_values") is not None else 0
                if p + t + max_new > self.config.max_seq_len:
                    raise ValueError(f"generate: {p} image patches + {t} prompt positions + max_new_tokens={max_new} "
                                     f"exceeds max_seq_len={self.config.max_seq_len}")
        if self.config.image_codebook_size:  # text generation never emits an image id
            text_only = TextOnly(ImageVocab.from_config(self.model.config))
            kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), text_only])
        return super().generate(inputs, generation_config, **kwargs)

    @torch.no_grad()
    def get_multimodal_features(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                                pixel_values: Tensor | None = None, image_mask: Tensor | None = None,
                                modality: str = "joint", pooling: str | int = "mean") -> Tensor:
        """Pooled features [B, D] for tagging and retrieval, the same as m6lit's `predict_task: features`: the
        whole input is bidirectional context, and the final hidden states of the `modality` ("joint", "image" or
        "text") are mean-pooled over valid positions (`pooling="mean"`) or taken at one position (an index)."""
        return multimodal_features(self.model, input_ids, attention_mask, pixel_values, image_mask, modality,
                                   pooling)

    @torch.no_grad()
    def generate_images(self, prompts: list[str], tokenizer: Any, image_tokenizer: Any = None,
                        guidance_scale: float = 3.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        num_candidates: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """Images [B, 3, S, S] in [-1, 1] for text `prompts` (transformers alone: no m6lit import needed).

        `tokenizer`: the export's tokenizer (`AutoTokenizer.from_pretrained(folder)`); `image_tokenizer`: a
        `transformers.JanusVQVAE` (default: the export's `image_tokenizer/` folder). Sampling: classifier-free
        guidance scale, temperature (0 = greedy), top-k, top-p; `num_candidates` samples per prompt, the best kept by
        the model's own caption likelihood. Convert with `((images + 1) * 127.5).round().clamp(0, 255).byte()`.
        """
        import os

        from .image_generation import CAPTION_PROMPT, GENERATE_PROMPT, IMAGE_TOKENIZER_FOLDER, generate_images

        if image_tokenizer is None:
            from transformers import JanusVQVAE

            image_tokenizer = JanusVQVAE.from_pretrained(os.path.join(self.name_or_path, IMAGE_TOKENIZER_FOLDER))
        image_tokenizer = image_tokenizer.to(self.device).eval()

        def encode(text: str) -> list[int]:
            return list(tokenizer.encode(text, add_special_tokens=False))

        marker = encode(GENERATE_PROMPT)
        self.model.eval()
        result = generate_images(self.model, lambda codes: image_tokenizer.decode(codes).float(),
                                 [marker + encode(p) for p in prompts], marker, num_candidates=num_candidates,
                                 rerank_prompt=encode(CAPTION_PROMPT),
                                 rerank_captions=[encode(p) + [int(tokenizer.eos_token_id)] for p in prompts],
                                 guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                                 generator=generator)
        return result["images"]


def generate_text(model: M6Model, batch: Mapping[str, Tensor], **generation: Any) -> Tensor:
    """New tokens [B, n] (n <= max_new_tokens; pad after a row's EOS) continuing the prompts of an m6lit batch
    (`input_ids`, `attention_mask` padded on either side, optional `prefix_len`, `pixel_values`, `image_mask`):
    transformers' `generate` on `M6ForConditionalGeneration.from_m6(model)` — the same parameters, nothing copied —
    with the prompts left-padded. `generation`: `GenerationConfig` fields (`max_new_tokens`, `do_sample`,
    `eos_token_id`, `use_cache`, ...); EOS and pad default to the model config's. Call `model.eval()` first."""
    c = model.config
    config = GenerationConfig(**{"eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id, **generation})
    temperature, top_p = config.temperature, config.top_p
    bad_top_p = top_p is not None and not 0 < top_p <= 1
    if config.do_sample and ((temperature is not None and temperature <= 0) or bad_top_p):
        raise ValueError(f"generate: temperature={temperature} must be > 0 and top_p={top_p} in (0, 1] when sampling")
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    input_ids, attention_mask = left_pad(batch["input_ids"], mask, c.pad_token_id)
    extra = {key: batch[key] for key in ("prefix_len", "pixel_values", "image_mask") if batch.get(key) is not None}
    tokens = M6ForConditionalGeneration.from_m6(model).generate(input_ids=input_ids, attention_mask=attention_mask,
                                                                generation_config=config, **extra)
    return tokens[:, input_ids.shape[1]:]


class TextOnly(LogitsProcessor):
    """Keeps text generation inside the text vocabulary: begin/end-of-image and image codes get -inf (a model
    that also generates images; `generate` adds it by itself)."""

    def __init__(self, vocab: ImageVocab) -> None:
        self.vocab = vocab

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        return mask_image_ids(scores, self.vocab)


def drop_final_eos(input_ids: Tensor, attention_mask: Tensor | None, eos_token_id: int | None,
                   pad_token_id: int) -> tuple[Tensor, Tensor | None]:
    """Left-padded prompts [B, T] without a final EOS, same width. A tokenizer called with its defaults (ByT5's,
    T5's) ends every text with EOS, but an M6 prompt is a prefix to continue, never a finished text (m6lit never
    trains on an EOS inside the prefix; after one the model predicts only more EOS). A row ending with EOS moves
    one column right over it, gaining one left padding column, so `tokens[:, prompt_width:]` is still the new
    text."""
    if eos_token_id is None or input_ids.shape[1] == 0:
        return input_ids, attention_mask
    ends = input_ids[:, -1] == eos_token_id
    if attention_mask is not None:
        ends &= attention_mask[:, -1].bool()
    if not bool(ends.any()):
        return input_ids, attention_mask
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    shifted_ids = torch.cat([torch.full_like(input_ids[:, :1], pad_token_id), input_ids[:, :-1]], dim=1)
    shifted_mask = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1)
    ids = torch.where(ends[:, None], shifted_ids, input_ids)
    mask = torch.where(ends[:, None], shifted_mask, mask)
    empty = (~mask.bool().any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"generate: prompt rows {empty} hold nothing but EOS; pass at least one prompt token "
                         f"(m6lit's task prompts are 'caption:', 'text:', 'denoise:')")
    return ids, mask


def register_auto_classes() -> None:
    """Make "m6" known to the Auto classes in this process (no remote code needed): config, model (as
    `AutoModelForCausalLM`, `AutoModel` and `AutoModelForImageTextToText`), image processor and processor."""
    AutoConfig.register(M6HFConfig.model_type, M6HFConfig, exist_ok=True)
    for auto in (AutoModelForCausalLM, AutoModel, AutoModelForImageTextToText):
        auto.register(M6HFConfig, M6ForConditionalGeneration, exist_ok=True)
    AutoImageProcessor.register(M6HFConfig, M6ImageProcessor, exist_ok=True)
    AutoProcessor.register(M6HFConfig, M6Processor, exist_ok=True)


# `save_pretrained` then copies this file and its sibling imports next to the weights and writes `auto_map`, so the
# export loads with `trust_remote_code=True` wherever transformers and torch are installed
M6HFConfig.register_for_auto_class()
M6ForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["CONFIG_KEYS", "MODEL_AUTO_CLASSES", "M6ForConditionalGeneration", "M6HFConfig", "TextOnly",
           "drop_final_eos", "generate_text", "left_pad", "register_auto_classes", "text_positions"]
