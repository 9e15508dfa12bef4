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


def models(size: str, device: str):
    """``(MODEL, CLIP, VAE)``: the tiny SD1 model, or an SD1.5-size random-weight one (UNet fp16 on a GPU)."""
    import torch
    import tiny_models
    if size == "tiny":
        return tiny_models.tiny_sd1()
    return tiny_models.sd15_sized(torch.float16 if device == "cuda" else torch.float32)


def synchronized(device: str):
    """Decorator: wait for the GPU's queued work before returning, so wall times cover it."""
    def wrap(fn):
        def run(*args, **kwargs):
            out = fn(*args, **kwargs)
            if device == "cuda":
                import torch
                torch.cuda.synchronize()
            return out
        return run
    return wrap


def interleaved(fns: dict, repeats: int) -> dict:
    """Median wall seconds of each callable, run in turn (A B A B …) so drift hits all alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
