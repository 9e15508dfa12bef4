"""Files the pack writes: always whole or not at all."""
from __future__ import annotations

import os

from safetensors import safe_open
from safetensors.torch import save_file


def save_atomic(tensors: dict, path: str, metadata: dict) -> None:
    """Write through a temp file and ``os.replace``: a reader never sees half a file, a failure leaves none."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temp = f"{path}.{os.getpid()}.tmp"
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, temp, metadata=metadata)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


class Unreadable(Exception):
    """A file that is empty, cut short or not safetensors; its message is the reader's reason, in one line."""


def first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:160]


def read_metadata(path: str) -> dict[str, str]:
    """A safetensors file's metadata without its tensors; ``Unreadable`` when the file cannot be read."""
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:   # safetensors raises its own error type for an empty, truncated or foreign file
        raise Unreadable(first_line(e)) from None
