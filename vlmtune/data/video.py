"""All video I/O and frame sampling: a video file or a list of frame images -> the frames the model sees.

A video is a file path (decoded with PyAV, the optional `video` extra) or a tuple of frame image paths
(nothing extra needed). Planning needs only headers (`probe`); `load_frames` decodes. Frames are sampled
at `fps` frames per second of video (a frame list is taken as already sampled at that rate), at most
`max_frames`, and the count is padded to a multiple of the temporal patch by repeating the last frame,
as Qwen's processor does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .images import ImageProblem, image_size, load_rgb, to_rgb

DEFAULT_FPS = 2.0
DEFAULT_MAX_FRAMES = 32
INSTALL_HINT = "pip install 'vlmtune[video]' (or: pip install av)"

VideoRef = str | tuple[str, ...]


class VideoProblem(ImageProblem):
    """A video that cannot be read, or a missing decoder."""


@dataclass(frozen=True)
class VideoInfo:
    """What planning needs from a video's headers: frame count, native rate (None: a frame list), size."""

    frames: int
    fps: float | None
    width: int
    height: int


@dataclass(frozen=True)
class VideoClip:
    """One video of a sample as planned: its source, the frames used (in order), and what the model gets."""

    source: VideoRef
    indices: tuple[int, ...]
    grid: tuple[int, ...]
    tokens: int
    seconds_per_grid: float  # the time one temporal patch covers (temporal patch / sampled fps)
    # frames per second of `source` that `indices` count in (a file's own rate; a frame list: the sampling fps),
    # so frame k is at indices[k] / frame_rate seconds; None: not recorded
    frame_rate: float | None = None

    def to_json(self) -> dict:
        return {"source": list(self.source) if isinstance(self.source, tuple) else self.source,
                "indices": list(self.indices), "grid": list(self.grid), "tokens": self.tokens,
                "seconds_per_grid": self.seconds_per_grid, "frame_rate": self.frame_rate}

    @classmethod
    def from_json(cls, d: dict) -> VideoClip:
        source = tuple(d["source"]) if isinstance(d["source"], list) else d["source"]
        return cls(source, tuple(d["indices"]), tuple(d["grid"]), d["tokens"], d["seconds_per_grid"],
                   d.get("frame_rate"))


def dumps(clips: list[VideoClip]) -> str:
    return json.dumps([c.to_json() for c in clips])


def loads(text: str | None) -> list[VideoClip]:
    return [VideoClip.from_json(d) for d in json.loads(text)] if text else []


def describe(ref: VideoRef) -> str:
    return f"{len(ref)}-frame video starting {ref[0]}" if isinstance(ref, tuple) else f"video {ref}"


def require_av():
    """The PyAV module, or VideoProblem naming the package to install."""
    try:
        import av
    except ImportError:
        raise VideoProblem(f"reading video files needs the PyAV package, which is not installed: {INSTALL_HINT}; "
                           "or give the video as a list of frame images") from None
    return av


def probe(ref: VideoRef) -> VideoInfo:
    """Frame count, native fps and frame size from headers (a frame list: every frame's header)."""
    if isinstance(ref, tuple):
        if not ref:
            raise VideoProblem("a video given as frames needs at least one frame")
        sizes = [image_size(Path(p)) for p in ref]
        for k, size in enumerate(sizes):
            if size != sizes[0]:
                raise VideoProblem(f"the frames of a video must all have one size, but frame {k} ({ref[k]}) is "
                                   f"{size[0]}x{size[1]} and frame 0 is {sizes[0][0]}x{sizes[0][1]}")
        return VideoInfo(len(ref), None, *sizes[0])
    av = require_av()
    if not Path(ref).is_file():
        raise VideoProblem(f"video not found: {ref}")
    try:
        with av.open(ref) as container:
            if not container.streams.video:
                raise VideoProblem(f"video has no video stream: {ref}")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            frames = stream.frames or sum(1 for p in container.demux(stream) if p.size)
            info = VideoInfo(frames, float(rate) if rate else None, stream.width, stream.height)
    except av.FFmpegError as e:
        raise VideoProblem(f"video cannot be read: {ref} ({e.__class__.__name__}: {e})") from None
    if not info.frames or not info.fps or not info.width:
        raise VideoProblem(f"video has no frames, frame rate or size in its headers: {ref}")
    return info


def sample_indices(total: int, native_fps: float | None, fps: float, max_frames: int, multiple: int = 2) -> list[int]:
    """Frame indices to use: `fps` per second of video (all frames when `native_fps` is None), at most
    `max_frames` after padding, spread evenly; the last repeated up to a multiple of `multiple`."""
    n = total if native_fps is None else round(total / native_fps * fps)
    cap = max(multiple, max_frames - max_frames % multiple)
    n = max(1, min(n, total, cap))
    indices = [0] if n == 1 else [round(k * (total - 1) / (n - 1)) for k in range(n)]
    return indices + [indices[-1]] * (-n % multiple)


def sampled_fps(info: VideoInfo, indices: list[int], fps: float) -> float:
    """Frames per second of video in the sampled frames (a frame list is taken at `fps`, then thinned to the cap)."""
    return len(set(indices)) / info.frames * (info.fps or fps)


def frame_settings(processor) -> tuple[float, int, int]:
    """(fps, max_frames, temporal patch) from the processor's video processor (see `apply_video_settings`)."""
    vp = processor.video_processor
    return (getattr(vp, "fps", None) or DEFAULT_FPS, getattr(vp, "max_frames", None) or DEFAULT_MAX_FRAMES,
            getattr(vp, "temporal_patch_size", None) or 1)


def apply_video_settings(processor, knobs, fps: float, max_frames: int, min_pixels: int | None = None,
                         max_pixels: int | None = None) -> None:
    """Put a recipe's video settings on the processor's video processor (unset pixel bounds: its own);
    `knobs`: the family's PixelKnobs (None: the bounds do not apply)."""
    vp = getattr(processor, "video_processor", None)
    if vp is None:
        return
    vp.fps, vp.max_frames = fps, max_frames
    if knobs is not None:
        knobs.set(vp, min_pixels, max_pixels)


def load_frames(clip: VideoClip) -> list[Image.Image]:
    """The clip's frames in RGB, in the order of its indices (repeats included)."""
    if isinstance(clip.source, tuple):
        return [load_rgb(clip.source[i]) for i in clip.indices]
    av = require_av()
    wanted = set(clip.indices)
    last = max(clip.indices)
    decoded: dict[int, Image.Image] = {}
    try:
        with av.open(clip.source) as container:
            for k, frame in enumerate(container.decode(video=0)):
                if k in wanted:
                    decoded[k] = to_rgb(frame.to_image())
                if k >= last:
                    break
    except FileNotFoundError:
        raise VideoProblem(f"video not found: {clip.source}") from None
    except av.FFmpegError as e:
        raise VideoProblem(f"video cannot be decoded: {clip.source} ({e.__class__.__name__}: {e})") from None
    if not decoded:
        raise VideoProblem(f"video has no decodable frames: {clip.source}")
    # a header may count a frame or two more than decode: those indices take the last decoded frame
    top = max(decoded)
    return [decoded[min(i, top)] for i in clip.indices]
