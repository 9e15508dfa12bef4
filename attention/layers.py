"""Addressing of a UNet's attention layers, read from the module tree, never from a table.

Every transformer block of an SD1.x / SD2.x / SDXL UNet holds a self-attention (``attn1``) and a
cross-attention (``attn2``). The host's patch keys are ``(block, number, block_index)``, e.g.
``("output", 7, 0)``; resolution is the latent's size divided by ``scale``. Users pick layers with
short rules (see :func:`parse_rule`), e.g. ``"decoder cross 1/2"`` is Pick-and-Draw's 32×32
decoder layers at 512² and ``"#10-15"`` is MasaCtrl's attention layers 10–15.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

PARTS = {"input": "encoder", "middle": "middle", "output": "decoder"}


class UnsupportedModelError(ValueError):
    """The model is not a UNet with spatial transformers (a DiT such as Flux or SD3, a video model…)."""


@dataclass(frozen=True)
class AttnLayer:
    block: str       # "input" | "middle" | "output", the host's block name
    number: int      # index of the block inside input_blocks / output_blocks (0 for middle)
    index: int       # depth of the transformer block inside its SpatialTransformer (block_index)
    kind: str        # "self" | "cross"
    scale: int       # the latent is `scale` times larger than this layer's feature map
    ordinal: int     # position of the transformer block in UNet order (MasaCtrl's layer count)
    channels: int
    heads: int
    dim_head: int

    @property
    def part(self) -> str:
        return PARTS[self.block]

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.block, self.number, self.index)

    @property
    def label(self) -> str:
        return f"{self.block}.{self.number}.{self.index} {self.kind} 1/{self.scale}"


def _transformers(module):
    """SpatialTransformers directly inside one UNet block (duck-typed: the core never imports the host)."""
    return [m for m in module.children() if hasattr(m, "transformer_blocks")]


def _has(module, class_name: str) -> bool:
    return any(type(m).__name__ == class_name for m in module.children())


def enumerate_layers(unet) -> list[AttnLayer]:
    """List every attention layer of a UNet in forward order, with its resolution.

    Resolution is tracked by walking the blocks: a ``Downsample`` ends an encoder level (×2), an
    ``Upsample`` ends a decoder level (÷2), so any depth, level count or res-block count works.
    """
    if not all(hasattr(unet, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        raise UnsupportedModelError(
            f"{type(unet).__name__} is not a UNet: this pack supports the SD1.x, SD2.x and SDXL UNets "
            "(DiT models such as Flux, SD3, AuraFlow or HunyuanDiT have no input/middle/output blocks "
            "to patch). Load an SD1.x, SD2.x or SDXL checkpoint."
        )
    blocks = [("input", i, b) for i, b in enumerate(unet.input_blocks)]
    blocks += [("middle", 0, unet.middle_block)]
    blocks += [("output", i, b) for i, b in enumerate(unet.output_blocks)]
    layers, scale, ordinal = [], 1, 0
    for name, number, block in blocks:
        if block is None:
            continue
        for transformer in _transformers(block):
            for index, tb in enumerate(transformer.transformer_blocks):
                kinds = ["self"] + (["cross"] if getattr(tb, "attn2", None) is not None else [])
                for kind in kinds:
                    layers.append(AttnLayer(name, number, index, kind, scale, ordinal,
                                            transformer.in_channels, tb.n_heads, tb.d_head))
                ordinal += 1
        if name == "input" and _has(block, "Downsample"):
            scale *= 2
        elif name == "output" and _has(block, "Upsample"):
            scale //= 2
    if not layers:
        raise UnsupportedModelError("this UNet has no attention layers to patch.")
    return layers


RULE_HELP = (
    "A layer rule is one or more alternatives separated by ';'; each alternative is words that must "
    "all hold: 'all', 'self' or 'cross', 'encoder'/'middle'/'decoder' (or input/output), a resolution "
    "'1/1' '1/2' '1/4' '1/8' (of the latent), a block 'output.6', 'output.6-11' or 'input.7.1' "
    "(block.number[.depth]), or '#10-15' (transformer blocks counted over the whole UNet from 0, as "
    "MasaCtrl counts). Example: 'decoder cross 1/2; middle'."
)

_PART_WORDS = {"encoder": "input", "input": "input", "down": "input", "middle": "middle", "mid": "middle",
               "decoder": "output", "output": "output", "up": "output"}
_RANGE = r"(\d+)(?:-(\d+))?"
_BLOCK = re.compile(rf"^(input|middle|output)\.{_RANGE}(?:\.{_RANGE})?$")
_ORDINAL = re.compile(rf"^#{_RANGE}$")
_SCALE = re.compile(r"^1/(\d+)$")


def _span(lo: str, hi: str | None) -> range:
    return range(int(lo), int(hi if hi is not None else lo) + 1)


def _term(word: str):
    """One rule word -> predicate over AttnLayer."""
    if word in ("all", "*"):
        return lambda layer: True
    if word in ("self", "cross"):
        return lambda layer: layer.kind == word
    if word in _PART_WORDS:
        block = _PART_WORDS[word]
        return lambda layer: layer.block == block
    if m := _SCALE.match(word):
        scale = int(m[1])
        return lambda layer: layer.scale == scale
    if m := _ORDINAL.match(word):
        span = _span(m[1], m[2])
        return lambda layer: layer.ordinal in span
    if m := _BLOCK.match(word):
        numbers, depths = _span(m[2], m[3]), (_span(m[4], m[5]) if m[4] else None)
        return lambda layer: (layer.block == m[1] and layer.number in numbers
                              and (depths is None or layer.index in depths))
    raise ValueError(f"layer rule: '{word}' is not understood. {RULE_HELP}")


def parse_rule(text: str):
    """Compile a layer rule (see RULE_HELP) into a predicate ``AttnLayer -> bool``."""
    alternatives = [a.replace(",", " ").split() for a in text.lower().split(";")]
    alternatives = [a for a in alternatives if a]
    if not alternatives:
        raise ValueError(f"layer rule is empty. {RULE_HELP}")
    compiled = [[_term(w) for w in words] for words in alternatives]
    return lambda layer: any(all(t(layer) for t in terms) for terms in compiled)


def select_layers(layers: list[AttnLayer], rule: str, kind: str | None = None) -> list[AttnLayer]:
    """The layers matching ``rule`` (restricted to ``kind`` if given); an empty match is an error."""
    match = parse_rule(rule)
    chosen = [l for l in layers if (kind is None or l.kind == kind) and match(l)]
    if not chosen:
        pool = sorted({f"{l.block}.{l.number} 1/{l.scale}" for l in layers if kind is None or l.kind == kind},
                      key=lambda s: (list(PARTS).index(s.split(".")[0]), int(s.split(".")[1].split()[0])))
        what = f"{kind}-attention layer" if kind else "attention layer"
        raise ValueError(f"no {what} matches the rule '{rule}'. This model has: {', '.join(pool)}. {RULE_HELP}")
    return chosen
