"""Tokenizer loading: ByT5 default offline, local directories, pad/EOS checks, sentinel lookup."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from m6lit.data.tokenizer import load_tokenizer, sentinel_ids


def _word_tokenizer(tmp_path: Path, eos: bool, extra: list[str]) -> Path:
    """Save a tiny word-level tokenizer (with or without EOS, with ``extra`` special tokens) and return its dir."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "</s>": 2, "hello": 3, "world": 4}
    for token in extra:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"eos_token": "</s>"} if eos else {}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", additional_special_tokens=extra, **kwargs
    )
    directory = tmp_path / ("tok_eos" if eos else "tok_no_eos")
    tokenizer.save_pretrained(directory)
    return directory


def test_default_is_byt5_offline_with_pad_and_eos() -> None:
    tokenizer = load_tokenizer()
    assert len(tokenizer) == 384
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1


@pytest.mark.parametrize(
    "text", ["a large red circle in the top left", "左上角有一个大的红色圆形", "mixed 中文 & English!"]
)
def test_default_round_trips_english_and_chinese(text: str) -> None:
    tokenizer = load_tokenizer()
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_byt5_sentinels_distinct_in_vocab_and_not_special() -> None:
    tokenizer = load_tokenizer()
    ids = sentinel_ids(tokenizer)
    assert len(ids) == 125
    assert len(set(ids)) == len(ids)
    assert all(0 <= i < len(tokenizer) for i in ids)
    assert not {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id} & set(ids)
    assert tokenizer.convert_ids_to_tokens(ids[:2]) == ["<extra_id_0>", "<extra_id_1>"]


def test_local_directory_loads_and_matches(tmp_path: Path) -> None:
    load_tokenizer().save_pretrained(tmp_path / "byt5")
    local = load_tokenizer(str(tmp_path / "byt5"))
    assert local.encode("圆形 circle") == load_tokenizer().encode("圆形 circle")


def test_missing_directory_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="nope"):
        load_tokenizer(str(missing))


def test_tokenizer_without_eos_is_rejected_naming_the_path(tmp_path: Path) -> None:
    directory = _word_tokenizer(tmp_path, eos=False, extra=[])
    with pytest.raises(ValueError, match=r"tok_no_eos.*no eos"):
        load_tokenizer(str(directory))


def test_other_tokenizer_sentinels_come_from_additional_special_tokens(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(str(_word_tokenizer(tmp_path, eos=True, extra=["<mask_a>", "<mask_b>"])))
    assert tokenizer.convert_ids_to_tokens(sentinel_ids(tokenizer)) == ["<mask_a>", "<mask_b>"]


def test_no_sentinels_is_a_clear_error(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(str(_word_tokenizer(tmp_path, eos=True, extra=[])))
    with pytest.raises(ValueError, match="sentinel"):
        sentinel_ids(tokenizer)
