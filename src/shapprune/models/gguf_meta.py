"""Reading a GGUF file's header (metadata and tensor table) without touching its tensor data.

The header is read with ``struct`` from a memory map: a few milliseconds even for a 262k-token vocabulary,
where ``gguf.GGUFReader`` builds numpy views of every field and tensor. Every read is bounds-checked, and the
tensor table is checked against the file size, so a truncated or foreign file ends in one
:class:`~shapprune.errors.UserError` ("FILE is truncated or not a GGUF") instead of a ``struct.error``.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from shapprune.errors import UserError

MAGIC = b"GGUF"
#: Arrays longer than this keep only their length (token lists, scores, merges).
MAX_KEPT_ARRAY = 256

# GGUF value types: (struct format, size); 8 = string, 9 = array.
_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    pass


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int


@dataclass
class GGUFHeader:
    """What the header says: metadata (long arrays as their length only) and the tensor table."""

    path: str
    version: int
    metadata: dict = field(default_factory=dict)
    array_lengths: dict = field(default_factory=dict)
    tensors: list[GGUFTensorInfo] = field(default_factory=list)
    data_offset: int = 0

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    @property
    def block_count(self) -> int | None:
        arch = self.architecture
        value = self.metadata.get(f"{arch}.block_count") if arch else None
        return int(value) if isinstance(value, int) else None


class _Cursor:
    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, fmt: str, size: int):
        if self.pos + size > self.size:
            raise _Truncated
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q", 8)
        if self.pos + n > self.size:
            raise _Truncated
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.take("<Q", 8)
        if self.pos + n > self.size:
            raise _Truncated
        self.pos += n

    def value(self, vtype: int, keep: bool = True):
        if vtype in _SCALARS:
            return self.take(*_SCALARS[vtype])
        if vtype == _STRING:
            if keep:
                return self.string()
            self.skip_string()
            return None
        if vtype == _ARRAY:
            item_type = self.take("<I", 4)
            count = self.take("<Q", 8)
            keep_items = keep and count <= MAX_KEPT_ARRAY
            if item_type in _SCALARS and not keep_items:
                size = _SCALARS[item_type][1] * count
                if self.pos + size > self.size:
                    raise _Truncated
                self.pos += size
                return count
            if item_type == _STRING and not keep_items:  # a vocabulary: skip its strings in one tight loop
                pos, buf, size, unpack = self.pos, self.buf, self.size, struct.unpack_from
                for _ in range(count):
                    if pos + 8 > size:
                        raise _Truncated
                    pos += 8 + unpack("<Q", buf, pos)[0]
                if pos > size:
                    raise _Truncated
                self.pos = pos
                return count
            items = [self.value(item_type, keep_items) for _ in range(count)]
            return items if keep_items else count
        raise _Truncated  # an unknown type: not a GGUF we can read


def _not_gguf(path: str | Path) -> UserError:
    return UserError(f"{path} is truncated or not a GGUF file; download or convert it again")


def read_header(path: str | Path) -> GGUFHeader:
    """The header of the GGUF file at ``path``; :class:`UserError` when it is truncated or not a GGUF. Read
    once per process for the same file (path, size and modification time)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HEADERS:
        while len(_HEADERS) >= 8:
            _HEADERS.pop(next(iter(_HEADERS)))
        _HEADERS[key] = _parse_header(path, st.st_size)
    return _HEADERS[key]


#: headers read in this process, by (resolved path, size, mtime)
_HEADERS: dict[tuple[str, int, int], GGUFHeader] = {}


def _parse_header(path: Path, size: int) -> GGUFHeader:
    try:
        with open(path, "rb") as fh:
            if size < 24:
                raise _not_gguf(path)
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        cur = _Cursor(buf, size)
        if bytes(buf[:4]) != MAGIC:
            raise _not_gguf(path)
        cur.pos = 4
        version = cur.take("<I", 4)
        if version not in (2, 3):
            raise UserError(f"{path}: GGUF version {version} is not supported (versions 2 and 3 are)")
        n_tensors = cur.take("<Q", 8)
        n_kv = cur.take("<Q", 8)
        header = GGUFHeader(str(path), version)
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.take("<I", 4)
            value = cur.value(vtype)
            if vtype == _ARRAY and isinstance(value, int):
                header.array_lengths[key] = value
            else:
                header.metadata[key] = value
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.take("<I", 4)
            shape = tuple(cur.take("<Q", 8) for _ in range(n_dims))
            ggml_type = cur.take("<I", 4)
            offset = cur.take("<Q", 8)
            header.tensors.append(GGUFTensorInfo(name, shape, ggml_type, offset))
        align = int(header.metadata.get("general.alignment", 32) or 32)
        header.data_offset = (cur.pos + align - 1) // align * align
        end = max((header.data_offset + t.offset + _nbytes(t) for t in header.tensors), default=cur.pos)
        if end > size:
            raise _not_gguf(path)
        return header
    except _Truncated:
        raise _not_gguf(path) from None
    finally:
        buf.close()


def _nbytes(t: GGUFTensorInfo) -> int:
    """Bytes a tensor occupies (0 when its type is unknown to the installed ``gguf``: not checked then)."""
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(t.ggml_type)]
    except (ImportError, KeyError, ValueError):
        return 0
    n = 1
    for d in t.shape:
        n *= d
    return n // block * type_size


def check_gguf(path: str | Path) -> GGUFHeader:
    """Alias of :func:`read_header` for call sites that only validate."""
    return read_header(path)
