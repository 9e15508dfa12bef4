"""PALP's files: the LoRA and embeddings it writes for the host's loaders, and its training checkpoint.

- ``loras/<name>.safetensors``: the host's generic LoRA keys (``LoraLoader`` reads it);
- ``embeddings/<name>.safetensors`` (and ``<name>_2`` for a second subject): one vector per text tower
  (``embedding:<name>`` in a prompt);
- ``output/palp/<name>.checkpoint.safetensors``: LoRA, tokens, Adam state and loss curves, to resume an
  unfinished run; removed once the run's results are written.
Every file is written whole or not at all and carries in its metadata what made it: the run's settings
and fingerprints of its inputs (subject images, MODEL, CLIP, VAE). A re-queued run whose settings and
inputs all match reuses the files, as the host's cache would reuse the node's outputs; one that differs
is told what differs (``stale``), and so is a resume from another run's checkpoint (``read_checkpoint``).
A file of a result's name without PALP's settings in its metadata is someone else's and is never replaced.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re

import torch
from safetensors import safe_open

import folder_paths

from ..guidance.palp import LoRAAdapter
from .files import Unreadable, read_metadata, save_atomic
from .inversion import _digest, _sample, model_fingerprint

FOLDER = "palp"                    # checkpoints, under the host's output folder
LORA_FORMAT = "comfyui-personalize.palp-lora/1"
CHECKPOINT_FORMAT = "comfyui-personalize.palp-checkpoint/1"
# what each recorded input is called when a re-queued run's differs
INPUT_LABELS = {"images": "subject images", "images_2": "second subject's images", "model": "model",
                "clip": "CLIP", "vae": "VAE"}


def _plain_name(save_name: str) -> str:
    name = save_name.strip().removesuffix(".safetensors")
    if not re.fullmatch(r"[\w\-][\w\-.]*", name):
        raise ValueError(f"save_name {save_name!r} is not a plain name: use letters, digits, '-', '_' and '.', "
                         "no spaces or folders (it is also the prompt word embedding:<name>).")
    return name


@dataclasses.dataclass
class Paths:
    name: str
    lora: str
    embeddings: list[str]
    checkpoint: str

    @classmethod
    def of(cls, save_name: str, subjects: int) -> "Paths":
        name = _plain_name(save_name)
        names = [name] + [f"{name}_{i + 1}" for i in range(1, subjects)]
        return cls(name, os.path.join(folder_paths.get_folder_paths("loras")[0], name + ".safetensors"),
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


def read_checkpoint(path: str, settings: dict, inputs: dict) -> tuple[dict[str, torch.Tensor], int]:
    """The tensors of this run's PALP checkpoint and the step it was saved at.

    Refused when the checkpoint was made with other settings or inputs (``settings`` and ``inputs`` as for
    ``stale``; only ``steps`` may differ, a larger one continuing the same run) or is past ``steps``. One at
    exactly ``steps`` holds a complete training whose results were never written (earlier versions saved a
    Cancel honoured at the last step's progress update so): resuming it writes them, training nothing.
    """
    metadata = _metadata(path, "turn resume off to start again.")
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a PALP checkpoint: turn resume off.")
    if "palp_inputs" not in metadata:
        raise ValueError(f"{path} was written by an older version of this pack, which did not record the run's "
                         "inputs, so it cannot be checked against this run: turn resume off (with overwrite on) to "
                         "start again.")
    step = int(metadata["palp_step"])
    found = differences(metadata, {key: value for key, value in settings.items() if key != "steps"}, inputs)
    if found:
        raise ValueError(f"{path} is from a run with different {', '.join(found)} (the checkpoint's vs this run's), "
                         "so resuming it would train neither run: set those back to continue it, or turn resume off "
                         "(with overwrite on) to start again with these.")
    if step > settings["steps"]:
        raise ValueError(f"{path} is at step {step}, past this run's {settings['steps']} steps: raise steps to "
                         f"{step} or more to continue it, or turn resume off to start again.")
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, step


def write_results(paths: Paths, adapters: dict[str, LoRAAdapter], vectors: list[dict[str, torch.Tensor]],
                  metadata: dict[str, str], curves: dict[str, list[float]]) -> None:
    """The LoRA for the host's ``LoraLoader`` (with the loss curves, for a re-queue) and one embedding per subject;
    then the run's checkpoint is removed."""
    save_atomic(lora_state_dict(adapters), paths.lora,
                {"format": LORA_FORMAT, **metadata, "palp_curves": json.dumps(curves)})
    for s, path in enumerate(paths.embeddings):
        save_atomic(vectors[s], path, metadata)
    # a finished run's checkpoint has nothing left to resume; kept, a later run could take it for its own
    with contextlib.suppress(FileNotFoundError):
        os.remove(paths.checkpoint)


def read_curves(path: str) -> dict[str, list[float]]:
    """The loss curves stored with a LoRA file this node wrote (a re-queue's loss plot)."""
    return json.loads(read_metadata(path)["palp_curves"])


# --- what made a run ----------------------------------------------------------------------------


def image_digest(images: torch.Tensor) -> str:
    h = hashlib.sha256(repr(tuple(images.shape)).encode())
    h.update(images.detach().float().cpu().contiguous().numpy().tobytes())
    return "#" + h.hexdigest()[:16]


def patcher_digest(patcher) -> str:
    """A hash of a ModelPatcher's weights (sampled as the inversion fingerprint samples them) and weight patches."""
    h = hashlib.sha256()
    for key, (original, *patches) in sorted(patcher.get_key_patches().items()):
        h.update(f"{key}:{tuple(original[0].shape)};".encode())
        h.update(_sample(original[0]).numpy().tobytes())
        _digest(h, patches)
    return "#" + h.hexdigest()[:16]


def run_inputs(model, clip, vae, images: list[torch.Tensor]) -> dict:
    """Fingerprints of everything a run reads besides its settings (cheap: no weight is hashed whole)."""
    inputs = {"images" if s == 0 else f"images_{s + 1}": image_digest(x) for s, x in enumerate(images)}
    return {**inputs, "model": model_fingerprint(model), "clip": patcher_digest(clip.patcher),
            "vae": patcher_digest(vae.patcher)}


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value)


def _metadata(path: str, todo: str) -> dict[str, str]:
    """A safetensors file's metadata; a ValueError naming the file and saying ``todo`` when it cannot be read."""
    try:
        return read_metadata(path)
    except Unreadable as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): {todo}") from None


def differences(metadata: dict[str, str], settings: dict, inputs: dict) -> list[str]:
    """What the file of ``metadata`` was made with that differs from ``settings`` and ``inputs``, in words."""
    made_with = json.loads(metadata.get("palp_settings", "{}"))
    made_from = json.loads(metadata.get("palp_inputs", "{}"))
    found = [f"{key} ({_shown(made_with.get(key))} vs {_shown(value)})"
             for key, value in settings.items() if made_with.get(key) != value]
    for key, value in inputs.items():
        old = made_from.get(key)
        if old != value:        # the model's fingerprint is a dict: name the fields that differ
            fields = [k for k in value if old.get(k) != value[k]] if isinstance(old, dict) else []
            found.append(INPUT_LABELS.get(key, key) + (f" ({', '.join(fields)})" if fields else ""))
    return found


def stale(paths: Paths, settings: dict, inputs: dict) -> list[str]:
    """What the result files were made with that differs from this run, in words; [] when they are this run's.

    ``settings`` and ``inputs`` are as ``Settings.metadata`` records them (JSON-normal: lists, not tuples).
    A result's file that PALP did not write (no PALP settings in its metadata, or not readable: PALP writes
    whole files) is refused, never compared: overwrite must not replace someone else's LoRA or embedding.
    """
    not_ours = "choose another save_name, or move that file out of its folder; PALP never replaces it."
    found = []
    for path in paths.results:
        if not os.path.exists(path):
            found.append(f"{os.path.basename(path)} missing")
            continue
        metadata = _metadata(path, "PALP writes its files whole, so this one is not PALP's: " + not_ours)
        if "palp_settings" not in metadata:
            raise ValueError(f"{path} was not made by PALP (its metadata holds no PALP settings): " + not_ours)
        found += differences(metadata, settings, inputs)
    return list(dict.fromkeys(found))
