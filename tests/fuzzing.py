"""Hypothesis strategies that craft hostile files from valid seeds, for the fuzz tests of the
two doors that take whole files from strangers (tests/test_trust_fuzz.py).

Random bytes alone almost never get past a file's first check, so most inputs start from a
valid file and change a little of it, at every level an attacker can reach:

- bytes: flips, "interesting" integers written over size fields, truncation, insertion,
  deletion, repeated chunks and splices with another seed;
- zip members: dropped, renamed (path traversal, near-miss names), repeated, added,
  recompressed, their contents mutated or swapped;
- zip headers: declared sizes, CRCs, flags and methods that lie about what a member holds;
- JSON: any field of the manifest or of a record set to any JSON value (NaN, 2**70, lone
  surrogates, terminal escapes...), records repeated, dropped, swapped or replaced by junk;
- numpy: vectors of the wrong shape, dtype, length or finiteness.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from hypothesis import strategies as st

# Values that sit on the edges of the integer widths size and count fields are stored in.
INTERESTING_INTS = (
    0,
    1,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x10000,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
)
_HEAD = 64  # most formats keep their sizes near the start: edits aim there half the time

# ----------------------------------------------------------------------------- bytes

Draw = Callable[[st.SearchStrategy[Any]], Any]


def _position(draw: Draw, length: int) -> int:
    return min(length, draw(st.one_of(st.integers(0, _HEAD), st.integers(0, max(length, 0)))))


def _flip(draw: Draw, data: bytearray, seeds: Sequence[bytes]) -> bytearray:
    if data:
        at = min(_position(draw, len(data)), len(data) - 1)
        data[at] ^= draw(st.integers(1, 255))
    return data


def _overwrite(draw: Draw, data: bytearray, seeds: Sequence[bytes]) -> bytearray:
    at = _position(draw, len(data))
    chunk = draw(st.binary(min_size=1, max_size=16))
    data[at : at + len(chunk)] = chunk
    return data


def _interesting(draw: Draw, data: bytearray, seeds: Sequence[bytes]) -> bytearray:
    at = _position(draw, len(data))
    width = draw(st.sampled_from((1, 2, 4)))
    value = draw(st.sampled_from(INTERESTING_INTS)) & ((1 << (8 * width)) - 1)
    order = draw(st.sampled_from(("big", "little")))
    data[at : at + width] = value.to_bytes(width, order)
    return data


def _truncate(draw: Draw, data: bytearray, seeds: Sequence[bytes]) -> bytearray:
    return data[: _position(draw, len(data))]


def _insert(draw: Draw, data: bytearray, seeds: Sequence[bytes]) -> bytearray:
    at = _position(draw, len(data))
    data[at:at] = draw(st.binary(min_size=1, max_size=64))
    return data


def _delete(draw: Draw, data: bytearray, seeds: Sequence[bytes]) -> bytearray:
    at = _position(draw, len(data))
    del data[at : at + draw(st.integers(1, 256))]
    return data


def _repeat(draw: Draw, data: bytearray, seeds: Sequence[bytes]) -> bytearray:
    at, start = _position(draw, len(data)), _position(draw, len(data))
    data[at:at] = data[start : start + draw(st.integers(1, 512))]
    return data


def _splice(draw: Draw, data: bytearray, seeds: Sequence[bytes]) -> bytearray:
    other = draw(st.sampled_from(seeds))
    return data[: _position(draw, len(data))] + other[_position(draw, len(other)) :]


_EDITS = (_flip, _overwrite, _interesting, _truncate, _insert, _delete, _repeat, _splice)


@st.composite
def mutated_bytes(draw: Draw, seeds: Sequence[bytes], max_edits: int = 4) -> bytes:
    """One of ``seeds`` with one to ``max_edits`` byte-level edits."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, max_edits))):
        data = draw(st.sampled_from(_EDITS))(draw, data, seeds)
    return bytes(data)


def hostile_bytes(seeds: Sequence[bytes], signatures: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    """Mostly mutated seeds; also random bytes, alone or behind a format's signature."""
    return st.one_of(
        mutated_bytes(seeds),
        mutated_bytes(seeds),
        mutated_bytes(seeds),
        st.binary(max_size=512),
        st.builds(bytes.__add__, st.sampled_from(signatures), st.binary(max_size=256)),
    )


# ----------------------------------------------------------------------------- JSON values

NASTY_TEXTS = (
    "",
    " ",
    "tg:1",
    "tg:2",
    "tg:3",
    "tg:7",
    "dc:9",
    "local",
    "Mochi",
    "mochi",
    "Bo",
    "Моchi",  # Cyrillic М, о
    "Ｍｏｃｈｉ",  # fullwidth
    "M" * 64,
    "M" * 65,
    "d" * 300,
    "d" * 301,
    "x" * 4097,
    "\x1b[2J",
    "a\nb",
    "\u202eevil",
    "\ud800",  # a lone surrogate: invalid once encoded to UTF-8
    "\x00",
    "document:credentials",
    "/etc/passwd",
    "../../etc/passwd",
    "https://discord.com/channels/1/2/3",
    "AgACAgIAAxkBAAI000011",
    "1e309",
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from((*INTERESTING_INTS, -1, 2**63, 2**64, 10**20, -(10**20))),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=24),
    st.sampled_from(NASTY_TEXTS),
)
# Near-valid boxes: four numbers, some of them out of range.
_BOXES = st.lists(
    st.one_of(st.integers(-2, 70_000), st.sampled_from(INTERESTING_INTS), st.floats()),
    max_size=5,
)
json_values = st.one_of(
    _SCALARS,
    _BOXES,
    st.recursive(
        _SCALARS,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(
                st.one_of(st.text(max_size=8), st.sampled_from(NASTY_TEXTS)), children, max_size=3
            ),
        ),
        max_leaves=6,
    ),
)


def dump_json(value: Any, ascii_only: bool) -> bytes:
    """JSON bytes as a careless (or hostile) writer makes them: NaN and Infinity allowed, lone
    surrogates written raw (invalid UTF-8) unless escaped."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def _paths(value: Any, prefix: tuple = (), depth: int = 3) -> list[tuple]:
    """Every key path into nested dicts and lists, up to ``depth`` levels."""
    found = [prefix] if prefix else []
    if depth == 0:
        return found
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key), depth - 1)
    elif isinstance(value, list):
        for index, child in enumerate(value[:4]):
            found += _paths(child, (*prefix, index), depth - 1)
    return found


@st.composite
def edited_json(draw: Draw, value: Any) -> Any:
    """``value`` (a dict) with one field, at any depth, set to any JSON value, removed or
    added."""
    if not isinstance(value, dict):
        return draw(json_values)
    value = json.loads(json.dumps(value))  # a deep copy
    paths = _paths(value)
    action = draw(st.sampled_from(("set", "set", "delete", "add")))
    if action == "add" or not paths:
        value[draw(st.one_of(st.text(max_size=8), st.sampled_from(NASTY_TEXTS)))] = draw(
            json_values
        )
        return value
    path = draw(st.sampled_from(paths))
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values)
    return value


# ----------------------------------------------------------------------------- zip archives


@dataclass(frozen=True)
class Member:
    name: str
    data: bytes
    compress: int = zipfile.ZIP_DEFLATED


def members_of(archive: bytes) -> list[Member]:
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        return [Member(i.filename, zf.read(i), i.compress_type) for i in zf.infolist()]


def build_zip(members: Sequence[Member]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": wanted here
        for member in members:
            info = zipfile.ZipInfo(member.name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = member.compress
            zf.writestr(info, member.data)
    return out.getvalue()


MEMBER_NAMES = (
    "../evil.sh",
    "/etc/cron.d/x",
    "crops/../../x.jpg",
    "crops/00000000.jpg",
    "crops/00000004.jpg",
    "crops/99999999.jpg",
    "crops/0000000.jpg",
    "crops/00000000.JPG",
    "crops/",
    "crops\\00000001.jpg",
    "thumbs/00000000.jpg",
    "thumbs/00000003.jpg",
    "manifest.json",
    "MANIFEST.JSON",
    "concepts.jsonl",
    "examples.jsonl",
    "embeddings.npy",
    "photos.jsonl",
    "photo_embeddings.npy",
    "manifest.json\x00.txt",
)
_COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_member_names = st.one_of(st.sampled_from(MEMBER_NAMES), st.text(min_size=1, max_size=24))


@st.composite
def member_edits(draw: Draw, seed: bytes) -> bytes:
    """The seed archive with one to three members dropped, renamed, repeated, added,
    recompressed, mutated or swapped."""
    members = members_of(seed)
    for _ in range(draw(st.integers(1, 3))):
        if not members:
            break
        k = draw(st.integers(0, len(members) - 1))
        action = draw(
            st.sampled_from(("drop", "rename", "repeat", "add", "compress", "mutate", "swap"))
        )
        if action == "drop":
            del members[k]
        elif action == "rename":
            members[k] = replace(members[k], name=draw(_member_names))
        elif action == "repeat":
            members.append(members[k])
        elif action == "add":
            members.insert(k, Member(draw(_member_names), draw(st.binary(max_size=64))))
        elif action == "compress":
            members[k] = replace(members[k], compress=draw(st.sampled_from(_COMPRESSIONS)))
        elif action == "mutate":
            data = members[k].data or b"\0"
            members[k] = replace(members[k], data=draw(mutated_bytes([data])))
        else:
            j = draw(st.integers(0, len(members) - 1))
            members[k], members[j] = (
                replace(members[k], data=members[j].data),
                replace(members[j], data=members[k].data),
            )
    return build_zip(members)


@st.composite
def record_edits(draw: Draw, seed: bytes) -> bytes:
    """The seed archive with its manifest, one of its .jsonl members or one of its vector
    members rewritten with hostile values."""
    members = members_of(seed)
    names = [m.name for m in members]
    candidates = [n for n in names if n.endswith((".json", ".jsonl", ".npy"))]
    k = names.index(draw(st.sampled_from(candidates)))
    member = members[k]
    if member.name.endswith(".json"):
        data = dump_json(draw(edited_json(json.loads(member.data))), draw(st.booleans()))
    elif member.name.endswith(".jsonl"):
        data = draw(_edited_lines(member.data))
    else:
        data = draw(_vectors_like(np.load(io.BytesIO(member.data))))
    members[k] = replace(member, data=data)
    return build_zip(members)


@st.composite
def _edited_lines(draw: Draw, data: bytes) -> bytes:
    lines: list[bytes] = data.splitlines()
    for _ in range(draw(st.integers(1, 2))):
        action = draw(
            st.sampled_from(
                ("field", "field", "field", "borrow", "borrow", "repeat", "drop", "swap", "junk")
            )
        )
        at = draw(st.integers(0, max(len(lines) - 1, 0)))
        if action == "junk" or not lines:
            lines.insert(at, draw(st.one_of(st.binary(max_size=64), st.just(b"[]"))))
        elif action == "field":
            lines[at] = dump_json(draw(edited_json(_parsed(lines[at]))), draw(st.booleans()))
        elif action == "borrow":
            lines[at] = draw(_borrowed(lines, at))
        elif action == "repeat":
            lines.insert(at, lines[draw(st.integers(0, len(lines) - 1))])
        elif action == "drop":
            del lines[at]
        else:
            j = draw(st.integers(0, len(lines) - 1))
            lines[at], lines[j] = lines[j], lines[at]
    return b"\n".join(lines) + b"\n"


# Ways to make a text that is, or looks like, another: the same, another case, fullwidth
# (NFKC folds it back), Latin letters swapped for Cyrillic look-alikes, padded.
_CYRILLIC = str.maketrans("AaBCcEeHKMOopTXxy", "АаВСсЕеНКМОорТХху")
_LOOK_ALIKES: tuple[Callable[[str], str], ...] = (
    lambda text: text,
    str.swapcase,
    lambda text: "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text),
    lambda text: text.translate(_CYRILLIC),
    lambda text: f" {text} ",
)


@st.composite
def _borrowed(draw: Draw, lines: list[bytes], at: int) -> bytes:
    """Line ``at`` with one field set to another line's value of that field, or a look-alike
    of it: the records of one member collide (a name twice, or two look-alike names, in one
    chat; one photo's source given to another; a concept moved to another chat)."""
    record, other = _parsed(lines[at]), _parsed(lines[draw(st.integers(0, len(lines) - 1))])
    if not isinstance(record, dict) or not isinstance(other, dict):
        return lines[at]
    shared = sorted(set(record) & set(other))
    if not shared:
        return lines[at]
    key = draw(st.sampled_from(shared))
    value = other[key]
    if isinstance(value, str):
        value = draw(st.sampled_from(_LOOK_ALIKES))(value)
    return dump_json({**record, key: value}, draw(st.booleans()))


@st.composite
def collided_records(draw: Draw, seed: bytes) -> bytes:
    """The seed archive with one record of a .jsonl member given another record's field, or a
    look-alike of it (see ``_borrowed``): the collisions that random values almost never
    make."""
    members = members_of(seed)
    names = [m.name for m in members if m.name.endswith(".jsonl")]
    k = [m.name for m in members].index(draw(st.sampled_from(names)))
    lines = members[k].data.splitlines()
    at = draw(st.integers(0, len(lines) - 1))
    lines[at] = draw(_borrowed(lines, at))
    members[k] = replace(members[k], data=b"\n".join(lines) + b"\n")
    return build_zip(members)


def _parsed(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError:  # an earlier edit made it junk
        return {}


@st.composite
def _vectors_like(draw: Draw, good: np.ndarray) -> bytes:
    """An .npy member that is almost ``good``: another shape or dtype, a value that is not a
    finite unit vector's, pickled objects, or damaged bytes."""
    n, dim = good.shape
    shape = draw(st.sampled_from(((n, dim), (n, dim), (n + 1, dim), (n, dim - 1), (0, dim), (n,))))
    rows = np.resize(good, shape).astype(np.float32)
    if rows.size and draw(st.booleans()):
        rows.flat[draw(st.integers(0, rows.size - 1))] = draw(
            st.sampled_from((np.nan, np.inf, -np.inf, 0.0, 2.0, 1e38))
        )
    dtype = draw(st.sampled_from(("<f4", "<f4", ">f4", "<f8", "<f2", "<i4", "object")))
    array = np.asfortranarray(rows) if draw(st.booleans()) else rows
    out = io.BytesIO()
    with np.errstate(invalid="ignore", over="ignore"):  # NaN as an integer: wanted here
        np.save(out, array.astype(dtype), allow_pickle=True)
    data = out.getvalue()
    return draw(mutated_bytes([data], max_edits=2)) if draw(st.booleans()) else data


# Central directory entry fields (offset, width) and local header fields an attacker controls.
_CENTRAL_FIELDS = ((8, 2), (10, 2), (16, 4), (20, 4), (24, 4), (28, 2), (42, 4))  # flags, method,
# CRC, compressed size, size, name length, local header offset
_LOCAL_FIELDS = ((6, 2), (8, 2), (14, 4), (18, 4), (22, 4), (26, 2))


def central_entries(archive: bytes) -> list[int]:
    """The offsets of the central directory's entries (from the end-of-directory record)."""
    end = archive.rfind(b"PK\x05\x06")
    count, _, start = struct.unpack_from("<HII", archive, end + 10)
    offsets, at = [], start
    for _ in range(count):
        offsets.append(at)
        name, extra, comment = struct.unpack_from("<HHH", archive, at + 28)
        at += 46 + name + extra + comment
    return offsets


@st.composite
def header_lies(draw: Draw, seed: bytes) -> bytes:
    """The seed archive with one or two header fields of a member (in the central directory
    or its local header) changed: sizes that lie, a wrong CRC, the encrypted flag, another
    method."""
    data = bytearray(seed)
    entries = central_entries(seed)
    for _ in range(draw(st.integers(1, 2))):
        entry = draw(st.sampled_from(entries))
        if draw(st.booleans()):
            offset, width = draw(st.sampled_from(_CENTRAL_FIELDS))
            at = entry + offset
        else:
            local = struct.unpack_from("<I", seed, entry + 42)[0]
            offset, width = draw(st.sampled_from(_LOCAL_FIELDS))
            at = local + offset
        old = int.from_bytes(data[at : at + width], "little")
        value = draw(
            st.one_of(st.sampled_from(INTERESTING_INTS), st.sampled_from((old - 1, old + 1)))
        )
        data[at : at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    return bytes(data)


def hostile_archives(seeds: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    """Crafted archives from valid ones (``seeds``): every kind of edit above, and noise."""
    seed = st.sampled_from(seeds)
    return st.one_of(
        seed.flatmap(record_edits),
        seed.flatmap(record_edits),
        seed.flatmap(collided_records),
        seed.flatmap(member_edits),
        seed.flatmap(header_lies),
        mutated_bytes(seeds),
        st.binary(max_size=256),
        st.builds(bytes.__add__, st.just(b"PK\x03\x04"), st.binary(max_size=256)),
    )
