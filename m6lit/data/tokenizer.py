"""Tokenizer loading for m6lit.

The default is the byte-level ByT5 tokenizer: it needs no download, covers English and Chinese alike
(UTF-8 bytes), and ships 125 ``<extra_id_N>`` sentinels for T5-style span denoising. Any local Hugging Face
tokenizer directory can replace it, provided it defines pad and EOS tokens.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase

__all__ = ["load_tokenizer", "sentinel_ids"]


def load_tokenizer(name_or_path: str | None = None) -> PreTrainedTokenizerBase:
    """Load the ByT5 byte tokenizer (``None``) or a local Hugging Face tokenizer directory, offline.

    Raises ``ValueError`` naming the path when the directory is missing, cannot be loaded, or lacks a pad or
    EOS token (the batch contract pads with one and ends every target with the other).
    """
    if name_or_path is None:
        tokenizer: PreTrainedTokenizerBase = ByT5Tokenizer()
        where = "ByT5Tokenizer()"
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise ValueError(
                f"tokenizer {name_or_path!r}: not a local directory; m6lit loads tokenizers offline "
                "(save one with `tokenizer.save_pretrained(dir)`), or pass null for the built-in ByT5 tokenizer"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"tokenizer {name_or_path!r}: cannot be loaded: {err}") from err
        where = repr(name_or_path)
    missing = [name for name in ("pad", "eos") if getattr(tokenizer, f"{name}_token_id") is None]
    if missing:
        raise ValueError(
            f"tokenizer {where} has no {' and no '.join(missing)} token; m6lit needs both "
            "(pad fills batches, EOS ends every target). Add them and save the tokenizer again."
        )
    return tokenizer


def sentinel_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the sentinel tokens used by span denoising, in order (sentinel 0 first).

    T5-family tokenizers (ByT5 included) provide ``<extra_id_0>``, ``<extra_id_1>``, …; any other tokenizer's
    extra/additional special tokens are used otherwise, minus pad/EOS/BOS/UNK. Raises ``ValueError`` when there
    are none, since span denoising cannot mark dropped spans without them.
    """
    unk = tokenizer.unk_token_id
    vocab = len(tokenizer)
    ids: list[int] = []
    while True:
        token_id = tokenizer.convert_tokens_to_ids(f"<extra_id_{len(ids)}>")
        if token_id is None or token_id == unk or not 0 <= token_id < vocab:
            break
        ids.append(token_id)
    if ids:
        return ids
    reserved = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, unk}
    extra = getattr(tokenizer, "extra_special_tokens", None) or getattr(tokenizer, "additional_special_tokens", None)
    tokens = list(extra.values()) if isinstance(extra, dict) else list(extra or [])
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(str(token))
        if token_id is not None and token_id not in reserved and token_id not in ids and 0 <= token_id < vocab:
            ids.append(token_id)
    if not ids:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '')!r}) has no sentinel "
            "tokens (<extra_id_N> or additional special tokens) for span denoising; add some, or set the "
            "denoise weight of task_mix to 0"
        )
    return ids
