"""Shared set-up of the benchmarks: the real host in-process, this pack, and the models to time."""
from __future__ import annotations

import argparse
import contextlib
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
    harness.load_host(tempfile.mkdtemp(prefix="bench-host-"), device=device)
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return sys.modules[PACKAGE]


def models(size: str, device: str, weights: str | None = None):
    """``(MODEL, CLIP, VAE)``: the tiny SD1 model, or an SD1.5-size random-weight one; the UNet's weights in
    ``weights`` (default: fp16 on a GPU, fp32 on the CPU)."""
    import torch
    import tiny_models
    dtype = getattr(torch, weights) if weights else torch.float16 if device == "cuda" else torch.float32
    if size == "tiny":
        return tiny_models.tiny_sd1(dtype=dtype)
    return tiny_models.sd15_sized(dtype)


@contextlib.contextmanager
def patched(module, name: str, value):
    """``module.name`` is ``value`` inside (a benchmark's variant of the pack's code)."""
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def inverting_in(inv, dtype):
    """NullTextInvert (module ``inv``) with its worker computing in ``dtype`` instead of fp32 (``gradient_model``'s
    compute dtype: every UNet pass, gradient passes included, without the fp32 upcast); the null embedding stays fp32."""
    original = inv.gradient_model
    return patched(inv, "gradient_model", lambda model, _fp32: original(model, dtype))


@contextlib.contextmanager
def tf32_matmuls():
    """fp32 matrix products on TF32 tensor cores inside (CUDA: fp32's range, a 10-bit mantissa for the products'
    inputs, fp32 accumulation; cuDNN's convolutions use TF32 by default already, the host leaves both flags alone)."""
    import torch
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


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


def parser(repeats: int, res: int | None = 128) -> argparse.ArgumentParser:
    """The options every benchmark shares; ``res`` None: the script picks a default per size."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--res", type=int, default=res, help="image side in pixels")
    ap.add_argument("--size", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads")
    ap.add_argument("--weights", choices=["float32", "float16", "bfloat16"],
                    help="the UNet's stored dtype (default: fp16 on a GPU, fp32 on the CPU)")
    return ap


def start(args) -> None:
    """Load the host and this pack, and set the CPU threads."""
    load(args.device)
    cpu_threads(args.device, args.threads)


def cpu_threads(device: str, threads: int) -> None:
    """On the CPU, compute with ``threads`` threads (1 by default: OpenMP spin-waiting beside other processes
    distorts timings, and process CPU time then measures the work alone)."""
    if device == "cpu":
        import torch
        torch.set_num_threads(threads)


def clock(device: str, threads: int = 1):
    """The clock a benchmark reads: this process's CPU time on one CPU thread (what other processes on a
    shared machine do not inflate), wall time otherwise (a GPU's work, or several threads' spinning)."""
    return time.process_time if device == "cpu" and threads == 1 else time.perf_counter


def timed(fns: dict, repeats: int, now=time.perf_counter) -> dict:
    """Seconds of each callable per repeat (by the clock ``now``), run in turn (A B A B …) so drift hits all alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = now()
            fn()
            times[name].append(now() - start)
    return times


def ratio_stats(times: dict, name: str, base: str) -> tuple[float, float]:
    """(min, median) over repeats of ``times[name][k] / times[base][k]``: each ratio from one A B pair."""
    ratios = [a / b for a, b in zip(times[name], times[base])]
    return min(ratios), statistics.median(ratios)


def min_median(values) -> tuple[float, float]:
    return min(values), statistics.median(values)


def emit(bench: str, rows: list[dict]) -> None:
    """One machine-readable line for ``run_all.py``: each row a figure with its ``goal`` (text) and values."""
    import json
    print(RESULT_TAG + json.dumps({"bench": bench, "rows": rows}))


RESULT_TAG = "BENCH-RESULT "
