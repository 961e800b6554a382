"""Where and with what a benchmark's numbers were measured: one stamp for every script's JSON.

The git revision is read from the checkout; a copy of the tree without its history (a remote GPU machine) passes the
revision it was copied from in `M6LIT_GIT_REV` (the run then says so).
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def git_revision() -> str:
    """`<sha>` of the checkout, `+dirty` when tracked files differ from it; `M6LIT_GIT_REV` wins when set."""
    given = os.environ.get("M6LIT_GIT_REV")
    if given:
        return f"{given} (M6LIT_GIT_REV)"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def stamp() -> dict[str, Any]:
    """Git revision, torch and CUDA versions, device name, host cores and the UTC time."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return {"git_rev": git_revision(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
            "device": device, "host": platform.node(), "host_cores": os.cpu_count(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
