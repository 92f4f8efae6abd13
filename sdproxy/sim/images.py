"""Sim: real PNGs of the requested size at almost no CPU cost per response.

sd-webui returns each image as base64 PNG with the generation's infotext in a ``tEXt``
chunk named ``parameters`` (modules/api/api.py ``encode_pil_to_base64`` copies
``image.info`` into the PNG). Real 512² results weigh ≈ 0.4–0.8 MB of base64, so the
pixels here are part noise (incompressible) and part flat, tuned to ≈ 0.6 MB at 512².

The pixel data is built once per size and cached as base64. The per-request infotext is
spliced in without re-encoding the image: the PNG signature plus IHDR is 33 bytes, a
multiple of 3, so ``b64(head) + b64(text chunk) + b64(rest)`` is the base64 of the whole
file as long as the text chunk is padded to a multiple of 3 bytes too.
"""

from __future__ import annotations

import base64
import binascii
import functools
import random
import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: share of each row that is noise; the rest is flat and compresses to nothing
NOISE_SHARE = 0.57
_HEAD_LEN = 33  # signature (8) + IHDR chunk (4 + 4 + 13 + 4)


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _pixels(width: int, height: int) -> bytes:
    """Raw scanlines (filter byte 0 + RGB), noise on the left, a flat colour on the right."""
    row_len = width * 3
    noisy = int(row_len * NOISE_SHARE)
    # 64 KiB of noise tiled: deflate's 32 KiB window cannot see the repetition
    block = random.Random(width * 100_003 + height).randbytes(1 << 16)
    need = noisy * height
    noise = (block * (need // len(block) + 1))[:need]
    flat = b"\x80" * (row_len - noisy)
    return b"".join(
        b"\x00" + noise[row * noisy : (row + 1) * noisy] + flat for row in range(height)
    )


@functools.lru_cache(maxsize=16)
def _encoded(width: int, height: int) -> tuple[bytes, bytes]:
    """(base64 of signature + IHDR, base64 of IDAT + IEND) for one size."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    head = PNG_SIGNATURE + _chunk(b"IHDR", ihdr)
    assert len(head) == _HEAD_LEN
    rest = _chunk(b"IDAT", zlib.compress(_pixels(width, height), 1)) + _chunk(b"IEND", b"")
    return base64.b64encode(head), base64.b64encode(rest)


def _text_chunk(key: str, text: str) -> bytes:
    data = key.encode("latin-1") + b"\x00" + text.encode("latin-1", "replace")
    data += b" " * (-len(data) % 3)  # keep the chunk a multiple of 3 bytes (see docstring)
    return _chunk(b"tEXt", data)


def png_b64(width: int, height: int, *, infotext: str | None = None) -> bytes:
    """A base64 PNG (ASCII bytes) of ``width × height``, with ``infotext`` if given."""
    head, rest = _encoded(width, height)
    if infotext is None:
        return head + rest
    return head + base64.b64encode(_text_chunk("parameters", infotext)) + rest


def decode_b64(image: str) -> bytes | None:
    """Bytes of a base64 image (``data:`` URL prefix allowed); None if not base64."""
    text = image.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def png_text_chunks(data: bytes) -> dict[str, str] | None:
    """The ``tEXt`` chunks of a PNG as a dict; None if ``data`` is not a PNG."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    texts: dict[str, str] = {}
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"tEXt" and b"\x00" in body:
            key, _, value = body.partition(b"\x00")
            texts[key.decode("latin-1")] = value.decode("latin-1").rstrip(" ")
        if kind == b"IEND":
            break
        pos += 12 + length
    return texts
