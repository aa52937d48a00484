"""`vlmtune validate` of a contrastive recipe: the model is a dual encoder of a known family, and every row of
data.train / data.eval is an image-caption pair whose image opens; every problem by file and row at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import VlmtuneError
from .pairs import read_pairs


@dataclass
class PairReport:
    """What `vlmtune validate` prints for a contrastive recipe (the VLM one's ok / family / render)."""

    family: str
    splits: dict[str, tuple[int, int]] = field(default_factory=dict)  # split -> (images, captions)
    images_checked: str = "header"  # header | decode
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self, limit: int = 200) -> str:
        lines = [f"{split}: {n} image-caption pairs, {c} captions ({c / max(n, 1):.1f} per image); images "
                 f"{'decoded in full' if self.images_checked == 'decode' else 'header-checked'}"
                 for split, (n, c) in self.splits.items()]
        if not self.problems:
            return "\n".join([*lines, "OK: no problem would stop training"])
        lines.append(f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''} would stop training:")
        lines += [f"  error: {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)


def check_pairs(recipe, decode_images: bool = False) -> PairReport:
    """The model's family, then each split's pairs and images (decoded in full with `decode_images`)."""
    from .train import family_of

    problems: list[str] = []
    try:
        family = family_of(recipe).name
    except VlmtuneError as e:
        family, problems = "unknown", [str(e)]
    decode = decode_images or recipe.data.check_images == "decode"
    report = PairReport(family, images_checked="decode" if decode else "header", problems=problems)
    for split in ("train", "eval"):
        path = getattr(recipe.data, split)
        if not path:
            continue
        try:
            pairs = read_pairs(path, recipe.data)
        except VlmtuneError as e:
            report.problems.append(f"data.{split}: {e}")
            continue
        report.splits[split] = (len(pairs), sum(len(p.captions) for p in pairs))
        report.problems += [f"{p.source}: image {p.image}: {why}" for p in pairs
                            if (why := _image_problem(p.image, decode, recipe.data.max_image_pixels))]
    return report


def _image_problem(path: str, decode: bool, max_pixels: int) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                return (f"{im.width}x{im.height} pixels is over data.max_image_pixels ({max_pixels}); shrink it "
                        "or raise the limit")
            if decode:
                im.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return f"cannot be read ({e}); replace or remove the row"
    return None
