"""Atomic checkpoint writes: a kill during a save leaves the previous checkpoint loadable.

Lightning's default `TorchCheckpointIO` buffers the checkpoint in memory and writes it through an fsspec
transaction whose temporary file lives in the system temp dir; when that is another filesystem the final step is a
copy, not a rename, and an interruption can leave a truncated file under the real name. Here the temporary file
sits next to the target (same filesystem), is flushed and fsynced, then `os.replace`d over it. The file gets the
permissions of a normally created file (0666 minus the umask), not `mkstemp`'s private 0600.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_torch_save(obj: Any, path: "str | os.PathLike[str]") -> None:
    """torch.save to a temporary sibling file, fsync, then rename over `path`; on failure nothing changes."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are atomic (temporary sibling file + rename); remote paths fall back
    to Lightning's own transactional write."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        fs = get_filesystem(path)
        if not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint does not take storage_options")
        atomic_torch_save(checkpoint, path)
