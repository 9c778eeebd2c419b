"""The server's PNG encoder (runtime/serve/png.py) against Pillow's decoder and zlib's own checks."""

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from fluxc.runtime.serve.png import encode_png


def smooth(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)


@pytest.mark.parametrize("h, w", [(1024, 768), (37, 5), (3, 1), (1, 9)])  # fewer rows than bands, one row, one column
@pytest.mark.parametrize("kind", ["noise", "smooth"])
def test_pillow_decodes_the_exact_pixels(h, w, kind):
    pixels = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), np.uint8) if kind == "noise" else smooth(h, w)
    data = encode_png(pixels)
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # Pillow checks every chunk's CRC as it reads
        assert (im.mode, im.size) == ("RGB", (w, h))
        np.testing.assert_array_equal(np.asarray(im), pixels)
    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    zlib.decompress(idat)  # the joined bands are one zlib stream with the right Adler-32 (zlib raises otherwise)
    if kind == "smooth" and h > 100:
        assert len(data) < pixels.nbytes / 4  # the Sub filter lets deflate find the gradient


def test_bad_pixels_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[4, 4\]"):
        encode_png(np.zeros((4, 4), np.uint8))
