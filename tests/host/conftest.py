"""Host tier: tests that run the real ComfyUI (the checkout at ``$COMFYUI_PATH``) in-process on CPU.

Without ``COMFYUI_PATH`` nothing in this directory is collected, so the core tier runs alone;
a test file named explicitly on the command line is still collected, and the ``host`` fixture
skips it. With it, the host is loaded once per session (``harness.load_host``).
"""
import os

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")

# the tiny pack is loaded by the host, never by pytest
collect_ignore = ["tinypack"]
if not COMFYUI_PATH:
    collect_ignore_glob = ["*"]


def pytest_report_header(config):
    if not COMFYUI_PATH:
        return "host tier (tests/host): not collected, COMFYUI_PATH is unset"
    return f"host tier (tests/host): ComfyUI at {COMFYUI_PATH}"


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """The real host, loaded once with every folder it writes under a session tmp dir (``harness.Host``)."""
    if not COMFYUI_PATH:
        pytest.skip("COMFYUI_PATH is unset: the host tier needs a ComfyUI checkout")
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
