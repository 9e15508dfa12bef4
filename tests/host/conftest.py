"""Host tier: tests that run the real ComfyUI (the checkout at ``$COMFYUI_PATH``) in-process on CPU.

Without ``COMFYUI_PATH`` only ``test_host_tier.py`` is collected here and its test is skipped with
the reason, so the summary line of ``pytest tests -q`` says "1 skipped" and the line above it says
why (a test file named explicitly on the command line is still collected, and the ``host`` fixture
skips it too). With it, the host's requirements must be importable (``.ci/install`` puts them in),
and the host is loaded once per session (``harness.load_host``).
"""
import importlib.util
import os
import pathlib

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
NOT_RUN = "host tier not run: COMFYUI_PATH is unset (point it at a ComfyUI checkout, README 'Tests')"
# modules of the host's requirements.txt that loading the host imports first
HOST_MODULES = ("PIL", "yaml", "einops", "transformers", "torchsde", "aiohttp", "torchvision", "safetensors")

# the tiny pack is loaded by the host, never by pytest
collect_ignore = ["tinypack"]
if not COMFYUI_PATH:
    collect_ignore += [p.name for p in pathlib.Path(__file__).parent.glob("test_*.py") if p.name != "test_host_tier.py"]


def pytest_configure(config):
    if COMFYUI_PATH:
        missing = [m for m in HOST_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            raise pytest.UsageError(
                f"the host tier (COMFYUI_PATH={COMFYUI_PATH}) needs the host's requirements in this Python, "
                f"missing {', '.join(missing)}: run .ci/install with COMFYUI_PATH set (README 'Tests')")


def pytest_report_header(config):
    if not COMFYUI_PATH:
        return NOT_RUN
    return f"host tier (tests/host): ComfyUI at {COMFYUI_PATH}"


def pytest_terminal_summary(terminalreporter):
    if not COMFYUI_PATH:
        terminalreporter.write_line(NOT_RUN, yellow=True, bold=True)


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """The real host, loaded once with every folder it writes under a session tmp dir (``harness.Host``)."""
    if not COMFYUI_PATH:
        pytest.skip(NOT_RUN)
    import harness
    import torch

    # the tiny models gain nothing from intra-op threads, and with another process on the cores
    # OpenMP spin-waiting made a 2-thread tiny UNet forward 150x slower (4.1 s vs 0.026 s)
    torch.set_num_threads(1)
    loaded = harness.load_host(tmp_path_factory.mktemp("comfyui"), COMFYUI_PATH)
    assert loaded.tinypack_loaded, f"the host could not import tests/host/tinypack:\n{loaded.tinypack_log}"
    return loaded


@pytest.fixture(scope="session")
def tiny(host):
    """The ``tiny_models`` module; it imports the host, so it is only importable once ``host`` is loaded."""
    import tiny_models

    return tiny_models


@pytest.fixture(scope="session")
def pack(host):
    """The pack as the host imported it (it names a package module after its path): ``pack("nodes.sampling")``."""
    import importlib

    root = str(host.pack_path).replace(".", "_x_")
    return lambda name=None: importlib.import_module(f"{root}.{name}" if name else root)


@pytest.fixture(scope="session")
def sd1_nodes(host, pack, tiny):
    """The tiny SD1 model, CLIP and VAE with the pack's node modules and an ``encode`` as CLIPTextEncode does."""
    import types

    model, clip, vae = tiny.tiny_sd1()
    return types.SimpleNamespace(cap=pack("nodes.capture"), pnd=pack("nodes.pnd"), lnr=pack("nodes.lnr"),
                                 inv=pack("nodes.inversion"), model=model, clip=clip, vae=vae, tiny=tiny,
                                 encode=lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text)))
