"""Files the pack writes: always whole or not at all."""
from __future__ import annotations

import os

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
