"""Safetensors I/O for the shard-wise merge: base checkpoint index, size parsing, a streaming shard writer.

The writer knows every tensor's name, dtype and shape before any data is read, so it writes the
safetensors header first and then each tensor's bytes as they are produced: memory holds one tensor
at a time, never a whole output shard.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import VlmtuneError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype codes (from the format's specification)
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_FROM_CODE = {code: dtype for dtype, code in _DTYPES.items()}


def dtype_from_code(code: str) -> torch.dtype:
    try:
        return _FROM_CODE[code]
    except KeyError:
        raise VlmtuneError(f"unsupported safetensors dtype {code!r} in the base checkpoint") from None


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536_870_912, an int stays bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*", str(text))
    if not m:
        raise VlmtuneError(f"cannot read the shard size {text!r}; write it like 5GB, 500MB or 2GiB")
    number, unit = float(m.group(1)), (m.group(2) or "B").upper().rstrip("B") or "B"
    powers = {"B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
              "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    size = int(number * powers[unit])
    if size <= 0:
        raise VlmtuneError(f"the shard size must be positive, got {text!r}")
    return size


@dataclass(frozen=True)
class TensorInfo:
    name: str  # name as stored in the checkpoint
    shard: str  # file name of the shard holding it
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_checkpoint_index(folder: Path) -> list[TensorInfo]:
    """Every tensor of a safetensors checkpoint (single file or sharded with an index), headers only."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
    elif (folder / SINGLE_FILE).is_file():
        shards = [SINGLE_FILE]
    else:
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
        raise VlmtuneError(f"the base model folder {folder} has no {SINGLE_FILE} or {INDEX_FILE}"
                           + (f" (found {', '.join(found)}); " if found else "; ")
                           + "the merge reads safetensors weights only")
    out = []
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            raise VlmtuneError(f"the base checkpoint's index names {shard}, which is missing from {folder}")
        for name, (code, shape) in read_header(path).items():
            out.append(TensorInfo(name, shard, dtype_from_code(code), tuple(shape)))
    return out


def read_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype code, shape) from a safetensors file's header, in file order."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return {name: (h["dtype"], h["shape"]) for name, h in items}


def plan_shards(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int) -> list[list[int]]:
    """Split tensors (in order) into shards of at most max_bytes each (a bigger tensor gets its own shard)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, dtype, shape) in enumerate(tensors):
        n = nbytes(dtype, shape)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


def shard_name(i: int, total: int) -> str:
    return f"model-{i + 1:05d}-of-{total:05d}.safetensors"


class ShardWriter:
    """Writes one safetensors file whose header is fixed up front; `write` takes the tensors in order."""

    def __init__(self, path: Path, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in tensors:
            if dtype not in _DTYPES:
                raise VlmtuneError(f"cannot write {name}: unsupported dtype {dtype}")
            n = nbytes(dtype, shape)
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self.expected = [(name, dtype, tuple(shape)) for name, dtype, shape in tensors]
        self.data_bytes = offset
        self.done = 0
        self.file = open(path, "wb")  # noqa: SIM115 (closed in close())
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, dtype, shape = self.expected[self.done]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"shard writer expected {want_name} {dtype} {shape}, got {name} {tensor.dtype} "
                               f"{tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self.file.write(data.view(torch.uint8).numpy().data)
        self.done += 1

    def close(self) -> None:
        self.file.close()
        if self.done != len(self.expected):
            raise RuntimeError(f"shard closed after {self.done} of {len(self.expected)} tensors")


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
