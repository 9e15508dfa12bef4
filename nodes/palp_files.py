"""PALP's files: the LoRA and embeddings it writes for the host's loaders, and its training checkpoint.

- ``loras/<name>.safetensors``: the host's generic LoRA keys (``LoraLoader`` reads it);
- ``embeddings/<name>.safetensors`` (and ``<name>_2`` for a second subject): one vector per text tower
  (``embedding:<name>`` in a prompt);
- ``output/palp/<name>.checkpoint.safetensors``: LoRA, tokens, Adam state and loss curves, to resume.
Every file carries the run's settings in its metadata and is written whole or not at all.
"""
from __future__ import annotations

import dataclasses
import os
import re

import torch
from safetensors import safe_open

import folder_paths

from ..guidance.palp import LoRAAdapter
from .files import save_atomic

FOLDER = "palp"                    # checkpoints, under the host's output folder
LORA_FORMAT = "comfyui-personalize.palp-lora/1"
CHECKPOINT_FORMAT = "comfyui-personalize.palp-checkpoint/1"


def _plain_name(save_name: str) -> str:
    name = save_name.strip().removesuffix(".safetensors")
    if not re.fullmatch(r"[\w\-][\w\-.]*", name):
        raise ValueError(f"save_name {save_name!r} is not a plain name: use letters, digits, '-', '_' and '.', "
                         "no spaces or folders (it is also the prompt word embedding:<name>).")
    return name


@dataclasses.dataclass
class Paths:
    lora: str
    embeddings: list[str]
    checkpoint: str

    @classmethod
    def of(cls, save_name: str, subjects: int) -> "Paths":
        name = _plain_name(save_name)
        names = [name] + [f"{name}_{i + 1}" for i in range(1, subjects)]
        return cls(os.path.join(folder_paths.get_folder_paths("loras")[0], name + ".safetensors"),
                   [os.path.join(folder_paths.get_folder_paths("embeddings")[0], n + ".safetensors") for n in names],
                   os.path.join(folder_paths.get_output_directory(), FOLDER, name + ".checkpoint.safetensors"))

    @property
    def results(self) -> list[str]:
        return [self.lora, *self.embeddings]


def lora_state_dict(adapters: dict[str, LoRAAdapter]) -> dict[str, torch.Tensor]:
    """The host's generic LoRA keys (``comfy.lora.model_lora_keys_unet``): ``<module>.lora_up/down.weight``, ``.alpha``."""
    out = {}
    for module, adapter in adapters.items():
        out[f"{module}.lora_up.weight"] = adapter.up
        out[f"{module}.lora_down.weight"] = adapter.down
        out[f"{module}.alpha"] = torch.tensor(adapter.alpha)
    return out


def write_checkpoint(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_atomic(tensors, path, {"format": CHECKPOINT_FORMAT, **metadata})


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], int]:
    """The tensors of a PALP checkpoint and the step it was saved at."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a PALP checkpoint: turn resume off.")
        return {k: f.get_tensor(k) for k in f.keys()}, int(metadata["palp_step"])


def write_results(paths: Paths, adapters: dict[str, LoRAAdapter], vectors: list[dict[str, torch.Tensor]],
                  metadata: dict[str, str]) -> None:
    """The LoRA for the host's ``LoraLoader`` and one embedding file per subject."""
    save_atomic(lora_state_dict(adapters), paths.lora, {"format": LORA_FORMAT, **metadata})
    for s, path in enumerate(paths.embeddings):
        save_atomic(vectors[s], path, metadata)
