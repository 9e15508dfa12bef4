"""Draw the example input images the shipped workflows load (no third-party images).

    python workflows/inputs/make_inputs.py      # rewrites the PNGs beside this file

Each image is 512 × 512 (SD 1.5's size; Layout-and-Retouch needs the reference the size of the
layout), drawn from ellipses and triangles with numpy, 4× supersampled, and written by a minimal
PNG encoder (zlib), so only numpy is needed. They are placeholders that make every workflow run;
a real photo of the subject gives real results. Copy them into ``ComfyUI/input/``.

- ``reference_dog.png``: a brown dog on grass under a blue sky (Pick-and-Draw, Layout-and-Retouch,
  the combined workflow);
- ``subject.png``: a grey cat on a wooden floor (PALP);
- ``art.png``: a painting of swirling brush strokes (PALP's art-inspired second subject).
"""
import pathlib
import struct
import zlib

import numpy as np

SIZE = 512
SUPERSAMPLE = 4
HERE = pathlib.Path(__file__).resolve().parent


def _grid():
    """Pixel-centre coordinates in [0, 1] at the supersampled resolution."""
    n = SIZE * SUPERSAMPLE
    axis = (np.arange(n) + 0.5) / n
    return np.meshgrid(axis, axis)          # x, y


def _ellipse(x, y, cx, cy, rx, ry, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _triangle(x, y, a, b, c):
    def side(p, q):
        return (q[0] - p[0]) * (y - p[1]) - (q[1] - p[1]) * (x - p[0])
    d1, d2, d3 = side(a, b), side(b, c), side(c, a)
    return ((d1 >= 0) & (d2 >= 0) & (d3 >= 0)) | ((d1 <= 0) & (d2 <= 0) & (d3 <= 0))


def _paint(canvas, mask, colour):
    canvas[mask] = colour


def _finish(canvas):
    """Average the supersampled canvas down to SIZE × SIZE uint8."""
    s = SUPERSAMPLE
    small = canvas.reshape(SIZE, s, SIZE, s, 3).mean(axis=(1, 3))
    return np.clip(np.round(small), 0, 255).astype(np.uint8)


def dog():
    x, y = _grid()
    canvas = np.empty(x.shape + (3,))
    canvas[:] = (120, 180, 235)                                   # sky
    _paint(canvas, y > 0.62, (86, 150, 70))                       # grass
    brown, dark = (150, 95, 50), (90, 55, 30)
    for lx in (0.36, 0.44, 0.58, 0.66):                           # legs
        _paint(canvas, (abs(x - lx) < 0.03) & (y > 0.55) & (y < 0.80), brown)
    _paint(canvas, _ellipse(x, y, 0.30, 0.45, 0.12, 0.03, -0.7), brown)          # tail
    _paint(canvas, _ellipse(x, y, 0.51, 0.53, 0.20, 0.11), brown)               # body
    _paint(canvas, _ellipse(x, y, 0.72, 0.37, 0.10, 0.09), brown)               # head
    _paint(canvas, _ellipse(x, y, 0.81, 0.41, 0.06, 0.045), brown)              # muzzle
    _paint(canvas, _ellipse(x, y, 0.66, 0.38, 0.035, 0.08, 0.3), dark)          # ear
    _paint(canvas, _ellipse(x, y, 0.86, 0.39, 0.017, 0.015), (20, 15, 10))      # nose
    _paint(canvas, _ellipse(x, y, 0.74, 0.33, 0.014, 0.014), (20, 15, 10))      # eye
    return _finish(canvas)


def cat():
    x, y = _grid()
    canvas = np.empty(x.shape + (3,))
    canvas[:] = (225, 215, 195)                                   # wall
    boards = y > 0.70
    canvas[boards] = (160, 110, 70)                               # floor
    _paint(canvas, boards & (np.mod(x * 6, 1.0) < 0.03), (120, 80, 50))
    grey, light = (120, 120, 128), (170, 170, 178)
    _paint(canvas, _ellipse(x, y, 0.68, 0.72, 0.14, 0.03, -0.3), grey)         # tail
    _paint(canvas, _ellipse(x, y, 0.50, 0.62, 0.17, 0.16), grey)               # body
    _paint(canvas, _ellipse(x, y, 0.50, 0.66, 0.09, 0.10), light)              # chest
    _paint(canvas, _ellipse(x, y, 0.50, 0.36, 0.12, 0.11), grey)               # head
    _paint(canvas, _triangle(x, y, (0.39, 0.31), (0.42, 0.17), (0.48, 0.27)), grey)
    _paint(canvas, _triangle(x, y, (0.61, 0.31), (0.58, 0.17), (0.52, 0.27)), grey)
    for ex in (0.45, 0.55):                                                     # eyes
        _paint(canvas, _ellipse(x, y, ex, 0.34, 0.025, 0.02), (120, 190, 60))
        _paint(canvas, _ellipse(x, y, ex, 0.34, 0.007, 0.018), (10, 10, 10))
    _paint(canvas, _triangle(x, y, (0.48, 0.39), (0.52, 0.39), (0.50, 0.415)), (220, 130, 140))
    return _finish(canvas)


def art():
    x, y = _grid()
    r = np.hypot(x - 0.5, y - 0.45)
    theta = np.arctan2(y - 0.45, x - 0.5)
    swirl = np.sin(18 * r - 3 * theta + 4 * np.sin(6 * x))        # swirling strokes
    strokes = np.sin(40 * (x + 0.3 * y) + 2 * swirl)              # brush texture
    canvas = np.empty(x.shape + (3,))
    canvas[..., 0] = 40 + 60 * (swirl > 0) + 25 * strokes
    canvas[..., 1] = 70 + 70 * (swirl > 0.5) + 20 * strokes
    canvas[..., 2] = 150 + 80 * (swirl < 0) - 20 * strokes
    _paint(canvas, _ellipse(x, y, 0.75, 0.22, 0.08, 0.08), (245, 215, 90))      # a moon
    _paint(canvas, (y > 0.80) & (np.sin(30 * x) * 0.03 + 0.80 < y), (30, 40, 50))  # hills
    return _finish(canvas)


IMAGES = {"reference_dog.png": dog, "subject.png": cat, "art.png": art}


def encode_png(pixels: np.ndarray) -> bytes:
    """An 8-bit RGB PNG, every row with filter type 0."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def decode_png(data: bytes) -> np.ndarray:
    """Read back a PNG written by :func:`encode_png` (filter type 0 rows only)."""
    width, height = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + 3 * width)
    if rows[:, 0].any():
        raise ValueError("only filter type 0 rows are supported")
    return rows[:, 1:].reshape(height, width, 3)


if __name__ == "__main__":
    for name, draw in IMAGES.items():
        (HERE / name).write_bytes(encode_png(draw()))
        print("wrote", HERE / name)
