"""Model checkpoints: dense weights, store snapshots and a manifest, published as versions of a
model directory whose ``CURRENT`` file serving watches.

Owns: the layout of a model directory, publishing a version atomically, and loading the current
one with every file verified. It must not know a model's architecture: the caller passes a
state_dict and a JSON-able config, and rebuilds the module itself.

A model directory::

    CURRENT              "v000017 <crc32 of v000017/MANIFEST.json, 8 hex>\\n": the commit point
    v000017/
        dense.pt         torch.save of the dense state_dict (weights_only-loadable)
        optimizer.pt     optional: optimizer state to resume training (the trainer's: {"dense": Adam's
                         state_dict, "sparse": SparseAdam's over hashed tables, or None})
        tables/NAME/     EmbeddingTable.snapshot of each sparse table (its own checksummed format)
        MANIFEST.json    format, version, created time, model config, feature set, counters, and
                         the size and crc32 of every other file of the version
    .tmp-v000018-PID/    a version being written (removed by the next publish if its writer died)
    .publish.lock        flock'd by the one publisher

Publishing (``publish``): write everything into ``.tmp-vN-PID/``, fsync every file and directory,
rename it to ``vN/``, fsync the model directory, then write ``CURRENT.tmp``, fsync it,
``os.replace`` it over ``CURRENT`` and fsync the directory. A crash anywhere before the replace
leaves ``CURRENT`` naming the previous version, which stays loadable (old versions are pruned only
after the switch, and never the one ``CURRENT`` names or the one before it).

Loading (``load_current``): read ``CURRENT``, check the manifest against its crc32, check every
listed file's size and crc32, then load. Anything wrong raises ``CheckpointError`` naming the
file and the problem, and nothing is returned half-loaded.

Thread/process safety: one publisher per model directory (enforced with ``flock``; a second
raises ``CheckpointError``). Any number of readers in any processes; a reader races only with
pruning, so a reader slower than ``keep`` publishes can find its version gone (it then gets
``CheckpointError`` and reads ``CURRENT`` again).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from streamrec.errors import CheckpointError, SnapshotError

if TYPE_CHECKING:
    from streamrec.store.table import EmbeddingTable

__all__ = ["FORMAT_VERSION", "Checkpoint", "current_version", "load_current", "publish"]

FORMAT_VERSION = 1
_CURRENT = "CURRENT"
_MANIFEST = "MANIFEST.json"
_LOCK = ".publish.lock"
_VERSION_RE = re.compile(r"^v(\d{6,})$")
_TMP_RE = re.compile(r"^\.tmp-v(\d{6,})-(\d+)$")
_CURRENT_RE = re.compile(rb"^(v\d{6,}) ([0-9a-f]{8})\n$")
_READ_CHUNK = 4 << 20


@dataclass(frozen=True)
class Checkpoint:
    """One loaded, verified version.

    Attributes:
        version: its number (``v000017`` -> 17).
        path: its directory.
        manifest: the manifest (``model``, ``features``, ``counters``, ``created_unix`` ...).
        dense: the dense state_dict, on CPU.
        optimizer: the optimizer state saved with it (the trainer's ``{"dense": ..., "sparse": ...}``),
            or None if it was not saved.
        tables: name -> ``EmbeddingTable`` opened from the version's snapshot (the caller closes
            them), empty when loaded with ``tables=False``.
    """

    version: int
    path: Path
    manifest: dict[str, Any]
    dense: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    tables: dict[str, EmbeddingTable] = field(default_factory=dict)

    @property
    def model_config(self) -> dict[str, Any]:
        """The model config the publisher passed."""
        return dict(self.manifest.get("model", {}))


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc_file(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _version_name(n: int) -> str:
    return f"v{n:06d}"


def _list_versions(model_dir: Path) -> list[int]:
    out = []
    for p in model_dir.iterdir():
        m = _VERSION_RE.match(p.name)
        if m and p.is_dir():
            out.append(int(m.group(1)))
    return sorted(out)


def _read_current(model_dir: Path) -> tuple[str, int] | None:
    """(version directory name, manifest crc32) that CURRENT names, or None if there is no CURRENT."""
    path = model_dir / _CURRENT
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(path=str(path), problem=f"cannot read: {exc.strerror}") from exc
    m = _CURRENT_RE.match(data)
    if m is None:
        raise CheckpointError(path=str(path), problem=f"malformed: {data[:64]!r}")
    return m.group(1).decode(), int(m.group(2), 16)


def current_version(model_dir: str | os.PathLike[str]) -> int | None:
    """The version number ``CURRENT`` names (cheap: reads one small file), or None before the first
    publish. What a watcher polls; ``load_current`` then verifies it."""
    cur = _read_current(Path(model_dir))
    return None if cur is None else int(cur[0][1:])


@contextlib.contextmanager
def _publisher_lock(model_dir: Path) -> Iterator[None]:
    fd = os.open(model_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(path=str(model_dir),
                                  problem="another process is publishing into this directory") from None
        yield
    finally:
        os.close(fd)  # releases the flock


def _remove_leftovers(model_dir: Path, current: str | None) -> None:
    """Under the publisher lock: temp directories of dead publishes, and version directories newer
    than CURRENT (renamed into place by a publish that died before switching CURRENT)."""
    cur_n = int(current[1:]) if current else -1
    for p in model_dir.iterdir():
        if _TMP_RE.match(p.name) or ((m := _VERSION_RE.match(p.name)) and int(m.group(1)) > cur_n):
            shutil.rmtree(p, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (model_dir / (_CURRENT + ".tmp")).unlink()


def _write_version(tmp: Path, dense: Mapping[str, torch.Tensor], optimizer: Mapping[str, Any] | None,
                   tables: Mapping[str, EmbeddingTable], meta: dict[str, Any], fsync: bool) -> bytes:
    """Write a whole version into ``tmp``; return the manifest's bytes."""
    tmp.mkdir()
    torch.save({k: v.detach().cpu() for k, v in dense.items()}, tmp / "dense.pt")
    if optimizer is not None:
        torch.save(dict(optimizer), tmp / "optimizer.pt")
    if tables:
        (tmp / "tables").mkdir()
    for name, table in tables.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
            raise ValueError(f"tables: name {name!r} must be a plain file name ([A-Za-z0-9_.-]+)")
        try:
            table.snapshot(tmp / "tables" / name, wait=True)
        except SnapshotError as exc:
            raise CheckpointError(path=str(tmp), problem=f"table {name!r} snapshot failed: {exc}") from exc
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            files[p.relative_to(tmp).as_posix()] = {"bytes": p.stat().st_size, "crc32": f"{_crc_file(p):08x}"}
            if fsync:
                _fsync_path(p)
    manifest = {**meta, "files": files}
    data = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    (tmp / _MANIFEST).write_bytes(data)
    if fsync:
        _fsync_path(tmp / _MANIFEST)
        for d in sorted({tmp, *(p for p in tmp.rglob("*") if p.is_dir())}):
            _fsync_path(d, directory=True)
    return data


def _switch_current(model_dir: Path, name: str, manifest_crc: int, fsync: bool) -> None:
    tmp = model_dir / (_CURRENT + ".tmp")
    with open(tmp, "wb") as f:
        f.write(f"{name} {manifest_crc:08x}\n".encode())
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, model_dir / _CURRENT)
    if fsync:
        _fsync_path(model_dir, directory=True)


def _prune(model_dir: Path, keep: int, current: int) -> None:
    for n in _list_versions(model_dir)[:-keep]:
        if n < current - 1:  # never CURRENT, nor the one a slow reader may still be opening
            shutil.rmtree(model_dir / _version_name(n), ignore_errors=True)


def publish(model_dir: str | os.PathLike[str], dense: Mapping[str, torch.Tensor], *,
            tables: Mapping[str, EmbeddingTable] | None = None,
            optimizer: Mapping[str, Any] | None = None,
            model_config: Mapping[str, Any] | None = None,
            features: Mapping[str, Any] | None = None,
            counters: Mapping[str, int] | None = None,
            keep: int = 3, fsync: bool = True) -> int:
    """Publish a new version into ``model_dir`` and switch ``CURRENT`` to it.

    Args:
        model_dir: the model directory (created if missing).
        dense: the dense state_dict (``module.state_dict()``); tensors are copied to CPU.
        tables: name -> in-process ``EmbeddingTable`` to snapshot (a PS cluster snapshots itself).
        optimizer: the dense optimizer's state_dict, to resume training from this version.
        model_config, features: JSON-able descriptions of the model (its config dataclass as a
            dict) and of the feature set; serving rebuilds both from them.
        counters: e.g. ``{"samples": ..., "batches": ...}``.
        keep: versions to keep (>= 2); older ones are removed after the switch.
        fsync: fsync files and directories (turn off only for throwaway directories).

    Returns the new version number.
    Raises CheckpointError if another process is publishing or a table snapshot fails; on any
    error ``CURRENT`` still names the previous version.
    """
    if keep < 2:
        raise ValueError(f"keep: expected >= 2 (CURRENT and the one before it), got {keep}")
    root = Path(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT_VERSION,
        "created_unix": time.time(),
        "model": dict(model_config or {}),
        "features": dict(features or {}),
        "counters": {k: int(v) for k, v in (counters or {}).items()},
        "tables": sorted(tables or {}),
        "optimizer": optimizer is not None,
    }
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"model_config/features/counters: expected JSON-able values: {exc}") from None
    with _publisher_lock(root):
        cur = _read_current(root)
        _remove_leftovers(root, cur[0] if cur else None)
        versions = _list_versions(root)
        number = max([*versions, int(cur[0][1:]) if cur else 0]) + 1
        name = _version_name(number)
        tmp = root / f".tmp-{name}-{os.getpid()}"
        try:
            data = _write_version(tmp, dense, optimizer, tables or {}, {**meta, "version": number}, fsync)
            os.rename(tmp, root / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if fsync:
            _fsync_path(root, directory=True)
        _switch_current(root, name, zlib.crc32(data), fsync)
        _prune(root, keep, number)
    return number


def _verify(vdir: Path, manifest_crc: int) -> dict[str, Any]:
    mpath = vdir / _MANIFEST
    try:
        data = mpath.read_bytes()
    except OSError as exc:
        raise CheckpointError(path=str(mpath), problem=f"cannot read the manifest: {exc.strerror}") from exc
    if zlib.crc32(data) != manifest_crc:
        raise CheckpointError(path=str(mpath), problem=f"crc32 {zlib.crc32(data):08x}, CURRENT says "
                              f"{manifest_crc:08x} (torn or replaced)")
    try:
        manifest = json.loads(data)
        files = manifest["files"]
        fmt = manifest["format"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(path=str(mpath), problem=f"unreadable manifest: {exc}") from None
    if fmt != FORMAT_VERSION:
        raise CheckpointError(path=str(mpath), problem=f"format {fmt!r}, this build reads {FORMAT_VERSION}")
    for rel, want in files.items():
        p = vdir / rel
        try:
            size = p.stat().st_size
        except OSError as exc:
            raise CheckpointError(path=str(p), problem=f"listed in the manifest but {exc.strerror}") from exc
        if size != want["bytes"]:
            raise CheckpointError(path=str(p), problem=f"{size} bytes, the manifest says {want['bytes']}")
        if (crc := f"{_crc_file(p):08x}") != want["crc32"]:
            raise CheckpointError(path=str(p), problem=f"crc32 {crc}, the manifest says {want['crc32']}")
    return dict(manifest)


def load_current(model_dir: str | os.PathLike[str], *, tables: bool = True) -> Checkpoint:
    """Load the version ``CURRENT`` names, after verifying every file of it.

    Args:
        model_dir: the model directory.
        tables: also open each table snapshot as an in-process ``EmbeddingTable``.

    Raises:
        CheckpointError: no ``CURRENT`` yet, or the version is missing, half-written or corrupt
            (names the file and the problem). Nothing is returned half-loaded.
    """
    root = Path(model_dir)
    cur = _read_current(root)
    if cur is None:
        raise CheckpointError(path=str(root), problem="no CURRENT: nothing published yet")
    name, crc = cur
    vdir = root / name
    manifest = _verify(vdir, crc)
    try:
        dense = torch.load(vdir / "dense.pt", map_location="cpu", weights_only=True)
        opt = (torch.load(vdir / "optimizer.pt", map_location="cpu", weights_only=True)
               if manifest.get("optimizer") else None)
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(path=str(vdir), problem=f"torch.load failed: {exc}") from exc
    opened: dict[str, EmbeddingTable] = {}
    if tables:
        from streamrec.store.table import EmbeddingTable

        try:
            for tname in manifest.get("tables", []):
                opened[tname] = EmbeddingTable.open(vdir / "tables" / tname)
        except SnapshotError as exc:
            for t in opened.values():
                t.close()
            raise CheckpointError(path=str(vdir / "tables"),
                                  problem=f"table snapshot refused: {exc}") from exc
    return Checkpoint(version=int(name[1:]), path=vdir, manifest=manifest, dense=dense, optimizer=opt,
                      tables=opened)
