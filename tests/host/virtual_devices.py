"""A CPU-only stand-in for a GPU run: every tensor carries the device it *would* be on, and an op that
mixes two devices fails as it would on CUDA ("Expected all tensors to be on the same device").

The host's model is given ``COMPUTE`` = ``cpu:0`` as its load device (:func:`on_compute`), which is a
real CPU device, so every number is computed exactly as in a plain CPU run. Under :class:`VirtualDevices`
each tensor is tagged with the device it was asked to be on:

- ``.to(device)``, ``.to(tensor)``, ``.cpu()`` and factory functions with ``device=`` tag their result with
  that device (``.cpu()`` and ``.to("cpu")`` give ``HOST``, the CPU of a GPU machine); a factory without a
  device gives ``HOST`` (torch's default), a ``*_like`` / ``new_*`` its source's device, a gradient its
  input's;
- any other op's result takes its inputs' device; inputs on two devices raise :class:`MixedDevices`. As
  on CUDA, a 0-dim ``HOST`` tensor mixes with anything, as do index tensors and ``copy_``;
- ``tensor.device`` answers the tag, so code that writes ``device=x.device`` follows ``x``;
- tensors made outside the mode (model weights, nodes' inputs) are untagged and mix with anything: tag
  stored state that was made outside with :meth:`VirtualDevices.place`.

So state that a node keeps with ``.cpu()`` or on the model's offload device and later combines with the
sampler's latent without an explicit move fails here as it does on a GPU; with an explicit move it runs.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

COMPUTE = torch.device("cpu", 0)   # stands for the GPU
HOST = torch.device("cpu")         # the CPU of a GPU machine: LATENT/MASK/IMAGE values, files, offloaded state

_DEVICE = torch._C.TensorBase.__dict__["device"]
_FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.rand, torch.randn, torch.randint,
              torch.arange, torch.linspace, torch.logspace, torch.eye, torch.tensor, torch.as_tensor,
              torch.randperm, torch.empty_strided, torch.scalar_tensor}
_LIKE = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
         torch.randint_like, torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_empty,
         torch.Tensor.new_full, torch.Tensor.new_tensor}
_FREE = {torch.Tensor.copy_, torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_select,
         torch.index_select, torch.Tensor.__repr__, torch.Tensor.__format__, torch.Tensor.tolist,
         torch.Tensor.item, torch.Tensor.numpy, torch._has_compatible_shallow_copy_type,
         torch.autograd.backward, torch.Tensor.backward}   # autograd crosses devices


class MixedDevices(RuntimeError):
    pass


def _as_device(value):
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        return torch.device(value)
    if isinstance(value, int):
        return torch.device("cuda", value)
    return None


class VirtualDevices(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.tags = WeakIdKeyDictionary()
        self.mixes = []

    def place(self, tree, device=HOST):
        """Tag every tensor of ``tree`` (made outside the mode) as being on ``device``; returns ``tree``."""
        for t in tree_flatten(tree)[0]:
            if isinstance(t, torch.Tensor):
                self.tags[t] = device
        return tree

    def device_of(self, t):
        return self.tags.get(t)

    def _target(self, func, args, kwargs):
        """The device a moving or creating call asks for, or None when ``func`` is neither."""
        if func is torch.Tensor.cpu:
            return HOST
        if func is torch.Tensor.cuda:
            return COMPUTE
        if func is torch.Tensor.to:
            for value in list(args[1:]) + list(kwargs.values()):
                if isinstance(value, torch.Tensor):
                    return self.device_of(value) or value.device
                device = _as_device(value) if not isinstance(value, (bool, torch.dtype)) else None
                if device is not None:
                    return device
            return self.device_of(args[0])
        if func in _FACTORIES:
            if "device" in kwargs and kwargs["device"] is not None:
                return _as_device(kwargs["device"])
            source = args[0] if args and isinstance(args[0], torch.Tensor) else None
            return self.device_of(source) if source is not None else HOST
        if func in _LIKE:
            if kwargs.get("device") is not None:
                return _as_device(kwargs["device"])
            return self.device_of(args[0])
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = getattr(func, "__self__", None)
        if owner is _DEVICE:
            return self.device_of(args[0]) or func(*args, **kwargs)
        if type(owner).__name__ == "getset_descriptor":       # other attributes (.shape, .data = ...)
            return func(*args, **kwargs)
        if func is torch.autograd.grad:                        # each gradient is on its input's device
            inputs = kwargs.get("inputs", args[1] if len(args) > 1 else None)
            inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
            grads = func(*args, **kwargs)
            for g, t in zip(grads, inputs):
                if g is not None and self.device_of(t) is not None:
                    self.tags[g] = self.device_of(t)
            return grads
        target = self._target(func, args, kwargs)
        if target is None and func in _FREE:
            target = self.device_of(args[0]) if args and isinstance(args[0], torch.Tensor) else None
        elif target is None:
            target = self._common(func, args, kwargs)
        result = func(*args, **kwargs)
        if target is not None and target.type == "cpu":
            target = HOST if target.index is None else COMPUTE
        if target is not None:
            moved = func in (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda)
            if moved and result is args[0] and self.device_of(args[0]) != target:
                result = result.clone()           # a move to another device is a copy
            for t in tree_flatten(result)[0]:
                if isinstance(t, torch.Tensor):
                    self.tags[t] = target
        return result

    def _common(self, func, args, kwargs):
        devices = {}
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                device = self.device_of(t)
                if device is None or (device == HOST and t.dim() == 0):
                    continue
                devices.setdefault(device, tuple(t.shape))
        if len(devices) > 1:
            name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
            described = ", ".join(f"{'the compute device' if d == COMPUTE else 'the CPU'} {list(s)}"
                                  for d, s in devices.items())
            raise MixedDevices(f"{name} mixes tensors on two devices: {described}")
        return next(iter(devices), None)


def on_compute(model, mode: VirtualDevices):
    """A clone of a MODEL whose load device is ``COMPUTE``, so the host moves the latent, σ and conds there;
    its weights are tagged as being there (a loaded model's are)."""
    clone = model.clone()
    clone.load_device = COMPUTE
    mode.place(list(clone.model.state_dict(keep_vars=True).values()), COMPUTE)
    return clone
