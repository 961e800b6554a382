"""Writing an export folder atomically (a hidden sibling directory renamed into place when complete, so an
interrupted export never leaves a folder that looks finished) and pushing a finished one to the Hugging Face Hub."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from transformers import GenerationConfig, PreTrainedTokenizerBase

from m6lit.export.errors import ExportError
from m6lit.model import M6Model
from m6lit.model.hf import M6ForConditionalGeneration
from m6lit.model.image_generation import IMAGE_TOKENIZER_FOLDER
from m6lit.model.processing import M6ImageProcessor, M6Processor


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
