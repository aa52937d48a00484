"""Pixel bounds of processors that size images by pixel count (Qwen2-VL's `size` = shortest/longest edge in pixels)."""

from __future__ import annotations


def bounded_size(size, min_pixels: int | None = None, max_pixels: int | None = None):
    """A processor's `size` with the given bounds replaced, of the same type (dict or transformers' SizeDict)."""
    new = dict(size)
    if min_pixels:
        new["shortest_edge"] = min_pixels
    if max_pixels:
        new["longest_edge"] = max_pixels
    return new if isinstance(size, dict) else type(size)(**new)


def set_bounds(processor, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
    """Set the bounds on an image or video processor in place (unset ones keep the processor's own)."""
    if min_pixels or max_pixels:
        processor.size = bounded_size(processor.size, min_pixels, max_pixels)


def bounds_of(processor) -> dict:
    size = processor.size
    return {"min_pixels": size.get("shortest_edge"), "max_pixels": size.get("longest_edge")}


def call_kwargs(processor, max_pixels: int | None) -> dict:
    """Keyword arguments that process one call under a lower max_pixels (none when it is None)."""
    if max_pixels is None:
        return {}
    return {"size": {k: v for k, v in dict(bounded_size(processor.size, max_pixels=max_pixels)).items()
                     if v is not None}}
