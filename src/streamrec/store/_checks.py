"""Input checks shared by the store's public wrappers.

Owns: turning what a caller passed into the exact arrays a kernel requires, or
raising ``TypeError``/``ValueError`` that says what was expected and what came.
Conversions copy at most once and only where no value can change.

Thread safety: pure functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_keys", "as_mask_out", "as_matrix", "as_out"]


def as_keys(keys: Any, name: str = "keys") -> np.ndarray:
    """A C-contiguous uint64 vector of ``keys``.

    Unsigned integers of any width convert; signed integers convert when none is
    negative; Python ints convert when each fits in uint64. Floats, bools,
    negative values, and anything not one-dimensional are refused.
    """
    if isinstance(keys, np.ndarray):
        a = keys
    else:
        try:
            a = np.asarray(keys)
        except (OverflowError, ValueError) as exc:
            raise ValueError(f"{name}: cannot be read as uint64 keys ({exc})") from None
        if a.dtype == object or (a.dtype.kind == "f" and _all_ints(keys)):
            # Python ints past int64 make numpy pick object or float64; read them exactly.
            try:
                a = np.array(keys, dtype=np.uint64)
            except (OverflowError, ValueError, TypeError) as exc:
                raise ValueError(
                    f"{name}: expected integers in [0, 2**64), some are not ({exc})"
                ) from None
        elif a.size == 0 and a.dtype.kind == "f":  # np.asarray([]) is float64
            a = a.astype(np.uint64)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of shape (B,), got shape {a.shape}")
    kind = a.dtype.kind
    if kind == "u":
        if a.dtype != np.uint64:
            a = a.astype(np.uint64)
    elif kind == "i":
        if a.size and int(a.min()) < 0:
            raise ValueError(
                f"{name}: expected non-negative integers (keys are uint64); "
                f"got {int((a < 0).sum())} negative value(s), e.g. {int(a.min())}"
            )
        a = a.astype(np.uint64)
    else:
        raise TypeError(f"{name}: expected an unsigned or non-negative integer array, got dtype {a.dtype}")
    return np.ascontiguousarray(a)


def _all_ints(keys: Any) -> bool:
    """Whether a list-like holds only integers (numpy turns [0, 2**64-1] into float64)."""
    try:
        return all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in keys)
    except TypeError:
        return False


def as_matrix(x: Any, rows: int, cols: int, dtype: np.dtype, name: str) -> np.ndarray:
    """A C-contiguous (rows, cols) array of ``dtype`` from real numbers."""
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected real numbers, got dtype {a.dtype}")
    if a.shape != (rows, cols):
        raise ValueError(f"{name}: expected shape ({rows}, {cols}), got {a.shape}")
    return np.ascontiguousarray(a, dtype=dtype)


def as_mask_out(found: Any, rows: int) -> np.ndarray:
    """Check a caller's (rows,) bool output mask, or make one."""
    if found is None:
        return np.empty(rows, dtype=np.bool_)
    if not isinstance(found, np.ndarray):
        raise TypeError(f"found: expected a numpy array, got {type(found).__name__}")
    if found.shape != (rows,) or found.dtype != np.bool_ or not found.flags.writeable:
        raise ValueError(f"found: expected a writeable bool array of shape ({rows},), got {found.dtype} "
                         f"{found.shape} (writeable={found.flags.writeable})")
    return found


def as_out(out: Any, rows: int, cols: int, dtype: np.dtype) -> np.ndarray:
    """Check a caller's output buffer: it is written in place, so no conversion."""
    if out is None:
        return np.empty((rows, cols), dtype=dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out: expected a numpy array, got {type(out).__name__}")
    flags = out.flags
    if out.shape != (rows, cols) or out.dtype != dtype or not flags.c_contiguous or not flags.writeable:
        raise ValueError(
            f"out: expected a writeable C-contiguous {dtype} array of shape ({rows}, {cols}), "
            f"got {out.dtype} {out.shape} (c_contiguous={out.flags.c_contiguous}, "
            f"writeable={out.flags.writeable})"
        )
    return out
