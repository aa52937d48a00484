"""Near-duplicate images (pHash within a Hamming distance, colours alike) and duplicate samples (near-duplicate images, same text).

Images are grouped by single linkage: two images within the distance share a group, and so do chains of them.
Rows are visited train first, then eval, in file order: the first row of a group is its original, later rows
are copies (an eval row whose image is a train image's copy is a leak from train into eval)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .index import close_pairs
from .phash import HashCache, as_bits, colour_gap, hash_images
from .rows import SampleRow

DEFAULT_DISTANCE = 8  # of 64 bits: resized / re-encoded copies are 0-4 apart, distinct photos 14+
# of 255 per channel and grid cell: resized / re-encoded / slightly cropped copies differ by a few to ~20
# levels, the same shape in another colour by 100+
COLOUR_TOLERANCE = 40
MAX_DISTANCE = 32  # half the bits: past it two unrelated hashes are as likely close as not


@dataclass
class ImageGroup:
    """Images within the distance of each other (by chains), with every row that shows one of them."""

    images: list[str]  # paths, first seen first: images[0] is the original, the others its copies
    shown: list[tuple[SampleRow, str]]  # (row, image of the group it shows), in reading order
    max_distance: int  # the largest distance between two linked images of the group


@dataclass
class DuplicateSample:
    row: SampleRow
    original: SampleRow  # the first row with the same images (up to near-duplicates) and the same text


@dataclass
class NearDuplicates:
    distance: int
    groups: list[ImageGroup] = field(default_factory=list)
    duplicates: list[DuplicateSample] = field(default_factory=list)
    unhashed: dict[str, str] = field(default_factory=dict)  # path -> why it could not be hashed
    images: int = 0  # distinct image files hashed

    def copy_rows(self) -> dict[SampleRow, SampleRow]:
        """Each row showing a copy of an earlier image (not the group's first file) -> the first row showing that
        first file. Rows sharing one image file (several questions about it) are not copies of each other."""
        out = {}
        for group in self.groups:
            first = next(row for row, image in group.shown if image == group.images[0])
            for row, image in group.shown:
                if image != group.images[0]:
                    out.setdefault(row, first)
        return out


def _normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


class _Groups:
    """Union-find over image indices."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)  # the first-seen image names the group


def find_near_duplicates(rows: list[SampleRow], distance: int = DEFAULT_DISTANCE, cache: HashCache | None = None,
                         progress: bool = True) -> NearDuplicates:
    """Groups of near-duplicate images among `rows` and the rows that repeat a sample (images and text)."""
    hashes, unhashed = hash_images((p for r in rows for p in r.images), cache=cache, progress=progress)
    paths = [p for p in dict.fromkeys(p for r in rows for p in r.images) if p in hashes]  # first seen first
    number = {p: i for i, p in enumerate(paths)}
    groups = _Groups(len(paths))
    spread: dict[int, int] = {}
    for i, j, d in close_pairs(as_bits(hashes[p] for p in paths), distance):
        if colour_gap(hashes[paths[i]], hashes[paths[j]]) > COLOUR_TOLERANCE:
            continue  # the same layout in other colours (pHash sees brightness only)
        groups.join(i, j)
        spread[(i, j)] = d
    root = [groups.find(i) for i in range(len(paths))]
    members: dict[int, list[str]] = {}
    for p in paths:
        members.setdefault(root[number[p]], []).append(p)
    showing: dict[int, list[tuple[SampleRow, str]]] = {}
    for r in rows:
        for p in dict.fromkeys(p for p in r.images if p in number):
            showing.setdefault(root[number[p]], []).append((r, p))
    result = NearDuplicates(distance, unhashed=unhashed, images=len(paths))
    widest: dict[int, int] = {}
    for (i, _), d in spread.items():
        widest[root[i]] = max(widest.get(root[i], 0), d)
    for g, images in members.items():
        if len(images) > 1:
            result.groups.append(ImageGroup(images, showing[g], widest.get(g, 0)))
    result.groups.sort(key=lambda grp: number[grp.images[0]])
    seen: dict[tuple, SampleRow] = {}
    for r in rows:
        if not r.images or any(p not in number for p in r.images):
            continue
        key = (tuple(root[number[p]] for p in r.images), _normalised(r.text))
        if key in seen:
            result.duplicates.append(DuplicateSample(r, seen[key]))
        else:
            seen[key] = r
    return result
