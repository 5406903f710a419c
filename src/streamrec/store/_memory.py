"""Anonymous memory regions for tables: reserved address space, huge pages.

Owns: ``Region``, a contiguous byte range of process memory reserved up front
and materialised page by page on first touch, either anonymous or backed by a
file (``Region.file``: a table's live files, which a restarted process maps
again instead of rebuilding). A table's row arena lives in one region for its
whole life, so it grows without copying or moving, and readers holding views
of it never see it unmapped. It must not know what is stored in the bytes.

File-backed regions map the whole reservation but keep the file only as long
as the bytes in use (``ensure``), growing it ahead of writes; they never shrink
it while mapped, so no view can touch a page past the end of the file (which
would be SIGBUS). Files in ``/dev/shm`` get no huge pages here (shmem THP is
``never``), which is why anonymous memory stays the default layout.

Why reserve: ``MAP_NORESERVE`` address space costs a VMA and nothing else; the
kernel backs a page only when it is first written. Growth is then "use more of
the region": no reallocation, no copy, no stale views for concurrent readers.

Why huge pages: a random-row gather over a large arena misses the TLB on 4 KiB
pages far more than on 2 MiB pages (``gather_huge_over_4k`` of
``benchmarks/store.py`` measures it), and transparent huge pages are in
``madvise`` mode here, so the region asks for them with ``MADV_HUGEPAGE``.

Thread safety: a Region is immutable after construction; its bytes follow the
rules of whoever owns them.
"""

from __future__ import annotations

import contextlib
import mmap
import os

import numpy as np

__all__ = ["Region"]

# Linux's MAP_NORESERVE (same value on x86-64 and aarch64); Python's mmap module
# does not export it.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_HUGE = 2 * 1024 * 1024
_MADV_POPULATE_READ = 22


class Region:
    """``nbytes`` of reserved, zero-filled, page-on-touch anonymous memory.

    Args:
        nbytes: bytes to reserve (rounded up to a 2 MiB multiple).
        huge_pages: ask for transparent huge pages.
        min_nbytes: if the full reservation is refused (address-space limits,
            strict overcommit), halve it down to this before giving up.

    Raises:
        MemoryError: not even ``min_nbytes`` could be reserved.
    """

    _path: str | None = None  # the backing file, for file-backed regions
    _file_size: int = 0  # bytes the backing file holds

    def __init__(self, nbytes: int, *, huge_pages: bool = True, min_nbytes: int = 0) -> None:
        want = max(_round_up(nbytes, _HUGE), _HUGE)
        floor = max(_round_up(min_nbytes, _HUGE), _HUGE)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        while True:
            try:
                self._mm = mmap.mmap(-1, want, flags=flags)
                break
            except OSError:
                if want <= floor:
                    raise MemoryError(f"cannot reserve {want} bytes of address space") from None
                want = max(floor, _round_up(want // 2, _HUGE))
        if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
            self._mm.madvise(mmap.MADV_HUGEPAGE)
        self.nbytes = want
        self.huge_pages = huge_pages

    @classmethod
    def file(cls, path: str, nbytes: int, *, size: int = 0) -> Region:
        """A region backed by ``path`` (created if absent), mapped shared.

        Args:
            path: the file; its current length is kept if larger than ``size``.
            nbytes: address space to reserve (the most the file may grow to).
            size: bytes the file must hold now.
        """
        self = cls.__new__(cls)
        want = max(_round_up(nbytes, _HUGE), _HUGE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            cur = os.fstat(fd).st_size
            if cur > want:
                raise ValueError(f"{path}: {cur} bytes, more than the {want} reserved for it")
            if size > cur:
                os.ftruncate(fd, size)
            # A shared mapping may extend past the end of the file (pages there
            # are touched only after ensure() has grown the file over them), but
            # Python's mmap refuses to map more than the file holds: stretch the
            # file (sparse) to map it, then cut it back.
            os.ftruncate(fd, want)
            try:
                self._mm = mmap.mmap(fd, want, flags=mmap.MAP_SHARED | _MAP_NORESERVE,
                                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.ftruncate(fd, max(size, cur))
        finally:
            os.close(fd)
        self._path = path
        self._file_size = max(size, cur)
        self.nbytes = want
        self.huge_pages = False
        return self

    @property
    def path(self) -> str | None:
        return self._path

    @property
    def file_size(self) -> int:
        """Bytes the backing file holds (the whole region for anonymous memory)."""
        return self._file_size if self._path is not None else self.nbytes

    def ensure(self, size: int) -> None:
        """Make at least ``size`` bytes usable (file-backed: grow the file by 1/8 or more)."""
        path = self.path
        if path is None or size <= self._file_size:
            return
        if size > self.nbytes:
            raise MemoryError(f"{path}: {size} bytes needed, {self.nbytes} reserved")
        new = min(self.nbytes, max(size, self._file_size + self._file_size // 8, _HUGE))
        with open(path, "r+b") as f:
            os.ftruncate(f.fileno(), new)
        self._file_size = new

    def populate(self, nbytes: int) -> None:
        """Fault in the first ``nbytes`` in one call (MADV_POPULATE_READ, Linux 5.14+).

        Cheaper than taking one page fault per 4 KiB page on first use; a no-op
        where the kernel does not know the advice.
        """
        n = min(nbytes, self.file_size)
        if n > 0:
            with contextlib.suppress(OSError):
                self._mm.madvise(_MADV_POPULATE_READ, 0, n)

    def flush(self) -> None:
        """Write dirty pages of a file-backed region to its file (msync)."""
        if self.path is not None:
            self._mm.flush()

    def release(self, start: int, stop: int) -> None:
        """Give the pages wholly inside bytes [start, stop) back to the system.

        They read as zeros afterwards and cost nothing until written again.
        Readers may still hold views there: they read zeros, never unmapped memory.
        """
        lo = _round_up(max(start, 0), _HUGE)
        hi = min(stop, self.nbytes) // _HUGE * _HUGE
        if hi > lo:
            # MADV_REMOVE also frees a file's backing store (tmpfs, most disk fs)
            # while keeping its length, so views stay valid.
            advice = mmap.MADV_REMOVE if self.path is not None else mmap.MADV_DONTNEED
            try:
                self._mm.madvise(advice, lo, hi - lo)
            except OSError:
                self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def array(self, dtype: np.dtype | type, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        """A view of the region's bytes as an array (C order), sharing memory."""
        dt = np.dtype(dtype)
        count = int(np.prod(shape)) if shape else 1
        return np.frombuffer(self._mm, dtype=dt, count=count, offset=offset).reshape(shape)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m
