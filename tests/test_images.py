import io

import pytest
from PIL import Image

from veclip import images


def _jpeg(side=32) -> bytes:
    return images.encode_jpeg(Image.new("RGB", (side, side), (200, 10, 10)))


def test_decode_good_image():
    decoded = images.decode_image(_jpeg())
    assert decoded.size == (32, 32) and decoded.mode == "RGB"


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", images.EMPTY),
        (None, images.EMPTY),
        (b"this is not an image", images.UNDECODABLE),
        (_jpeg(64)[:200], images.UNDECODABLE),  # truncated: the header parses, the pixels don't
    ],
)
def test_bad_bytes_give_reason_codes(data, reason):
    with pytest.raises(images.ImageError) as info:
        images.decode_image(data)
    assert info.value.reason == reason


def test_decompression_bomb_is_refused_before_decoding():
    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, format="PNG")  # ~20 KB of file, 144 Mpx
    bomb = buffer.getvalue()
    assert len(bomb) < 100_000
    with pytest.raises(images.ImageError) as info:
        images.open_image(bomb)
    assert info.value.reason == images.TOO_MANY_PIXELS
    with pytest.raises(images.ImageError) as info:
        images.open_image(_jpeg(), images.ImageLimits(max_pixels=100))
    assert info.value.reason == images.TOO_MANY_PIXELS


def test_byte_limit():
    with pytest.raises(images.ImageError) as info:
        images.open_image(_jpeg(), images.ImageLimits(max_bytes=10))
    assert info.value.reason == images.TOO_MANY_BYTES


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n(%pipe%id) (w) file\nshowpage\n%%EOF\n"


@pytest.mark.parametrize("payload", [EPS, EPS.replace(b" EPSF-3.0", b""), b"\xc5\xd0\xd3\xc6" + b"\0" * 28 + EPS])
def test_only_allowed_decoders_see_web_bytes(payload, monkeypatch):
    """EPS/PS would reach Ghostscript where it is installed: such bytes are refused unparsed."""
    from PIL import EpsImagePlugin

    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(1))
    with pytest.raises(images.ImageError) as info:
        images.decode_image(payload)
    assert info.value.reason == images.UNDECODABLE and "allowed format" in info.value.detail
    assert opened == []
    # the allow-list still takes every format it names
    for fmt in ("JPEG", "PNG", "WEBP", "GIF"):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format=fmt)
        assert images.decode_image(buffer.getvalue()).size == (8, 8)
