"""A module tree shaped like the host's UNetModel (names and nesting only), for addressing tests."""
import torch.nn as nn


class Downsample(nn.Module):
    pass


class Upsample(nn.Module):
    pass


class ResBlock(nn.Module):
    pass


class Block(nn.Module):
    def __init__(self, heads, d_head, cross=True):
        super().__init__()
        self.n_heads, self.d_head = heads, d_head
        self.attn1 = nn.Identity()
        self.attn2 = nn.Identity() if cross else None


class SpatialTransformer(nn.Module):
    def __init__(self, channels, depth, d_head=40):
        super().__init__()
        self.in_channels = channels
        self.transformer_blocks = nn.ModuleList(Block(channels // d_head, d_head) for _ in range(depth))


def level_blocks(channels, depth, n):
    return [nn.Sequential(ResBlock(), *( [SpatialTransformer(channels, depth)] if depth else [])) for _ in range(n)]


def fake_unet(channels=(320, 640, 1280, 1280), depths=(1, 1, 1, 0), middle=1, num_res=2):
    """SD1.5 by default; SDXL is ``fake_unet((320, 640, 1280), (0, 2, 10), 10)``."""
    unet = nn.Module()
    inputs = [nn.Sequential(nn.Identity())]
    for level, (ch, depth) in enumerate(zip(channels, depths)):
        inputs += level_blocks(ch, depth, num_res)
        if level < len(channels) - 1:
            inputs.append(nn.Sequential(Downsample()))
    outputs = []
    for level in reversed(range(len(channels))):
        blocks = level_blocks(channels[level], depths[level], num_res + 1)
        if level:
            blocks[-1].append(Upsample())
        outputs += blocks
    unet.input_blocks = nn.ModuleList(inputs)
    unet.middle_block = nn.Sequential(ResBlock(), SpatialTransformer(channels[-1], middle), ResBlock())
    unet.output_blocks = nn.ModuleList(outputs)
    return unet
