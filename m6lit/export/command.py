"""`m6lit export`: a Lightning checkpoint → a Hugging Face folder that loads with transformers alone.

    m6lit export --ckpt_path checkpoints/last.ckpt --output_dir exported/ [--config runs/config.yaml]
                 [--tokenizer DIR] [--max_shard_size 5GB] [--overwrite] [--push_to_hub USER/NAME [--private]]

The folder holds `config.json` (with `auto_map`), `model.safetensors` (sharded above `--max_shard_size`; no pickles),
`generation_config.json`, the processor (`processor_config.json`: m6lit's image preprocessing + the tokenizer files),
the model package's source as remote code and a `README.md` model card
whose figures come from the checkpoint. It is written to a hidden sibling directory and renamed into place when
complete, so an interrupted export never leaves a folder that looks finished. A pseudo (shared) model keeps its
sharing: each physical block is stored once and reloads shared.

`m6lit.model.exported_weights.load_exported_weights` is the way back: it fills an `M6Model` from an exported folder
(`model.init_from`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from transformers import GenerationConfig, PreTrainedTokenizerBase

from m6lit.data.tokenizer import load_tokenizer
from m6lit.export.card import model_card
from m6lit.export.checkpoint import load_checkpoint, model_from_checkpoint, training_record
from m6lit.export.errors import ExportError
from m6lit.export.folder import push_folder, write_export
from m6lit.model import M6Config


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
    from m6lit.model.image_tokenizer import load_image_tokenizer
    from m6lit.model.image_vocab import ImageVocab

    try:
        vq = load_image_tokenizer(folder, key="--image_tokenizer")
        ImageVocab.from_config(config).check_tokenizer(int(vq.config.num_embeddings), int(vq.config.num_patches),
                                                       where=f"image tokenizer {folder!r}")
    except ValueError as err:
        raise ExportError(str(err)) from err
    return vq


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
