"""The one error type of `m6lit export`: its message names the checkpoint, tokenizer, folder or Hub repo at fault."""

from __future__ import annotations


class ExportError(ValueError):
    """A checkpoint, tokenizer, output folder or Hub push that cannot be used; the message names the culprit."""
