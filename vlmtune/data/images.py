"""All image I/O: references -> local paths (embedded and downloaded images cached by content), sizes, decoding.

The rest of the pipeline only ever sees paths. Base64 data URIs, raw bytes and (when allowed) http(s)
URLs are written once to `$VLMTUNE_CACHE/images/<sha256>.<ext>` (default cache: ~/.cache/vlmtune).
Nothing here decodes pixels except `load_rgb`; `image_size` reads the file header only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image, UnidentifiedImageError

URL_TIMEOUT_S = 20
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
        path = Path(ref).expanduser()
        if not path.is_absolute():
            return (self.image_root or self.base_dir) / path
        root = self.image_root
        if root and not Path(os.path.abspath(path)).is_relative_to(os.path.abspath(root)):
            raise ImageProblem(f"absolute image path {ref} is outside data.image_root ({root}); give it relative "
                               "to image_root, or leave image_root unset to use absolute paths anywhere")
        return path

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


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise ImageProblem(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageProblem(f"image cannot be read: {path} ({e.__class__.__name__}: {e})") from None


def load_rgb(path: str | Path) -> Image.Image:
    """The decoded image in RGB."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise ImageProblem(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageProblem(f"image cannot be decoded: {path} ({e.__class__.__name__}: {e})") from None
