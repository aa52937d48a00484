"""Decoding: every image mode as transformers' own loading sees it; pixel limits; sizes agree with decoding."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import load_image

from vlmtune.data.images import ImageProblem, image_size, load_rgb

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (20, 30, 4), dtype=np.uint8)
PIXELS[0, :5, 3] = 0  # fully transparent: these become white, as transformers composites them
PIXELS[1, :5, 3] = 128  # half transparent


def served(path) -> np.ndarray:
    """What serving code hands the model: transformers' load_image orientation, then the image processor's
    convert_to_rgb (which composites transparency on white)."""
    return convert_to_rgb(ImageOps.exif_transpose(Image.open(path)), return_numpy=True)


def save(image: Image.Image, path, **kw):
    image.save(path, **kw)
    return path


def transparent_images(tmp_path) -> dict[str, object]:
    rgba = Image.fromarray(PIXELS, "RGBA")
    palette = Image.fromarray(PIXELS[..., :3]).quantize(16)
    palette.putpixel((0, 0), 3)
    rgb_with_key = Image.fromarray(PIXELS[..., :3])
    rgb_with_key.putpixel((0, 0), (1, 2, 3))
    return {
        "RGBA png": save(rgba, tmp_path / "rgba.png"),
        "LA png": save(Image.fromarray(PIXELS[..., [0, 3]], "LA"), tmp_path / "la.png"),
        "P png with a transparent index": save(palette, tmp_path / "p.png", transparency=3),
        "RGBA webp": save(rgba, tmp_path / "rgba.webp", lossless=True),
        "P gif with a transparent index": save(palette, tmp_path / "p.gif", transparency=3),
        "RGB png with a transparent colour": save(rgb_with_key, tmp_path / "key.png", transparency=(1, 2, 3)),
    }


def opaque_images(tmp_path) -> dict[str, object]:
    rgb = Image.fromarray(PIXELS[..., :3])
    return {
        "RGB png": save(rgb, tmp_path / "rgb.png"),
        "RGB jpeg": save(rgb, tmp_path / "rgb.jpg"),
        "L png": save(rgb.convert("L"), tmp_path / "l.png"),
        "1 png": save(rgb.convert("1"), tmp_path / "one.png"),
        "P png": save(rgb.quantize(16), tmp_path / "p.png"),
        "CMYK jpeg": save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg"),
        "RGB tiff": save(rgb, tmp_path / "rgb.tif"),
        "BMP": save(rgb, tmp_path / "rgb.bmp"),
    }


@pytest.mark.parametrize("name", ["RGBA png", "LA png", "P png with a transparent index", "RGBA webp",
                                  "P gif with a transparent index", "RGB png with a transparent colour"])
def test_transparency_is_composited_on_white_as_transformers_does(tmp_path, name):
    path = transparent_images(tmp_path)[name]
    ours = np.asarray(load_rgb(path))
    assert ours.shape == (20, 30, 3) and np.array_equal(ours, served(path))
    assert (ours[0, 0] == 255).all()  # a transparent pixel is white, not the colour (or black) behind it


@pytest.mark.parametrize("name", ["RGB png", "RGB jpeg", "L png", "1 png", "P png", "CMYK jpeg", "RGB tiff", "BMP"])
def test_opaque_modes_equal_transformers_load_image(tmp_path, name):
    path = str(opaque_images(tmp_path)[name])
    ours = np.asarray(load_rgb(path))
    assert np.array_equal(ours, np.asarray(load_image(path))) and np.array_equal(ours, served(path))


def test_the_image_processor_gets_the_pixels_it_would_make_of_the_transparent_image_itself(tmp_path, processor_for):
    image_processor = processor_for("qwen2_vl").image_processor
    for path in transparent_images(tmp_path).values():
        theirs = image_processor(images=[Image.open(path)], return_tensors="pt")["pixel_values"]
        ours = image_processor(images=[load_rgb(path)], return_tensors="pt")["pixel_values"]
        assert np.array_equal(ours.numpy(), theirs.numpy()), path


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("ext", ["jpg", "png", "webp", "tif"])
def test_exif_orientation_is_applied_and_the_header_size_is_the_upright_size(tmp_path, orientation, ext):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = str(save(Image.fromarray(PIXELS[..., :3]), tmp_path / f"o.{ext}", exif=exif))
    theirs = load_image(path)  # transformers applies the orientation
    ours = load_rgb(path)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert image_size(path) == ours.size == theirs.size == ((20, 30) if orientation >= 5 else (30, 20))


def png_with_exif_after_the_pixels(tmp_path, orientation: int):
    """A PNG whose eXIf chunk follows its image data (allowed; Pillow then finds it only when decoding)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = (tmp_path / "x.png")
    Image.fromarray(PIXELS[..., :3]).save(data)
    raw = data.read_bytes()
    payload = exif.tobytes()[6:] if exif.tobytes().startswith(b"Exif\x00\x00") else exif.tobytes()
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload + struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    end = raw.rindex(b"IEND") - 4
    path = tmp_path / "late-exif.png"
    path.write_bytes(raw[:end] + chunk + raw[end:])
    return path


def test_png_exif_after_the_pixel_data_counts_for_the_header_size_too(tmp_path):
    path = png_with_exif_after_the_pixels(tmp_path, 6)
    with Image.open(path) as im:
        assert "exif" not in im.info  # not known from the header alone
    assert image_size(path) == load_rgb(path).size == load_image(str(path)).size == (20, 30)
    assert np.array_equal(np.asarray(load_rgb(path)), np.asarray(load_image(str(path))))


@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_16_bit_greys_are_scaled_like_the_same_picture_at_8_bits(tmp_path, fmt):
    grey = RNG.integers(0, 256, (20, 30), dtype=np.uint16)
    wide = Image.fromarray(grey * 257)  # the same picture over the full 16-bit range
    assert wide.mode == "I;16"
    path16 = save(wide, tmp_path / f"g16.{fmt}")
    path8 = str(save(Image.fromarray(grey.astype(np.uint8)), tmp_path / f"g8.{fmt}"))
    with Image.open(path16) as im:
        assert im.mode.startswith("I")
    assert np.array_equal(np.asarray(load_rgb(path16)), np.asarray(load_image(path8)))


def test_32_bit_integer_greys_are_read_as_16_bit_values(tmp_path):
    grey = RNG.integers(0, 256, (20, 30)).astype(np.int32)
    path = save(Image.fromarray(grey * 257, mode="I"), tmp_path / "g32.tif")
    with Image.open(path) as im:
        assert im.mode == "I"
    assert np.array_equal(np.asarray(load_rgb(path))[..., 0], grey.astype(np.uint8))


def fake_png(path, width: int, height: int):
    """A PNG header claiming width x height, with a few bytes of (not matching) data: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_an_image_problem_naming_the_limit(tmp_path):
    bomb = fake_png(tmp_path / "bomb.png", 30000, 30000)
    assert bomb.stat().st_size < 500
    for read in (image_size, load_rgb):
        with pytest.raises(ImageProblem, match="decompression bombs"):
            read(bomb)


def test_the_recipe_limit_is_per_call_and_leaves_pillows_own_alone(tmp_path, images):
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageProblem, match=r"56x56 = 3,136 pixels, over data.max_image_pixels=3,000"):
        image_size(images["red"], max_pixels=3000)
    with pytest.raises(ImageProblem, match="data.max_image_pixels=3,000"):
        load_rgb(images["red"], max_pixels=3000)
    assert image_size(images["red"], max_pixels=3136) == (56, 56)
    assert Image.MAX_IMAGE_PIXELS == before


def test_an_image_over_pillows_warning_size_but_inside_the_recipe_limit_warns_nothing(tmp_path):
    big = fake_png(tmp_path / "big.png", 10000, 10000)  # over Pillow's warning threshold, under its hard limit
    assert 10000 * 10000 > Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert image_size(big) == (10000, 10000)
        with pytest.raises(ImageProblem, match="over data.max_image_pixels=99,999,999"):
            image_size(big, max_pixels=99_999_999)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_files_read_their_header_but_do_not_decode(tmp_path, ext):
    whole = save(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), tmp_path / f"a.{ext}")
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert image_size(cut) == (64, 64)
    with pytest.raises(ImageProblem, match="cannot be decoded"):
        load_rgb(cut)
