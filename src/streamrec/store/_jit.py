"""The numba settings and the three LLVM intrinsics every store kernel uses.

Owns: ``kernel`` (the one ``njit`` configuration of the store) and the intrinsics
``prefetch``, ``barrier`` and ``ctz``. It must not hold state.

Why these settings, once:
- ``nogil=True``: readers run on many threads beside the writer; kernels must
  not hold the GIL.
- ``cache=True``: compiled kernels are cached on disk next to the sources, so
  only the first run on a machine pays the compile (0.3-1 s per kernel).
- ``error_model="numpy"``: float division by zero gives inf/nan rather than a
  Python exception check on every division.
- ``boundscheck=False``: wrappers check every array they pass in; inside,
  indices come from the index, whose row numbers are always below the arena's
  reservation (so even a torn read addresses mapped memory).

Thread safety: stateless.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["barrier", "ctz", "inline", "kernel", "load_acquire", "prefetch", "prefetch2", "prefetch2_nta"]

def _drop_stale_cache() -> None:
    """Delete this package's cached kernels when any kernel source changed.

    Numba keys a cached kernel on its own file's timestamp only, so editing an
    inlined helper in another module (``_index``, ``_rows``...) would leave
    callers running the old helper. A stamp of all the store's sources fixes it.
    """
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for src in sorted(here.glob("*.py")):
        digest.update(src.name.encode())
        digest.update(src.read_bytes())
    cache = here / "__pycache__"
    stamp = cache / "streamrec-kernels.stamp"
    want = digest.hexdigest()
    try:
        if stamp.read_text() == want:
            return
    except OSError:
        pass
    try:
        cache.mkdir(exist_ok=True)
        for f in list(cache.glob("*.nbi")) + list(cache.glob("*.nbc")):
            f.unlink(missing_ok=True)
        stamp.write_text(want)
    except OSError:  # a read-only install: numba then cannot cache either
        pass


_drop_stale_cache()

_SETTINGS: dict[str, Any] = {
    "nogil": True,
    "cache": True,
    "error_model": "numpy",
    "boundscheck": False,
}

kernel = njit(**_SETTINGS)
"""Decorator for a store kernel (public-to-the-package entry points)."""

inline = njit(inline="always", **_SETTINGS)
"""Decorator for small helpers inlined into kernels (hashing, tag match)."""


def _prefetch_intrinsic(locality: int, indices: int, doc: str) -> Any:
    """An intrinsic ``f(arr, i[, j])`` that prefetches the line of ``arr[i, j]`` for reading.

    Emits ``llvm.prefetch`` (read; ``locality`` 3 keeps the line in every cache
    level, 0 marks it non-temporal). With one index on a 2-D array it means
    ``arr[i, 0]``. One-off measurement (2026-11-24, kernel variants timed while
    writing commit baf6ca0, not reproducible from this tree): a batched cuckoo
    probe with prefetch ran 1.4-1.7x one fused pass.
    """

    def typer(arr: Any, idx: tuple[Any, ...]) -> Any:
        if not isinstance(arr, types.Array) or arr.ndim < indices:
            return None
        sig = types.void(arr, *idx)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            pairs = zip(args[1:], signature.args[1:], strict=True)
            at = [context.cast(builder, a, t, types.intp) for a, t in pairs]
            at += [context.get_constant(types.intp, 0)] * (aryty.ndim - indices)
            ptr = cgutils.get_item_pointer(context, builder, aryty, ary, at, wraparound=False)
            i8p = ir.IntType(8).as_pointer()
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, locality),
                              ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return sig, codegen

    # numba's intrinsics take fixed positional arguments, hence two spellings.
    impl: Any
    if indices == 1:
        def impl(typingctx: Any, arr: Any, i: Any) -> Any:
            return typer(arr, (i,))
    else:
        def impl(typingctx: Any, arr: Any, i: Any, j: Any) -> Any:
            return typer(arr, (i, j))

    impl.__doc__ = doc
    return intrinsic(impl)


prefetch: Any = _prefetch_intrinsic(3, 1, "Prefetch the line of ``arr[i]`` (``arr[i, 0]`` for 2-D).")
prefetch2: Any = _prefetch_intrinsic(3, 2, "Prefetch the line of ``arr[i, j]`` of a 2-D array.")
prefetch2_nta: Any = _prefetch_intrinsic(
    0, 2,
    "Prefetch ``arr[i, j]``'s line non-temporally: for data read once (rows being copied out), "
    "so it does not evict what is reused (the index) from the caches.",
)


def _barrier(typingctx: Any) -> Any:
    """Order memory accesses around this point, for the seqlock protocol.

    An empty inline asm that clobbers memory stops the compiler moving loads and
    stores across it (Linux's ``barrier()``); an acquire-release fence adds the
    hardware ordering. On x86-64 (TSO) the fence emits no instruction, so the
    barrier costs nothing at run time; on weaker machines it is a real fence.
    """
    sig = types.void()

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), "", "~{memory}", side_effect=True)
        builder.call(asm, [])
        builder.fence("acq_rel")
        return context.get_dummy_value()

    return sig, codegen


def _load_acquire(typingctx: Any, arr: Any, i: Any, j: Any) -> Any:
    """``arr[i, j]`` as an atomic acquire load: no later load moves above it.

    The first read of a seqlock's version; on x86-64 it is a plain ``mov``, and,
    unlike ``barrier()``, it leaves the compiler free to keep everything else in
    registers.
    """
    if not isinstance(arr, types.Array) or arr.ndim != 2 or not isinstance(arr.dtype, types.Integer):
        return None
    sig = arr.dtype(arr, i, j)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        idx = [
            context.cast(builder, args[1], signature.args[1], types.intp),
            context.cast(builder, args[2], signature.args[2], types.intp),
        ]
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, idx, wraparound=False)
        return builder.load_atomic(ptr, "acquire", aryty.dtype.bitwidth // 8)

    return sig, codegen


def _ctz(typingctx: Any, x: Any) -> Any:
    """Count trailing zero bits of a uint64 (undefined for 0: callers test first)."""
    if not (isinstance(x, types.Integer) and getattr(x, "bitwidth", 0) == 64):
        return None
    sig = types.uint64(x)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(i64, [i64, ir.IntType(1)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.cttz.i64")
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 1)])

    return sig, codegen


# Typed as Any for the type checker: numba resolves these at compile time.
barrier: Any = intrinsic(_barrier)
ctz: Any = intrinsic(_ctz)
load_acquire: Any = intrinsic(_load_acquire)
