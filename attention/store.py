"""Where captured attention maps and features live between the patches and the nodes.

The host deep-copies ``model_options`` on every clone (host notes, gotcha 3), so the store is one
explicit object whose ``__deepcopy__`` returns itself. It serves two uses:

* **recording** — during a sampling run, detached, head-averaged maps of the watched words at the
  requested steps, kept per (step, layer, branch) and moved to a compact dtype on the offload device
  when the run ends; a run is fingerprinted by its output latent, so a read node given the sampler's
  LATENT finds the maps of exactly that run, and an interrupted run leaves nothing behind;
* **live** — inside ``with store.live() as cap:``, the maps and features of one forward pass stay in
  the autograd graph for the guidance losses (a detached copy would give zero gradient).

Recording keeps only the sampler's own cond/uncond passes: the node layer sets ``sampler_pass``
while the sampler's CFG prediction computes its conds (``nodes/host.py``), so the extra UNet passes
of SAG, PAG or a guidance gradient, made with the same patches at the same σ, are not averaged in; and of
the sampler's passes at one step's σ the last one counts (heun's corrector comes before the step's own pass).
"""
from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field

import torch

from .maps import expand_positions


# recorded runs a capture keeps, newest first (Attention Maps may read an older run when the host re-runs only it):
# ~99 runs of one word at SD1.5 size with every cross-attention layer and step (5.1 MiB each) in the CPU's
# memory; where runs are kept on a GPU (--highvram), memory the host's model management does not see, far fewer
KEEP_BYTES = {"cpu": 512 * 2**20, "other": 64 * 2**20}


def every_step(step: int, total: int) -> bool:
    return True


def _size(run: "Run") -> int:
    tensors = [*run.maps.values(), *run.features.values(), run.output]
    return sum(t.numel() * t.element_size() for t in tensors)


def _signature(output: torch.Tensor) -> torch.Tensor:
    """A run's output latent in 1 KB or so (each channel average-pooled to at most 8×8): enough to tell a dropped
    run's LATENT from another one, without keeping every latent ever sampled."""
    return torch.nn.functional.adaptive_avg_pool2d(output.float().flatten(0, -4), 8).cpu() if output.dim() >= 4 \
        else output.float().flatten()[:256].cpu()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-4)


def _items_of(part: torch.Tensor, whole: torch.Tensor) -> bool:
    """Whether every item of ``part`` is an item of the larger batch ``whole``."""
    return part.shape[0] < whole.shape[0] and part.shape[1:] == whole.shape[1:] and \
        all(any(_same(item, other) for other in whole) for item in part)


def parse_steps(text: str):
    """Steps rule of a node: 'all', 'every N', or comma-separated 0-based indices/ranges ('0-9, 20')."""
    words = text.strip().lower()
    if words in ("", "all"):
        return every_step
    if words.startswith("every"):
        n = words.removeprefix("every").strip()
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"steps: '{text.strip()}' is not understood; 'every N' needs a whole number N ≥ 1, "
                             "e.g. 'every 5'.")
        return lambda step, total, n=int(n): step % n == 0
    chosen = set()
    for part in words.replace(" ", "").split(","):
        lo, dash, hi = part.partition("-")
        if not part:
            raise ValueError(f"steps: '{text.strip()}' has an empty entry between commas; use 'all', 'every 5' or "
                             "'0-9, 20'.")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ValueError(f"steps: '{part}' is not understood; use 'all', 'every 5' or '0-9, 20' (0-based step "
                             "indices and ranges).")
        if hi and int(hi) < int(lo):
            raise ValueError(f"steps: the range '{part}' runs backwards; write it '{hi}-{lo}'.")
        chosen.update(range(int(lo), int(hi or lo) + 1))
    return lambda step, total: step in chosen


@dataclass
class Run:
    """One sampling run's recordings, keyed (step index, layer key, branch)."""
    sigmas: list[float]
    maps: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)
    output: torch.Tensor | None = None
    off_schedule: int = 0       # the sampler's passes at a σ of no step (an adaptive sampler's own steps)

    def step_of(self, sigma: float) -> int | None:
        for i, s in enumerate(self.sigmas[:-1]):
            if abs(s - sigma) <= 1e-4 * max(1.0, s):
                return i
        return None

    @property
    def steps(self) -> list[int]:
        return sorted({k[0] for k in self.maps} | {k[0] for k in self.features})

    def sigma(self, step: int) -> float:
        return self.sigmas[step]


@dataclass
class LiveCapture:
    """Maps ``[B, W, h, w]`` and features ``[B, h, w, C]`` of one forward pass, still in the graph."""
    maps: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)


class AttentionStore:
    def __init__(self, words, positions, prompt_len, layers=(), steps=every_step, keep_bytes=None,
                 dtype=torch.float16, offload_device="cpu"):
        self.words = list(words)
        self.layers = list(layers)
        self.positions = [tuple(p) for p in positions]
        self.prompt_len = prompt_len
        self.steps = steps
        self.dtype = dtype
        self.offload_device = torch.device(offload_device)
        self.keep_bytes = keep_bytes if keep_bytes is not None else \
            KEEP_BYTES["cpu" if self.offload_device.type == "cpu" else "other"]
        self.runs: list[Run] = []
        self._dropped = collections.deque(maxlen=1024)     # signatures of the outputs of runs no longer kept
        self._run: Run | None = None
        self._latent_size = None
        self._live: LiveCapture | None = None
        self._sigma_cache = (None, None)
        self._columns = {}
        self.sampler_pass = False     # True only while the sampler's own cond/uncond passes run
        self._pass = 0                # which of the sampler's passes is running (``begin_pass``)
        # the recorded branch (0 cond, 1 uncond, None: not recorded) of each index of the pass's cond list, as
        # ``extra_options["cond_or_uncond"]`` counts them; None: the list is CFG's own [positive, negative]
        self.branches: dict[int, int | None] | None = None
        self._filed = {}              # (table, key) -> the pass that filed it in the run in progress

    def __deepcopy__(self, memo):
        return self

    # -- run lifecycle (driven by the sampler wrapper) ------------------------------------------
    def begin_run(self, sigmas: torch.Tensor, latent_size: tuple[int, int] | None = None):
        """A sampling run starts; ``latent_size`` (h, w): only passes over the whole latent are filed (an area
        cond's pass runs on a crop of it, whose maps cover only that crop)."""
        self._run = Run([float(s) for s in sigmas.flatten()])
        self._latent_size = None if latent_size is None else tuple(latent_size)
        self._sigma_cache = (None, None)
        self._filed = {}
        self._off_pass = None         # the last pass counted in the run's ``off_schedule``

    def begin_pass(self):
        """One of the sampler's own CFG predictions starts: what it files at a step replaces what an earlier pass
        filed there (heun's corrector evaluates step i+1's σ at a guessed latent, before step i+1's own pass)."""
        self._pass += 1
        self.sampler_pass = True
        self.branches = None

    def abort_run(self):
        self._run = None

    def _averaged(self, run: Run) -> Run:
        mean = lambda table: {k: torch.stack(c).mean(0).to(self.offload_device, self.dtype) for k, c in table.items()}
        return Run(run.sigmas, mean(run.maps), mean(run.features), off_schedule=run.off_schedule)

    def snapshot(self) -> Run:
        """The run in progress, averaged so far: for a loop that needs its own maps before it ends (L&R's M^c)."""
        return self._averaged(self._run)

    def end_run(self, output: torch.Tensor) -> list[int]:
        """File the run; the steps it was to record but has no pass of, where the sampler evaluated the model off
        the schedule instead (dpm_adaptive, dpm_fast: they choose their own σ's), else []."""
        run, self._run = self._run, None
        if run is None:
            return []
        run = self._averaged(run)
        run.output = output.detach().float().to(self.offload_device)
        self.runs.append(run)
        kept = sum(map(_size, self.runs))
        while len(self.runs) > 1 and kept > self.keep_bytes:
            dropped = self.runs.pop(0)
            kept -= _size(dropped)
            self._dropped.append(_signature(dropped.output))
        wanted = [i for i in range(len(run.sigmas) - 1) if self.steps(i, len(run.sigmas) - 1)]
        return [i for i in wanted if i not in run.steps] if run.off_schedule else []

    @contextlib.contextmanager
    def live(self):
        """One forward pass's maps and features, in the graph; run its backward inside too (a checkpointed
        block recomputes its patches in backward, and they must compute as they did in the forward)."""
        self._live = LiveCapture()
        try:
            yield self._live
        finally:
            self._live = None

    # -- called by the patches ------------------------------------------------------------------
    @property
    def is_live(self) -> bool:
        return self._live is not None

    def _step(self, sigmas: torch.Tensor) -> int | None:
        # every layer of one forward sees the same sigmas tensor: read it from the device once
        if self._sigma_cache[0] is not sigmas:
            self._sigma_cache = (sigmas, self._run.step_of(float(sigmas.flatten()[0])))
        return self._sigma_cache[1]

    def active(self, extra_options: dict) -> bool:
        """Whether this forward pass is to be captured at all (cheap: decides before any maths)."""
        if self._live is not None:
            return True
        if self._run is None or not self.sampler_pass:
            return False
        if self._latent_size is not None and tuple(extra_options.get("original_shape", ())[-2:]) != self._latent_size:
            return False        # an area cond's pass, on a crop of the latent
        step = self._step(extra_options["sigmas"])
        if step is None:
            if self._off_pass != self._pass:
                self._off_pass, self._run.off_schedule = self._pass, self._run.off_schedule + 1
            return False
        return self.steps(step, len(self._run.sigmas) - 1)

    def columns(self, context_len: int, device) -> list[torch.Tensor]:
        """Each word's token columns in a context of ``context_len`` tokens, as index tensors on ``device``.

        Made once per context length and device: indexing a GPU tensor with a Python list copies the list to
        the device, which waits for the GPU to finish its queue (one stall per layer and pass).
        """
        key = (context_len, torch.device(device))
        if key not in self._columns:
            with torch.inference_mode(False):   # made in a sampler's pass, used in gradient passes too
                self._columns[key] = [torch.tensor(expand_positions(p, context_len, self.prompt_len), device=device)
                                      for p in self.positions]
        return self._columns[key]

    def put(self, table: str, layer_key, values: torch.Tensor, extra_options: dict):
        """File one layer's maps or features of this forward pass (call only when ``active``)."""
        indices = extra_options["cond_or_uncond"]
        if self._live is not None:
            # one branch's several entries (the prompt combined with itself, or masked over the whole image) are
            # averaged, as a recorded pass files them; the forward's tensors stay: gradient checkpointing recomputes
            # each block in backward, patches included, and a recomputed map filed here would hold that
            # recomputation's graph alive
            if len(indices) > 1 and len(set(indices)) == 1:
                values = sum(values.chunk(len(indices))) / len(indices)
            getattr(self._live, table).setdefault(layer_key, values)
            return
        step = self._step(extra_options["sigmas"])
        recorded = getattr(self._run, table)
        for chunk, index in zip(values.detach().chunk(len(indices)), indices):
            branch = index if self.branches is None else self.branches.get(index)
            if branch is None:      # a guider's third prompt (DualCFG's middle, PerpNeg's empty one)
                continue
            key = (step, layer_key, branch)
            # the calls of one pass (cond and uncond apart, several conds) are averaged; a later pass replaces
            if self._filed.get((table, key)) != self._pass:
                recorded[key], self._filed[(table, key)] = [], self._pass
            recorded[key].append(chunk.float())

    # -- reading ----------------------------------------------------------------------------------
    def run_for(self, samples: torch.Tensor) -> Run:
        """The recorded run whose output is ``samples`` (the sampler's LATENT), newest first."""
        samples = samples.detach().float().to(self.offload_device)
        for run in reversed(self.runs):
            if _same(run.output, samples):
                return run
        if not self.runs:
            raise LookupError(
                "no attention maps were recorded: wire the MODEL output of AttentionCapture into the sampler "
                "that makes this LATENT (and nothing that re-patches the same layers after it)."
            )
        signature = _signature(samples)
        if any(_same(sig, signature) for sig in self._dropped):
            raise LookupError(
                f"the maps of the run that made this LATENT are no longer kept: a capture keeps its newest runs up "
                f"to {self.keep_bytes / 2**20:.0f} MiB ({len(self.runs)} now), and later runs of samplers using its "
                "MODEL took their place. Run that sampler again (the host re-runs it when one of its inputs "
                "changes), or give each sampler its own Attention Capture."
            )
        if any(_items_of(samples, run.output) for run in self.runs):
            raise LookupError(
                "this LATENT is part of a batch a sampler made with this capture's MODEL (a LatentFromBatch of its "
                "output?): wire the sampler's whole LATENT into this node; its grid shows every item's maps."
            )
        raise LookupError(
            "this LATENT was not made by a sampler that used this capture's MODEL (or was changed after "
            "sampling): wire the sampler's own LATENT output into this node."
        )
