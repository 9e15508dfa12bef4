"""The host tier's gate. Without ``COMFYUI_PATH`` this is the only host-tier file collected, and its test
is skipped with the reason, so ``pytest tests -q`` ends with "1 skipped" and says why (see conftest)."""
import pathlib
import re


def test_the_host_is_a_comfyui_the_pack_declares_it_needs(host):
    """pyproject's ``requires-comfyui`` (what ComfyUI Manager and the registry enforce) holds for the host under test."""
    pyproject = (pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    needed = re.search(r'requires-comfyui\s*=\s*">=([\d.]+)"', pyproject).group(1)
    version = re.search(r'__version__\s*=\s*"([\d.]+)"', (host.root / "comfyui_version.py").read_text()).group(1)
    as_tuple = lambda v: tuple(int(p) for p in v.split("."))
    assert as_tuple(version) >= as_tuple(needed), f"host ComfyUI {version}, the pack requires >= {needed}"
