"""On-disk format of store snapshots and live table files.

Owns: the array file format (``*.arr``: header, raw payload, a crc32 per chunk,
footer) and snapshot directories of generations of such files, switched
atomically through a ``CURRENT`` file, LevelDB style. It must not know what the
arrays mean (rows, index and free lists are the table's business), must not keep
state between calls, and must never copy a whole array: payloads stream in
``chunk_bytes`` pieces straight from and into the caller's memory.

Array file, format 1 (integers little-endian)::

    offset      size       field
    0           8          magic b"SRECARR\\x01"
    8           4          u32 format version (1)
    12          4          u32 ndim (0..8)
    16          16         dtype: numpy ``dtype.str``, ASCII, NUL-padded ("<f4", "|b1")
    32          64         shape: 8 x u64, dims past ndim are 0
    96          8          u64 nbytes: payload bytes = prod(shape) * itemsize
    104         8          u64 chunk_bytes: payload bytes per checksummed chunk
    112         8          u64 chunks = ceil(nbytes / chunk_bytes) (the last may be short)
    120         8          u64 payload_offset (4096 in format 1)
    128         4          u32 crc32 of bytes [0, 128)
    132         3964       zero
    4096        nbytes     payload: the array's bytes in C order
    +nbytes     4*chunks   u32 crc32 of each chunk
    end-32      32         footer: magic b"SRECEND\\x01", u64 nbytes, u64 chunks,
                           u32 crc32 of the chunk table, u32 crc32 of these first 28 bytes

The header implies the file's exact size, so a truncated or over-long file is
refused before its payload is read; the footer checks the tail on its own. The
payload starts on a page boundary, so a mapping of it is page-aligned.

Snapshot directory::

    root/CURRENT              b"gen-000042 crc32=1a2b3c4d\\n" (crc32 of the name)
    root/gen-000042/          the current generation
        MANIFEST.json         {"crc32": "<8 hex>", "manifest": BODY}\\n, crc32 of BODY's bytes
        <name>.arr            one array file per array
    root/gen-000041/          the previous generation, kept for readers still on it

Safety rule: nothing here keeps state; any thread may call any function on
different paths. A file and a snapshot root take one writer at a time (callers
serialise); readers of a root may run beside its writer, since a write deletes
only generations older than the previous one, and a crash (even SIGKILL) at any
point of a write leaves the previous ``CURRENT`` loadable. Every function is safe
in a child forked from a multithreaded parent (Redis BGSAVE style): plain Python,
numpy views, zlib and os only; no threads, locks, numba, or imports at call time.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.errors import CorruptFile, SnapshotError

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "ArrayInfo",
    "SnapshotInfo",
    "map_array",
    "read_array",
    "read_array_into",
    "read_snapshot",
    "snapshot_info",
    "verify_array",
    "write_array",
    "write_snapshot",
]

# crc32 runs ~4 GB/s here: an 8 MiB chunk costs 2 ms, and its 4-byte checksum
# makes the table 1/2,000,000 of the payload (50 KB for a 100 GB arena).
DEFAULT_CHUNK_BYTES = 8 << 20

_VERSION = 1
_MAGIC = b"SRECARR\x01"
_FOOTER_MAGIC = b"SRECEND\x01"
_MAX_NDIM = 8  # store arrays are 1-D or 2-D; 8 keeps the header fixed-size
_HEADER = struct.Struct("<8sII16s8QQQQQ")  # 128 bytes, then the u32 header crc
_CRC = struct.Struct("<I")
_HEADER_BYTES = _HEADER.size + _CRC.size  # 132
_PAYLOAD_OFFSET = 4096  # one page, so a mapped payload is page-aligned
_FOOTER = struct.Struct("<8sQQI")  # 28 bytes, then the u32 footer crc
_FOOTER_BYTES = _FOOTER.size + _CRC.size  # 32
_KINDS = "biufcmMSU"  # dtypes that ``dtype.str`` names completely (no objects, no records)

_MANIFEST_FORMAT = 1
_MANIFEST = "MANIFEST.json"
_CURRENT = "CURRENT"
_CURRENT_TMP = "CURRENT.tmp"
_GEN = re.compile(r"gen-(\d{6,})")
_CURRENT_LINE = re.compile(rb"(gen-\d{6,}) crc32=([0-9a-f]{8})\n")
_MANIFEST_HEAD = re.compile(rb'\{"crc32": "([0-9a-f]{8})", "manifest": ')
_MANIFEST_TAIL = b"}\n"
_NAME_MAX = 200

PathLike = str | os.PathLike[str]
Allocate = Callable[[str, np.dtype, tuple[int, ...]], np.ndarray]


@dataclass(frozen=True)
class ArrayInfo:
    """What one array file holds, as its header and footer say."""

    file: str  # the file's name without directory ("rows.arr")
    dtype: str  # numpy dtype.str of the payload, byte order included ("<f4")
    shape: tuple[int, ...]
    nbytes: int  # payload bytes
    chunk_bytes: int  # payload bytes per checksummed chunk
    chunks: int  # number of chunks
    crc: int  # crc32 of the chunk checksum table: a digest of the whole payload


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot's manifest (see ``snapshot_info``)."""

    path: Path  # the generation directory (root/gen-000042)
    generation: int  # its number (42)
    meta: dict[str, Any]  # the meta mapping given to write_snapshot
    arrays: dict[str, ArrayInfo]  # array name -> its file's ArrayInfo, in the order written


# -- array files -------------------------------------------------------------------------------
# One writer per file and no reader while it is written. Errors, here and below: TypeError and
# ValueError for bad arguments; CorruptFile(path, problem) for a file whose contents are wrong in
# any way; SnapshotError(path) when a file cannot be opened, read or written (OSError as cause).


def write_array(
    path: PathLike, arr: np.ndarray, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, fsync: bool = True
) -> ArrayInfo:
    """Stream ``arr`` into a new array file at ``path`` (replacing any file there); return its info.

    Requires: ``arr`` does not change while it is written (a forked child's view
    of its parent's memory is fine); otherwise the file fails its checksums.

    Args:
        path: the file to create.
        arr: C-contiguous ndarray of at most 8 dims and a plain dtype (bool, number,
            datetime, fixed-width bytes/str), any size; a view of a mapped region is fine.
        chunk_bytes: payload bytes per checksummed chunk.
        fsync: fsync the file before returning (its directory entry is the caller's).
    """
    path = _as_path(path, "path")
    flat = _payload_view(arr, "arr")
    chunk_bytes = _check_chunk_bytes(chunk_bytes)
    nbytes = flat.size
    chunks = -(-nbytes // chunk_bytes)
    table = np.empty(chunks, dtype="<u4")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, _pack_header(arr.dtype, arr.shape, nbytes, chunk_bytes, chunks))
            for i in range(chunks):
                piece = flat[i * chunk_bytes : (i + 1) * chunk_bytes].data
                table[i] = zlib.crc32(piece)
                _write_all(fd, piece)
            crc = _write_tail(fd, table, nbytes)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise SnapshotError(f"cannot write array file: {exc}", path=str(path)) from exc
    return ArrayInfo(path.name, arr.dtype.str, tuple(arr.shape), nbytes, chunk_bytes, chunks, crc)


def read_array_into(path: PathLike, out: np.ndarray) -> None:
    """Read an array file's payload into ``out``, verifying every chunk's checksum.

    Reads sequentially, one chunk at a time, straight into ``out``'s memory.
    ``out`` must be a writeable C-contiguous ndarray; its contents are unspecified
    after an error. CorruptFile's ``problem`` names what is wrong: bad magic or
    version, a damaged header, table or footer, a dtype or shape other than
    ``out``'s, truncation, trailing bytes, or the chunk failing its checksum.
    """
    _check_out(out, "out")
    _read_file(_as_path(path, "path"), out)


def read_array(path: PathLike) -> np.ndarray:
    """Read a whole array file into a new array; raises as ``read_array_into``."""
    return _read_file(_as_path(path, "path"), None)


def map_array(path: PathLike, *, writable: bool) -> np.ndarray:
    """Memory-map an array file's payload in place, for a warm reopen.

    Checks the header, size, checksum table and footer, not the payload (see
    ``verify_array``). A writable mapping is shared: writes reach the file and
    leave its chunk checksums stale, so readers refuse it until it is rewritten.
    Returns an ``np.memmap`` (a plain array when the payload is empty).
    """
    path = _as_path(path, "path")
    fd, info, _ = _open_checked(path, os.O_RDWR if writable else os.O_RDONLY)
    os.close(fd)
    dtype = np.dtype(info.dtype)
    if info.nbytes == 0:
        empty = np.zeros(info.shape, dtype=dtype)
        empty.flags.writeable = writable
        return empty
    try:
        return np.memmap(str(path), dtype, "r+" if writable else "r", _PAYLOAD_OFFSET, info.shape)
    except OSError as exc:
        raise SnapshotError(f"cannot map: {exc}", path=str(path)) from exc


def verify_array(path: PathLike, chunks: Iterable[int] | None = None) -> ArrayInfo:
    """Verify an array file's header, footer and the checksums of ``chunks`` (all if None).

    Returns the file's ``ArrayInfo``; ValueError for a chunk index out of range.
    """
    path = _as_path(path, "path")
    fd, info, table = _open_checked(path, os.O_RDONLY)
    try:
        picked = range(info.chunks) if chunks is None else [int(i) for i in chunks]
        bad = [i for i in picked if not 0 <= i < info.chunks]
        if bad:
            raise ValueError(f"chunks: {bad[:5]} out of range for a file of {info.chunks} chunks")
        buf = np.empty(min(info.chunk_bytes, info.nbytes), dtype=np.uint8)
        for i in picked:
            _check_chunk(path, info, i, table[i], _read_chunk(fd, path, info, i, buf))
    except OSError as exc:
        raise SnapshotError(f"cannot read: {exc}", path=str(path)) from exc
    finally:
        os.close(fd)
    return info


# -- snapshots: one writer per root; readers may run beside it (see the module docstring) --------


def write_snapshot(
    root: PathLike,
    arrays: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    fsync: bool = True,
) -> Path:
    """Write ``arrays`` and ``meta`` as a new generation of ``root`` and make it CURRENT.

    Steps: remove leftovers of crashed writes (generations newer than CURRENT,
    ``CURRENT.tmp``); write each array to ``root/gen-N/<name>.arr``, then
    ``MANIFEST.json``, fsync them and both directories; write ``CURRENT.tmp``,
    fsync, rename it over ``CURRENT`` (the commit), fsync ``root``; remove
    generations other than the new one and the one CURRENT named before.

    Args:
        root: the snapshot directory (created if missing).
        arrays: name -> array; names are ASCII identifiers, arrays as for ``write_array``.
        meta: string-keyed and JSON-serialisable so that it survives a JSON round
            trip unchanged (no tuples, NaN or numpy scalars).
        chunk_bytes: as for ``write_array``.
        fsync: fsync files and directories (turn off only for throwaway data).

    Returns the new generation's directory. CorruptFile if ``root/CURRENT`` exists
    but is damaged (nothing is removed then); on SnapshotError the previous
    snapshot stays CURRENT.
    """
    root = _as_path(root, "root")
    if not isinstance(arrays, Mapping):
        raise TypeError(f"arrays: expected a mapping of name -> ndarray, got {type(arrays).__name__}")
    for name, arr in arrays.items():
        _check_name(name)
        _payload_view(arr, f"arrays[{name!r}]")
    meta = _check_meta(meta)
    chunk_bytes = _check_chunk_bytes(chunk_bytes)
    gen_dir: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        current = _read_current(root)[0] if (root / _CURRENT).exists() else None
        gens = _generations(root)
        for n, p in gens.items():
            if current is None or n > current:
                shutil.rmtree(p)
        (root / _CURRENT_TMP).unlink(missing_ok=True)
        number = max([*gens, current or 0]) + 1
        gen_dir = root / _gen_name(number)
        gen_dir.mkdir()
        files = {k: asdict(write_array(gen_dir / f"{k}.arr", a, chunk_bytes=chunk_bytes, fsync=fsync))
                 for k, a in arrays.items()}
        body = {"format": _MANIFEST_FORMAT, "generation": number, "meta": meta, "arrays": files}
        text = json.dumps(body, indent=1, allow_nan=False).encode("ascii")
        manifest = b'{"crc32": "%08x", "manifest": %s%s' % (zlib.crc32(text), text, _MANIFEST_TAIL)
        _write_file(gen_dir / _MANIFEST, manifest, fsync)
        if fsync:
            _fsync_dir(gen_dir)
            _fsync_dir(root)
        gen = _gen_name(number).encode("ascii")
        _write_file(root / _CURRENT_TMP, b"%s crc32=%08x\n" % (gen, zlib.crc32(gen)), fsync)
        os.replace(root / _CURRENT_TMP, root / _CURRENT)
        gen_dir = None  # committed: the new snapshot is CURRENT whatever happens next
        if fsync:
            _fsync_dir(root)
    except BaseException as exc:
        if gen_dir is not None:
            shutil.rmtree(gen_dir, ignore_errors=True)
        if isinstance(exc, OSError):
            raise SnapshotError(f"cannot write snapshot: {exc}", path=str(root)) from exc
        raise
    for n, p in _generations(root).items():
        if n not in (number, current):
            shutil.rmtree(p, ignore_errors=True)  # what fails here, the next write retries
    return root / _gen_name(number)


def snapshot_info(root: PathLike) -> SnapshotInfo:
    """Read and verify ``root``'s CURRENT and manifest, without reading arrays.

    SnapshotError if there is no snapshot; CorruptFile if CURRENT or MANIFEST.json
    is damaged or of an unknown format.
    """
    number, gen = _read_current(_as_path(root, "root"))
    path = Path(root) / gen / _MANIFEST
    p = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SnapshotError(f"cannot read manifest of CURRENT {gen}: {exc.strerror}", path=p) from exc
    head = _MANIFEST_HEAD.match(data)
    if head is None:
        raise CorruptFile(path=p, problem="bad opening: not a streamrec manifest")
    if not data.endswith(_MANIFEST_TAIL) or len(data) < head.end() + len(_MANIFEST_TAIL):
        raise CorruptFile(path=p, problem="truncated: does not end in '}\\n'")
    text = data[head.end() : -len(_MANIFEST_TAIL)]
    if (crc := zlib.crc32(text)) != int(head.group(1), 16):
        problem = f"checksum mismatch (stored {head.group(1).decode()}, computed {crc:08x})"
        raise CorruptFile(path=p, problem=problem)
    try:
        body = json.loads(text.decode("ascii"))
        fmt = body.get("format") if isinstance(body, dict) else None
        if fmt != _MANIFEST_FORMAT:
            raise CorruptFile(path=p, problem=f"unknown manifest format {fmt!r} (this build reads 1)")
        if body["generation"] != number:
            raise CorruptFile(path=p, problem=f"manifest of generation {body['generation']!r} in {gen}")
        meta, arrays = body["meta"], body["arrays"]
        if not isinstance(meta, dict) or not isinstance(arrays, dict):
            raise TypeError("meta and arrays must be objects")
        infos = {}
        for name, entry in arrays.items():
            _check_name(name)
            infos[name] = info = _info_from_json(entry)
            if info.file != f"{name}.arr":
                raise ValueError(f"array {name!r} lives in {info.file!r}")
    except (UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CorruptFile(path=p, problem=f"malformed manifest: {exc!r}") from exc
    return SnapshotInfo(path.parent, number, meta, infos)


def read_snapshot(
    root: PathLike, allocate: Allocate | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Load ``root``'s CURRENT snapshot, every array fully verified.

    First checks every file's header, footer and table against the manifest
    (cheap), then reads the payloads; returns only if everything verified.

    Args:
        root: the snapshot directory.
        allocate: ``allocate(name, dtype, shape)`` returns the writeable C-contiguous
            array to read each array into (a view of a reserved region, say); new
            arrays if None. After an error those arrays hold unspecified bytes.

    Returns ``(meta, arrays)``: the meta dict, and name -> array in the order
    written. TypeError/ValueError if ``allocate`` returns an unsuitable array.
    """
    info = snapshot_info(root)
    for ai in info.arrays.values():
        os.close(_open_checked(info.path / ai.file, os.O_RDONLY, expect=ai)[0])
    out: dict[str, np.ndarray] = {}
    for name, ai in info.arrays.items():
        dtype = np.dtype(ai.dtype)
        if allocate is None:
            arr = np.empty(ai.shape, dtype=dtype)
        else:
            arr = allocate(name, dtype, ai.shape)
            what = f"allocate({name!r}, ...) result"
            _check_out(arr, what)
            if arr.dtype != dtype or arr.shape != ai.shape:
                raise ValueError(f"{what}: expected {dtype.str} {ai.shape}, got {arr.dtype.str} {arr.shape}")
        out[name] = _read_file(info.path / ai.file, arr, expect=ai)
    return info.meta, out


# -- internals: array files --------------------------------------------------------------------


def _pack_header(dtype: np.dtype, shape: tuple[int, ...], nbytes: int, chunk_bytes: int, n: int) -> bytes:
    dims = [*shape] + [0] * (_MAX_NDIM - len(shape))
    sizes = (nbytes, chunk_bytes, n, _PAYLOAD_OFFSET)
    head = _HEADER.pack(_MAGIC, _VERSION, len(shape), dtype.str.encode("ascii"), *dims, *sizes)
    return (head + _CRC.pack(zlib.crc32(head))).ljust(_PAYLOAD_OFFSET, b"\0")


def _write_tail(fd: int, table: np.ndarray, nbytes: int) -> int:
    """Write the chunk table and footer at the file position; return the table's crc."""
    raw = table.astype("<u4", copy=False).tobytes()
    crc = zlib.crc32(raw)
    footer = _FOOTER.pack(_FOOTER_MAGIC, nbytes, len(table), crc)
    _write_all(fd, raw + footer + _CRC.pack(zlib.crc32(footer)))
    return crc


def _check_header(fd: int, path: Path) -> ArrayInfo:
    """Parse and check the header, not the file's size; the info returned has ``crc=0``."""
    p = str(path)
    head = _pread(fd, _PAYLOAD_OFFSET, 0)
    if len(head) < _HEADER_BYTES:
        raise CorruptFile(path=p, problem=f"truncated: {len(head):,} of {_PAYLOAD_OFFSET:,} header bytes")
    magic, version, ndim, raw_dtype, *rest = _HEADER.unpack_from(head)
    dims, (nbytes, chunk_bytes, chunks, offset) = rest[:_MAX_NDIM], rest[_MAX_NDIM:]
    if magic != _MAGIC:
        raise CorruptFile(path=p, problem=f"bad magic {magic!r}: not a streamrec array file")
    if version != _VERSION:
        raise CorruptFile(path=p, problem=f"unknown format version {version} (this build reads {_VERSION})")
    if zlib.crc32(head[: _HEADER.size]) != _CRC.unpack_from(head, _HEADER.size)[0]:
        raise CorruptFile(path=p, problem="header checksum mismatch")
    if len(head) < _PAYLOAD_OFFSET:
        raise CorruptFile(path=p, problem=f"truncated: {len(head):,} of {_PAYLOAD_OFFSET:,} header bytes")
    if any(head[_HEADER_BYTES:]):
        raise CorruptFile(path=p, problem="header padding is not zero")
    dtype_str = raw_dtype.rstrip(b"\0").decode("ascii", "replace")
    try:
        dtype = np.dtype(dtype_str)
    except (TypeError, ValueError):
        dtype = np.dtype("O")
    shape = tuple(dims[:ndim])
    if dtype.kind not in _KINDS or dtype.str != dtype_str or dtype.itemsize == 0:
        problem = f"unsupported dtype {dtype_str!r}"
    elif ndim > _MAX_NDIM or any(dims[ndim:]):
        problem = f"ndim {ndim} with dims {dims}"
    elif math.prod(shape) * dtype.itemsize != nbytes:
        problem = f"{nbytes:,} payload bytes do not hold {dtype_str} {shape}"
    elif chunk_bytes < 1 or chunks != -(-nbytes // chunk_bytes):
        problem = f"{chunks} chunks of {chunk_bytes} bytes do not cover {nbytes:,} bytes"
    elif offset != _PAYLOAD_OFFSET:
        problem = f"payload offset {offset} (format {_VERSION} puts it at {_PAYLOAD_OFFSET})"
    else:
        return ArrayInfo(path.name, dtype_str, shape, nbytes, chunk_bytes, chunks, 0)
    raise CorruptFile(path=p, problem=f"inconsistent header: {problem}")


def _truncated(size: int, info: ArrayInfo) -> str:
    """The problem of a file of ``size`` bytes too short for ``info``."""
    if size < _PAYLOAD_OFFSET + info.nbytes:
        return f"truncated: {max(size - _PAYLOAD_OFFSET, 0):,} of {info.nbytes:,} payload bytes"
    have, want = size - _PAYLOAD_OFFSET - info.nbytes, 4 * info.chunks + _FOOTER_BYTES
    return f"truncated: {have:,} of {want:,} bytes of checksum table and footer"


def _open_checked(path: Path, flags: int, expect: ArrayInfo | None = None) -> tuple[int, ArrayInfo, list]:
    """Open ``path``; check header, size, table, footer and ``expect``; return fd, info, chunk crcs.

    The caller closes the fd.
    """
    p = str(path)
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise SnapshotError(f"cannot open: {exc.strerror}", path=p) from exc
    try:
        info = _check_header(fd, path)
        size, tail_bytes = os.fstat(fd).st_size, 4 * info.chunks + _FOOTER_BYTES
        end = _PAYLOAD_OFFSET + info.nbytes + tail_bytes
        if size < end:
            raise CorruptFile(path=p, problem=_truncated(size, info))
        if size > end:
            raise CorruptFile(path=p, problem=f"{size - end:,} bytes of trailing garbage after the footer")
        tail = _pread(fd, tail_bytes, _PAYLOAD_OFFSET + info.nbytes)
        if len(tail) < tail_bytes:  # shrank since fstat
            raise CorruptFile(path=p, problem=_truncated(_PAYLOAD_OFFSET + info.nbytes + len(tail), info))
        raw, footer = tail[: 4 * info.chunks], tail[4 * info.chunks :]
        magic, nbytes, chunks, table_crc = _FOOTER.unpack_from(footer)
        if magic != _FOOTER_MAGIC:
            raise CorruptFile(path=p, problem=f"bad footer magic {magic!r}")
        if zlib.crc32(footer[: _FOOTER.size]) != _CRC.unpack_from(footer, _FOOTER.size)[0]:
            raise CorruptFile(path=p, problem="footer checksum mismatch")
        if (nbytes, chunks) != (info.nbytes, info.chunks):
            problem = f"footer says {nbytes:,} bytes, {chunks} chunks; header {info.nbytes:,}, {info.chunks}"
            raise CorruptFile(path=p, problem=problem)
        if zlib.crc32(raw) != table_crc:
            raise CorruptFile(path=p, problem="checksum table does not match its crc in the footer")
        info = replace(info, crc=table_crc)
        if expect is not None and info != expect:
            diff = "; ".join(
                f"{f.name} {getattr(info, f.name)!r} in the file, {getattr(expect, f.name)!r} in the manifest"
                for f in fields(ArrayInfo)
                if getattr(info, f.name) != getattr(expect, f.name)
            )
            raise CorruptFile(path=p, problem=f"does not match {_MANIFEST}: {diff}")
        return fd, info, np.frombuffer(raw, dtype="<u4").tolist()
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError):
            raise SnapshotError(f"cannot read: {exc}", path=p) from exc
        raise


def _read_file(path: Path, out: np.ndarray | None, expect: ArrayInfo | None = None) -> np.ndarray:
    """Check ``path``, read and verify every chunk into ``out`` (a new array if None); return it."""
    fd, info, table = _open_checked(path, os.O_RDONLY, expect)
    try:
        if out is None:
            out = np.empty(info.shape, dtype=np.dtype(info.dtype))
        if out.dtype != np.dtype(info.dtype) or out.shape != info.shape:
            problem = f"holds {info.dtype} {info.shape}, expected {out.dtype.str} {out.shape}"
            raise CorruptFile(path=str(path), problem=problem)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        dest = out.reshape(-1).view(np.uint8)
        for i in range(info.chunks):
            piece = dest[i * info.chunk_bytes : (i + 1) * info.chunk_bytes]
            _check_chunk(path, info, i, table[i], _read_chunk(fd, path, info, i, piece))
    except OSError as exc:
        raise SnapshotError(f"cannot read: {exc}", path=str(path)) from exc
    finally:
        os.close(fd)
    return out


def _read_chunk(fd: int, path: Path, info: ArrayInfo, i: int, buf: np.ndarray) -> memoryview:
    """Read chunk ``i`` into the front of ``buf`` (flat uint8); return the bytes read as a view."""
    start = i * info.chunk_bytes
    view = buf[: min(info.chunk_bytes, info.nbytes - start)].data
    done = 0
    while done < view.nbytes:
        got = os.preadv(fd, [view[done:]], _PAYLOAD_OFFSET + start + done)
        if got == 0:
            problem = f"truncated: {start + done:,} of {info.nbytes:,} payload bytes"
            raise CorruptFile(path=str(path), problem=problem)
        done += got
    return view


def _check_chunk(path: Path, info: ArrayInfo, i: int, stored: int, data: memoryview) -> None:
    crc = zlib.crc32(data)
    if crc != stored:
        problem = f"chunk {i} of {info.chunks}: checksum mismatch (stored {stored:08x}, computed {crc:08x})"
        raise CorruptFile(path=str(path), problem=problem)


# -- internals: snapshots ----------------------------------------------------------------------


def _gen_name(number: int) -> str:
    return f"gen-{number:06d}"


def _generations(root: Path) -> dict[int, Path]:
    """Generation directories in ``root`` by number (exact ``gen-NNNNNN`` names only)."""
    out = {}
    for entry in os.scandir(root):
        m = _GEN.fullmatch(entry.name)
        if m and entry.name == _gen_name(int(m.group(1))) and entry.is_dir(follow_symlinks=False):
            out[int(m.group(1))] = root / entry.name
    return out


def _read_current(root: Path) -> tuple[int, str]:
    path = root / _CURRENT
    try:
        data = path.read_bytes()
    except OSError as exc:
        missing = isinstance(exc, FileNotFoundError)
        message = "no snapshot: CURRENT not found" if missing else f"cannot read: {exc.strerror}"
        raise SnapshotError(message, path=str(path)) from exc
    m = _CURRENT_LINE.fullmatch(data)
    if m is None:
        raise CorruptFile(path=str(path), problem=f"not a CURRENT line: {data[:40]!r}")
    if zlib.crc32(m.group(1)) != int(m.group(2), 16):
        raise CorruptFile(path=str(path), problem=f"checksum mismatch for {m.group(1)!r}")
    name = m.group(1).decode("ascii")
    return int(name[4:]), name


def _info_from_json(entry: Any) -> ArrayInfo:
    names = [f.name for f in fields(ArrayInfo)]
    if not isinstance(entry, dict) or set(entry) != set(names):
        raise ValueError(f"bad array entry {entry!r}")
    file, dtype, shape, *ints = (entry[k] for k in names)
    ok_ints = isinstance(shape, list) and all(type(v) is int and v >= 0 for v in [*ints, *shape])
    if not (ok_ints and isinstance(file, str) and isinstance(dtype, str)):
        raise ValueError(f"bad array entry {entry!r}")
    return ArrayInfo(file, dtype, tuple(shape), *ints)


# -- internals: checks and os helpers ----------------------------------------------------------


def _as_path(value: Any, what: str) -> Path:
    if not isinstance(value, str | os.PathLike):
        raise TypeError(f"{what}: expected a str or os.PathLike path, got {type(value).__name__}")
    return Path(value)


def _check_dtype(dtype: np.dtype, what: str) -> None:
    if dtype.kind not in _KINDS or dtype.fields is not None or dtype.subdtype or not dtype.itemsize:
        raise TypeError(
            f"{what}: dtype {dtype} cannot be stored; expected bool, integer, float, complex, "
            "datetime/timedelta or fixed-width bytes/str"
        )


def _payload_view(arr: Any, what: str) -> np.ndarray:
    """The array's bytes as a flat uint8 view (no copy), after checking type, dtype, layout, ndim."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{what}: expected a numpy ndarray, got {type(arr).__name__}")
    _check_dtype(arr.dtype, what)
    if not arr.flags.c_contiguous:
        raise ValueError(f"{what}: expected a C-contiguous array (np.ascontiguousarray copies one)")
    if arr.ndim > _MAX_NDIM:
        raise ValueError(f"{what}: expected at most {_MAX_NDIM} dims, got {arr.ndim}")
    return arr.reshape(-1).view(np.uint8)


def _check_out(out: Any, what: str) -> None:
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{what}: expected a numpy ndarray, got {type(out).__name__}")
    if not out.flags.writeable or not out.flags.c_contiguous:
        raise ValueError(f"{what}: expected a writeable C-contiguous array")
    _check_dtype(out.dtype, what)


def _check_chunk_bytes(chunk_bytes: Any) -> int:
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int | np.integer):
        raise TypeError(f"chunk_bytes: expected an int, got {type(chunk_bytes).__name__}")
    if not 1 <= chunk_bytes <= 1 << 40:
        raise ValueError(f"chunk_bytes: expected 1 <= chunk_bytes <= 2**40, got {chunk_bytes}")
    return int(chunk_bytes)


def _check_name(name: Any) -> None:
    if not (isinstance(name, str) and name.isascii() and name.isidentifier() and len(name) <= _NAME_MAX):
        raise ValueError(f"array name {name!r}: expected an ASCII identifier of at most {_NAME_MAX} chars")


def _check_meta(meta: Any) -> dict[str, Any]:
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta: expected a mapping, got {type(meta).__name__}")
    meta = dict(meta)
    try:
        text = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"meta: must be JSON-serialisable: {exc}") from None
    if json.loads(text) != meta:
        raise ValueError("meta: does not survive a JSON round trip unchanged (tuples? non-string keys?)")
    return meta


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view.nbytes:
        view = view[os.write(fd, view) :]


def _write_file(path: Path, data: bytes, fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pread(fd: int, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes at ``offset``; fewer only at the end of the file."""
    parts = []
    while n > 0 and (part := os.pread(fd, n, offset)):
        parts.append(part)
        n, offset = n - len(part), offset + len(part)
    return b"".join(parts)
