"""Catch copies from the CPU to the compute device inside per-layer patches, without a GPU.

On a GPU such a copy (a Python list used as an index, a cached CPU tensor moved with ``.to``) waits for
the device's queue to drain: one stall per layer and pass. Run the patch on the ``meta`` device inside
:class:`CpuToDevice`; every call that turns host data into a device tensor is recorded.
"""
import torch
from torch.utils._pytree import tree_flatten

_MAKERS = {torch.tensor, torch.as_tensor}


def _has_list_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, (list, tuple)) for p in parts)


class CpuToDevice(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        inputs = {t.device.type for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        outputs = {t.device.type for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)}
        on_device = (inputs | outputs) - {"cpu"}
        if func in _MAKERS and outputs - {"cpu"}:
            self.seen.append(f"{name} from host data")
        elif name == "__getitem__" and on_device and _has_list_index(args[1]):
            self.seen.append("index with a Python list")
        elif "cpu" in inputs and on_device:
            self.seen.append(f"{name}: a CPU tensor meets {sorted(on_device)}")
        return out
