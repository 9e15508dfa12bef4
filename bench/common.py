"""Shared set-up of the benchmarks: the real host in-process, this pack, and the models to time."""
from __future__ import annotations

import importlib.util
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_personalize"


def load(device: str):
    """Load the host (CPU unless ``device`` is cuda) through the test harness, and this pack under a fixed name."""
    sys.path.insert(0, str(ROOT / "tests" / "host"))
    import harness
    if device == "cpu":
        harness.load_host(tempfile.mkdtemp(prefix="bench-host-"))
    else:  # the harness pins --cpu; a GPU run loads the host itself
        import os
        sys.path.insert(0, os.environ["COMFYUI_PATH"])
        import utils.extra_config  # noqa: F401  (before nodes: see host notes §8)
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return sys.modules[PACKAGE]


def sd15_unet(device: str):
    """An SD1.5-size UNet (the host's SD15 config) with random weights, fp16 on a GPU: for speed and memory only."""
    import torch
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    config = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, in_channels=4,
                  out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                  transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                  transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768, adm_in_channels=None,
                  use_temporal_resblock=False, use_temporal_attention=False, num_heads=8, num_head_channels=-1)
    cfg = comfy.supported_models.SD15(config)
    dtype = torch.float16 if device == "cuda" else torch.float32
    cfg.set_inference_dtype(dtype, None)
    base = comfy.model_base.BaseModel(cfg, device=torch.device(device))
    with torch.no_grad():
        for p in base.diffusion_model.parameters():
            p.normal_(0, 0.02)
    base.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device(device), offload_device=torch.device("cpu"))


def interleaved(fns: dict, repeats: int) -> dict:
    """Median wall seconds of each callable, run in turn (A B A B …) so drift hits all alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
