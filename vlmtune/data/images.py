"""All image I/O: references -> local paths (embedded and downloaded images cached by content), sizes, decoding.

The rest of the pipeline only ever sees paths. Base64 data URIs, raw bytes and (when allowed) http(s)
URLs are written once to `$VLMTUNE_CACHE/images/<sha256>.<ext>` (default cache: ~/.cache/vlmtune).
Nothing here decodes pixels except `load_rgb`; `image_size` reads the file header only, and both give the
size after EXIF orientation, so token planning and decoding agree.

Decoding follows what serving code feeds a processor (transformers' `load_image`, then the image processor's
`convert_to_rgb`): EXIF orientation applied, 16-bit greys scaled to 8 bits (not clipped), transparency
composited on white. Images over a pixel limit are refused per call (Pillow's process-wide limit is untouched).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
import tempfile
import threading
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

URL_TIMEOUT_S = 20
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970  # data.max_image_pixels: Pillow's own hard limit, 2 x Image.MAX_IMAGE_PIXELS
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
          (b"BM", "bmp"), (b"II*\x00", "tif"), (b"MM\x00*", "tif"))


class ImageProblem(ValueError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("VLMTUNE_CACHE") or Path.home() / ".cache" / "vlmtune")


class ImageResolver:
    """Turns one data source's image references into local file paths (strings).

    A reference is a path (relative: against `image_root`, else `base_dir`), a `data:image/...;base64,`
    URI, raw bytes, a datasets Image dict `{"bytes", "path"}`, or an http(s) URL when `allow_urls`.
    Existence is not checked here: reading the header later reports missing or unreadable files.
    """

    def __init__(self, base_dir: str | os.PathLike, image_root: str | os.PathLike | None = None,
                 allow_urls: bool = False, cache_dir: str | os.PathLike | None = None):
        self.base_dir = Path(base_dir)
        self.image_root = Path(image_root) if image_root else None
        self.allow_urls = allow_urls
        self.cache = Path(cache_dir) if cache_dir else cache_root()
        self._failed_hosts: dict[str, str] = {}

    def __call__(self, ref: object) -> str:
        if isinstance(ref, dict):  # datasets' Image feature stores {"bytes": ..., "path": ...}
            if ref.get("bytes"):
                return self.embedded(ref["bytes"])
            if not ref.get("path"):
                raise ImageProblem("image has neither bytes nor a path")
            ref = ref["path"]
        if isinstance(ref, (bytes, bytearray, memoryview)):
            return self.embedded(bytes(ref))
        if not isinstance(ref, str) or not ref.strip():
            raise ImageProblem(f"image reference must be a path, data URI or bytes, got {ref!r}")
        if ref.startswith("data:"):
            return self.embedded(decode_data_uri(ref))
        if ref.lower().startswith(("http://", "https://")):
            return self.download(ref)
        return str(self.local(ref))

    def local(self, ref: str) -> Path:
        """Without image_root: relative to base_dir, absolute as given. With image_root: relative to it, and
        refused unless the real file (`..` and symlinks followed) lies inside the real image_root."""
        path = Path(ref).expanduser()
        root = self.image_root
        if root is None:
            return path if path.is_absolute() else self.base_dir / path
        joined = root / path  # an absolute path stays itself
        if not Path(os.path.realpath(joined)).is_relative_to(os.path.realpath(root)):
            how = "absolute image path" if path.is_absolute() else "image path"
            raise ImageProblem(f"{how} {ref} is outside data.image_root ({root}) once `..` and symlinks are "
                               f"followed (it is {os.path.realpath(joined)}); refer to files inside image_root, or "
                               "leave image_root unset to use paths anywhere")
        return joined

    def embedded(self, data: bytes) -> str:
        """Write image bytes once to the content-addressed cache; return that file's path."""
        folder = self.cache / "images"
        path = folder / f"{hashlib.sha256(data).hexdigest()}.{image_extension(data)}"
        if not path.is_file():
            _write_atomic(path, data)
        return str(path)

    def download(self, url: str) -> str:
        if not self.allow_urls:
            raise ImageProblem(f"image {url!r} is a URL; set data.allow_urls: true to download URLs (into "
                               f"{self.cache / 'images'}), or download the images and refer to local paths")
        index = self.cache / "image-urls" / hashlib.sha256(url.encode()).hexdigest()
        if index.is_file():
            cached = self.cache / "images" / index.read_text().strip()
            if cached.is_file():
                return str(cached)
        host = urlsplit(url).netloc
        if host in self._failed_hosts:
            raise ImageProblem(f"could not download {url}: {self._failed_hosts[host]} (as for an earlier image)")
        try:
            with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
                data = response.read()
        except urllib.error.HTTPError as e:
            raise ImageProblem(f"could not download {url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = f"{getattr(e, 'reason', None) or e}; is this machine offline? Download the images and " \
                     "refer to local paths instead"
            self._failed_hosts[host] = reason
            raise ImageProblem(f"could not download {url}: {reason}") from None
        try:
            path = self.embedded(data)
        except ImageProblem as e:
            raise ImageProblem(f"{url}: {e}") from None
        _write_atomic(index, Path(path).name.encode())
        return path


def decode_data_uri(uri: str) -> bytes:
    head, sep, payload = uri.partition(",")
    if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
        raise ImageProblem(f"data URI must look like data:image/png;base64,..., got {uri[:40]!r}")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageProblem(f"image data URI is not valid base64 ({e})") from None


def image_extension(data: bytes) -> str:
    """File extension from the first bytes (no decoding); ImageProblem when it is not an image format."""
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise ImageProblem(f"embedded image is not PNG, JPEG, GIF, WebP, BMP or TIFF data (starts with {data[:8]!r})")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def image_size(path: Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) as decoded, i.e. after EXIF orientation, from the file header without decoding the pixels.

    ImageProblem when the file is missing or unreadable, or holds more than `max_pixels` pixels."""
    with _opened(path, max_pixels, "read") as im:
        try:
            width, height = _stored_size(im)
            turned = _orientation(im, Path(path)) in _SWAPS
        except _DECODE_ERRORS as e:
            raise _unreadable(path, "read", e) from None
        return (height, width) if turned else (width, height)


def load_rgb(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """The decoded image in RGB, upright, as serving code sees it (see the module docstring).

    `max_pixels`: refuse larger images (None: only Pillow's own hard limit, as data was checked before)."""
    with _opened(path, max_pixels, "decoded") as im:
        try:
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            return to_rgb(im)
        except _DECODE_ERRORS as e:
            raise _unreadable(path, "decoded", e) from None


def to_rgb(im: Image.Image) -> Image.Image:
    """An image in RGB: 16-bit and 32-bit integer greys scaled to 8 bits, transparency composited on white
    (as transformers' `convert_to_rgb`), any other mode converted by Pillow."""
    if im.mode in _WIDE_GREYS:
        wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        im = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


_WIDE_GREYS = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_SWAPS = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees
# what Pillow raises for a file it cannot read: truncated data, broken chunks, bad EXIF, an unknown mode
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error,
                  Image.DecompressionBombError)
_OPEN_LOCK = threading.Lock()  # warnings.catch_warnings is not thread-safe: one open at a time (headers only)


@contextmanager
def _opened(path: str | Path, max_pixels: int | None, verb: str) -> Iterator[Image.Image]:
    """`Image.open(path)`, with Pillow's bomb warning silenced for this call only, and its bomb error and
    `max_pixels` (the recipe's limit) as ImageProblems naming the limit."""
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except FileNotFoundError:
        raise ImageProblem(f"image not found: {path}") from None
    except Image.DecompressionBombError:
        raise ImageProblem(f"image {path} has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, Pillow's own hard "
                           "limit against decompression bombs, which data.max_image_pixels cannot raise; shrink "
                           "the image") from None
    except _DECODE_ERRORS as e:
        raise _unreadable(path, verb, e) from None
    with im:
        width, height = im.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageProblem(f"image {path} is {width}x{height} = {width * height:,} pixels, over "
                               f"data.max_image_pixels={max_pixels:,} (a guard against decompression bombs); "
                               "shrink the image, or raise data.max_image_pixels if it is genuine")
        yield im


def _unreadable(path, verb: str, e: Exception) -> ImageProblem:
    return ImageProblem(f"image cannot be {verb}: {path} ({e.__class__.__name__}: {e})")


def _stored_size(im: Image.Image) -> tuple[int, int]:
    """The size before orientation (newer Pillow reports a TIFF's size upright already, and turns it on load)."""
    if im.format == "TIFF":
        return im.tag_v2[256], im.tag_v2[257]  # ImageWidth, ImageLength
    return im.size


def _orientation(im: Image.Image, path: Path) -> int:
    """The EXIF orientation (1: upright) that `ImageOps.exif_transpose` will apply once the image is decoded."""
    if im.format == "PNG" and "exif" not in im.info and not _png_metadata_after_pixels(path):
        exif = Image.Image.getexif(im)  # Pillow's PNG getexif decodes the pixels to look for late metadata
    else:
        exif = im.getexif()  # a PNG with metadata after its pixels is decoded here: rare, and then exact
    return exif.get(ExifTags.Base.Orientation, 1)


def _png_metadata_after_pixels(path: Path) -> bool:
    """Whether a PNG holds an EXIF or text chunk (where orientation may live) after its image data;
    walks the chunk headers only."""
    with open(path, "rb") as f:
        f.seek(8)
        seen_pixels = False
        while len(head := f.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IEND":
                return False
            seen_pixels |= kind == b"IDAT"
            if seen_pixels and kind in (b"eXIf", b"tEXt", b"zTXt", b"iTXt"):
                return True
            f.seek(length + 4, os.SEEK_CUR)
    return False
