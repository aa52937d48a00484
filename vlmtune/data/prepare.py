"""Data file -> training examples, once, before training: read, check images, count tokens, format, budget."""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from .. import families
from ..families import Family, ImagePlan
from .conversation import Conversation
from .formats import RowProblem, read_rows
from .formatting import IGNORE_INDEX, FormatError, Formatter
from .images import DEFAULT_MAX_IMAGE_PIXELS, ImageProblem, image_size, load_rgb
from .video import VideoClip, VideoInfo, describe, frame_settings, probe, sample_indices, sampled_fps

OVERLONG_POLICIES = ("drop", "error", "shrink_images")
AUTO_DECODE_MAX_IMAGES = 5000  # data.check_images=auto decodes every image up front when there are at most this many


@dataclass
class Example:
    """One training sample: token ids and labels, plus what the image and video processors need later."""

    input_ids: list[int]
    labels: list[int]
    images: list[str]
    grids: list[tuple[int, ...]]
    source: str
    max_pixels: int | None = None  # a per-sample pixel bound, set when images were shrunk to fit
    videos: list[VideoClip] = field(default_factory=list)
    media: list[tuple[int, int, str]] = field(default_factory=list)  # token spans of images/videos (Formatted.media)

    def media_tokens(self, kind: str = "image") -> int:
        return sum(b - a for a, b, k in self.media if k == kind)

    @property
    def num_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class RowResult:
    """What became of one data row: an example (possibly dropped as too long) or a problem."""

    row: int
    example: Example | None = None
    problem: RowProblem | None = None
    dropped: bool = False
    fingerprint: str = ""
    shrink_bound: int | None = None  # too long, but fits with its images under this max_pixels (shrink_images)


@dataclass
class PreparedData:
    examples: list[Example] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)  # rows that stop training
    dropped: list[RowProblem] = field(default_factory=list)  # rows left out (too long)
    duplicates: list[RowProblem] = field(default_factory=list)  # rows equal to an earlier row (kept)
    warnings: list[RowProblem] = field(default_factory=list)  # columns or keys no reader used, once per file
    rows: int = 0
    shrunk: int = 0
    shrinkable: list[RowProblem] = field(default_factory=list)  # rows shrink_images shrinks (or, asked, would shrink)
    decoded: int = 0  # image files decoded in full before training
    header_only: int = 0  # image files only header-checked (their pixels are first decoded in training)

    @property
    def num_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def num_supervised(self) -> int:
        return sum(e.num_supervised for e in self.examples)

    @property
    def num_images(self) -> int:
        return sum(len(e.images) for e in self.examples)

    @property
    def num_videos(self) -> int:
        return sum(len(e.videos) for e in self.examples)

    noun = "examples"  # what `kept` holds, in the summary's words

    def kept(self) -> list:
        """What training takes from the split: the examples (a preference split's pairs: data/preference.py)."""
        return self.examples

    @property
    def refused(self) -> RowProblem | None:
        """The problem, when the whole source was refused before any row could be read (bad JSON, a missing column)."""
        if self.rows == 1 and not self.kept() and len(self.problems) == 1 and self.problems[0].unreadable:
            return self.problems[0]
        return None

    def headline(self) -> str:
        tokens = self.num_tokens
        frac = self.num_supervised / tokens if tokens else 0.0
        videos = f"{self.num_videos} videos, " if self.num_videos else ""
        return (f"{self.rows} rows -> {len(self.examples)} examples, {self.num_images} images, {videos}"
                f"{tokens} tokens ({frac:.1%} supervised)")

    def summary(self) -> str:
        if (p := self.refused) is not None:
            message = p.message.removeprefix(f"row {p.row}: ").removeprefix(f"item {p.row}: ")
            return f"{p.file} could not be read, so there are no {self.noun}: {message}"
        lines = [self.headline()]
        if self.rows and not self.kept():
            lines[0] = (f"{self.rows} rows and none usable: {len(self.problems)} with problems, "
                        f"{len(self.dropped)} too long")
        lines.extend(f"warning: {w}" for w in self.warnings)
        if self.shrunk:
            lines.append(f"{self.shrunk} rows had their images shrunk to fit data.max_length")
        if self.dropped:
            lines.append(f"{len(self.dropped)} rows dropped because they do not fit data.max_length "
                         f"(image tokens are never cut); first: {self.dropped[0]}")
        return "\n".join(lines)


def iter_rows(path: str | Path, fmt: str, image_root: str | None, formatter: Formatter, family: Family,
              max_length: int, on_overlong: str = "drop", read_options: dict | None = None,
              max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, find_shrinkable: bool = False,
              sizes: dict | None = None) -> Iterator[RowResult]:
    """Each row of a data file, read, checked and formatted; problems become values, never exceptions.

    `read_options`: the other keyword arguments of `formats.read_rows` (see `formats.reader_options`).
    Images are measured from their headers; larger than `max_image_pixels` is a row problem. `sizes` receives
    what the headers said (image path -> (width, height), ("video", ref) -> VideoInfo, or the problem).
    `find_shrinkable`: search, for each too-long row with images, the pixel bound that would make it fit
    (`RowResult.shrink_bound`) even when `on_overlong` is not shrink_images (validate reports them)."""
    sizes = {} if sizes is None else sizes
    measure = partial(image_size, max_pixels=max_image_pixels)
    shrink = find_shrinkable or on_overlong == "shrink_images"
    for index, item in enumerate(read_rows(Path(path), fmt, image_root, **(read_options or {}))):
        if isinstance(item, RowProblem):
            yield RowResult(index, problem=item)
            continue
        yield _row(index, item, formatter, family, sizes, max_length, on_overlong, measure, shrink)


def prepare(path: str | Path, fmt: str, image_root: str | None, formatter: Formatter, family: Family,
            max_length: int, on_overlong: str = "drop", desc: str = "preparing data",
            read_options: dict | None = None, check_images: str = "auto",
            max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, find_shrinkable: bool = False,
            sizes: dict | None = None, *, rows=iter_rows, out: PreparedData | None = None) -> PreparedData:
    """Read and format a whole data file; problems are collected with file and row.

    `check_images` (data.check_images): `decode` decodes every image of the examples in full before training
    (in threads), which also finds truncated or corrupt pixel data; `header` reads headers only; `auto`
    decodes when there are at most AUTO_DECODE_MAX_IMAGES image files. `find_shrinkable`: fill `shrinkable`
    under every data.on_overlong (see `iter_rows`); `sizes` receives every image and video the rows referenced.
    `rows` and `out`: another kind of row and its split (data/preference.py: iter_pairs, PreparedPairs); what a
    row result keeps (`RowResult.example`) has `source`, `max_pixels`, `images` and `videos`."""
    out = PreparedData() if out is None else out
    seen: dict[str, RowProblem] = {}
    sizes = {} if sizes is None else sizes
    read_options = {**(read_options or {}), "warn": out.warnings.append}
    results = rows(path, fmt, image_root, formatter, family, max_length, on_overlong, read_options,
                   max_image_pixels, find_shrinkable, sizes)
    for result in tqdm(results, desc=desc, unit=" rows", leave=False):
        out.rows += 1
        if result.shrink_bound is not None:
            source = result.example.source if result.example else f"{result.problem.file}:{result.problem.row}"
            out.shrinkable.append(_problem_at(source, f"max_pixels={result.shrink_bound}"))
        if result.problem is not None:
            (out.dropped if result.dropped else out.problems).append(result.problem)
            continue
        ex = result.example
        if result.fingerprint in seen:
            first = seen[result.fingerprint]
            out.duplicates.append(_problem_at(ex.source, f"duplicate of row {first.row}"))
        else:
            seen[result.fingerprint] = _problem_at(ex.source, "")
        out.shrunk += ex.max_pixels is not None
        out.kept().append(ex)
    _decode_images(out, check_images, max_image_pixels, sizes)
    return out


def _decode_images(out: PreparedData, check_images: str, max_image_pixels: int, sizes: dict) -> None:
    """Decode every image (and frame-list frame) of the examples as training will; a row whose file does not
    decode, or decodes to another size than its header planned (`sizes`, as `iter_rows` measured), becomes a
    problem."""
    files: dict[str, list[Example]] = {}
    planned: dict[str, tuple[int, int]] = {}
    for ex in out.kept():
        refs = {ref: sizes[ref] for ref in ex.images}
        for clip in ex.videos:
            if isinstance(clip.source, tuple):  # a frame list: each frame has the size the video's probe found
                info = sizes[("video", clip.source)]
                refs.update((clip.source[i], (info.width, info.height)) for i in clip.indices)
        planned.update(refs)
        for ref in refs:
            files.setdefault(ref, []).append(ex)
    if check_images == "header" or (check_images == "auto" and len(files) > AUTO_DECODE_MAX_IMAGES):
        out.header_only = len(files)
        return
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # Pillow decodes outside the GIL
        found = pool.map(lambda ref: _decode_problem(ref, planned[ref], max_image_pixels), files)
        bad = {ref: problem for ref, problem in tqdm(zip(files, found, strict=True), total=len(files), desc="decoding images",
                                                      unit=" images", leave=False) if problem}
    out.decoded = len(files)
    failed: dict[str, str] = {}  # row source -> its first problem
    for ref, problem in bad.items():
        for ex in files[ref]:
            failed.setdefault(ex.source, problem)
    if failed:
        out.kept()[:] = [ex for ex in out.kept() if ex.source not in failed]
        out.duplicates = [d for d in out.duplicates if f"{d.file}:{d.row}" not in failed]
        out.problems = sorted([*out.problems, *(_problem_at(src, msg) for src, msg in failed.items())],
                              key=lambda p: p.row)


def _decode_problem(ref: str, planned: tuple[int, int], max_pixels: int) -> str | None:
    """Why the file does not decode to the (width, height) its header promised, or None."""
    try:
        decoded = load_rgb(ref, max_pixels).size
    except ImageProblem as e:
        return str(e)
    if decoded != planned:
        return (f"image {ref} decodes to {decoded[0]}x{decoded[1]} but its header says {planned[0]}x{planned[1]}; "
                "re-save the file")
    return None


def _row(index: int, conv: Conversation, formatter: Formatter, family: Family, sizes: dict, max_length: int,
         on_overlong: str, measure=image_size, shrink: bool = True) -> RowResult:
    dims = []
    for ref in conv.images:
        if ref not in sizes:
            try:
                sizes[ref] = measure(Path(ref))
            except ImageProblem as e:
                sizes[ref] = e
        if isinstance(sizes[ref], ImageProblem):
            return RowResult(index, problem=_problem(conv, str(sizes[ref])))
        dims.append(sizes[ref])
    try:
        clips = video_clips(family, formatter.processor, conv.videos, sizes)
        example = format_example(conv, formatter, family, dims, formatter.processor, clips=clips)
    except (FormatError, ValueError) as e:  # ImageProblem and VideoProblem are ValueErrors
        return RowResult(index, problem=_problem(conv, str(e).removeprefix(f"{conv.source}: ")))
    fingerprint = hashlib.sha1(repr((example.input_ids, example.labels, conv.images, conv.videos)).encode()).hexdigest()
    if example.num_supervised == 0:
        return RowResult(index, problem=_problem(conv, "no token is supervised (every reply has train: false?)"))
    shrunk = None
    if shrink and len(example.input_ids) > max_length and dims:
        shrunk = _shrink(conv, formatter, family, dims, max_length, example, clips)
        if on_overlong == "shrink_images":
            example = shrunk or example
    bound = shrunk.max_pixels if shrunk is not None else None
    if len(example.input_ids) > max_length:
        n_img = example.media_tokens("image")
        hint = ("raise max_length or shorten the sample" if on_overlong == "shrink_images"
                else "raise max_length, lower data.max_pixels, set data.on_overlong=shrink_images, "
                     "or shorten the sample")
        n_vid = example.media_tokens("video")
        if n_vid:  # video tokens are never cut or shrunk: fewer or smaller frames make them fit
            hint += ", or lower data.video_max_frames / data.video_max_pixels"
        kinds = f"{n_img} image tokens" + (f", {n_vid} video tokens" if n_vid else "")
        problem = _problem(conv, f"{len(example.input_ids)} tokens ({kinds}) do not fit "
                                 f"data.max_length={max_length}; {hint}")
        return RowResult(index, example=example, problem=problem, dropped=on_overlong != "error", shrink_bound=bound)
    return RowResult(index, example=example, fingerprint=fingerprint, shrink_bound=bound)


def plan_images(family: Family, processor, refs: list[str], dims) -> list[ImagePlan]:
    """The family's plan for each image of one sample, given each image's (width, height)."""
    try:
        return family.plan_images(processor, [(height, width) for width, height in dims])
    except ValueError as e:  # e.g. an extreme aspect ratio the processor refuses
        sizes = ", ".join(f"{ref} ({w}x{h})" for ref, (w, h) in zip(refs, dims, strict=True))
        raise ValueError(f"image {sizes} cannot be processed: {e}") from None


def video_clips(family: Family, processor, refs: list, cache: dict) -> list[VideoClip]:
    """Each video of one sample planned: frames sampled under the processor's video settings, tokens, grid.

    `cache` keeps each video's headers (or its problem) across rows; raises ValueError for a bad video."""
    if not refs:
        return []
    if not family.takes_video():
        takers = ", ".join(f.name for f in families.all_families() if f.takes_video())
        raise ValueError(f"this model family ({family.name}) does not take video; remove the video parts"
                         + (f" or use a family that does ({takers})" if takers else ""))
    fps, max_frames, multiple = frame_settings(processor)
    clips = []
    for ref in refs:
        key = ("video", ref)
        if key not in cache:
            try:
                cache[key] = probe(ref)
            except ImageProblem as e:  # VideoProblem included
                cache[key] = e
        info: VideoInfo | ImageProblem = cache[key]
        if isinstance(info, ImageProblem):
            raise info
        indices = sample_indices(info.frames, info.fps, fps, max_frames, multiple)
        try:
            tokens, grid = family.video_layout(processor, len(indices), info.height, info.width)
        except ValueError as e:  # e.g. an extreme aspect ratio the processor refuses
            raise ValueError(f"{describe(ref)} ({info.width}x{info.height}) cannot be processed: {e}") from None
        seconds = multiple / sampled_fps(info, indices, fps)
        clips.append(VideoClip(ref, tuple(indices), tuple(grid), tokens, seconds, info.fps or fps))
    return clips


def format_example(conv: Conversation, formatter: Formatter, family: Family, dims, processor,
                   max_pixels: int | None = None, clips: list[VideoClip] = ()) -> Example:
    """One conversation as training formats it, given each image's (width, height)."""
    plans = plan_images(family, processor, conv.images, dims) if conv.images else []
    formatted = formatter(conv, [p.text for p in plans], [family.video_sequence(processor, c) for c in clips])
    return Example(formatted.input_ids, formatted.labels, conv.images, [p.grid for p in plans], conv.source,
                   max_pixels, list(clips), formatted.media)


def _shrink(conv: Conversation, formatter: Formatter, family: Family, dims, max_length: int,
            full: Example, clips: list[VideoClip] = ()) -> Example | None:
    """The example under the largest pixel bound (>= min_pixels) that fits max_length, or None."""
    if family.pixels is None:
        return None  # this family's image processor has no pixel bounds to lower
    floor, top = family.pixels.get(formatter.processor.image_processor)
    if not top or not floor:
        return None
    text_tokens = len(full.input_ids) - full.media_tokens("image")

    def image_tokens(max_pixels: int) -> int:
        processor = _with_max_pixels(family, formatter.processor, max_pixels)
        return sum(p.tokens for p in plan_images(family, processor, full.images, dims))

    best, lo, hi = None, floor, top - 1
    while lo <= hi:  # image tokens grow with the bound: find the largest bound that fits
        mid = (lo + hi) // 2
        if text_tokens + image_tokens(mid) <= max_length:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    if best is None:
        return None
    return format_example(conv, formatter, family, dims, _with_max_pixels(family, formatter.processor, best), best,
                          clips)


def _with_max_pixels(family: Family, processor, max_pixels: int):
    clone = copy.copy(processor)
    clone.image_processor = copy.copy(processor.image_processor)
    family.pixels.set(clone.image_processor, None, max_pixels)
    return clone


def _problem(conv: Conversation, message: str) -> RowProblem:
    return _problem_at(conv.source, message)


def _problem_at(source: str, message: str) -> RowProblem:
    file, _, row = source.rpartition(":")
    return RowProblem(file, int(row) if row.isdigit() else 0, message)
