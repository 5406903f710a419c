"""The row arena's row format, and the kernels that fill and update a row.

Owns: ``RowLayout`` (where the key, metadata, embedding and optimizer state sit
in a row), the deterministic per-key initializers, the sparse optimizer step,
and the tests that keep NaN and infinity out of rows (``nonfinite_rows`` for a
batch of values, ``step_row``'s result check for a gradient step). It must not
touch the index.

Row format ("key in value": the row holds its key, so the index holds only a tag
and a row number)::

    bytes 0..7    key (uint64)
    bytes 8..11   stamp (uint32): bit 0 = live, bits 1.. = the row's version,
                  incremented on every write to the row (replicas and exports
                  read it; it is not the reader's seqlock, the bucket is)
    bytes 12..15  meta (uint32), for eviction: LRU = last access (seconds on the
                  table's clock); LFU = count (high 16 bits, halved every decay
                  period) and the minute it was last decayed (low 16 bits)
    [16..23]      only in tables with a TTL: expiry (uint32 seconds on the
                  table's clock, 0 = never), then 4 bytes of padding
    then          D embedding elements, then the optimizer state
                  (Adagrad: D accumulators; Adam: D first moments, D second
                  moments, the row's step count t), padded to 8 bytes

The header is 16 bytes (24 with a TTL), so at D=64 float32 a row is 272 bytes
for 264 bytes of key and value (3 % overhead).

Thread safety: ``init_values``/``init_state`` write rows, so the caller holds the
writer lock and, for a row readers can reach, the seqlock of the bucket that
points to it; ``step_row`` only reads a row and ``nonfinite_rows`` only a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from streamrec.config import Adagrad, Adam, Initializer, Optimizer
from streamrec.store._index import mix64
from streamrec.store._jit import inline, kernel

__all__ = [
    "EXPIRE",
    "HEADER_BYTES",
    "META",
    "OPT_ADAGRAD",
    "OPT_ADAM",
    "OPT_SGD",
    "STAMP",
    "TTL_HEADER_BYTES",
    "RowLayout",
    "exponent_mask",
    "finite_limit",
    "init_params",
    "init_state",
    "init_values",
    "nonfinite_rows",
    "optimizer_params",
    "state_elems",
    "step_row",
]

HEADER_BYTES = 16
TTL_HEADER_BYTES = 24
STAMP = 2  # uint32 word
META = 3  # uint32 word
EXPIRE = 4  # uint32 word, in tables with a TTL

OPT_SGD, OPT_ADAGRAD, OPT_ADAM = 0, 1, 2
_INIT_CODES = {"zeros": 0, "constant": 1, "uniform": 2, "normal": 3, "truncated_normal": 4}


@dataclass(frozen=True)
class RowLayout:
    """Where things sit in a row, in units of the value dtype.

    Attributes:
        dim: embedding elements D.
        dtype: value dtype (float32 or float64).
        state_width: optimizer state elements per row.
        voff: offset of the embedding (after the 16- or 24-byte header).
        row_bytes: bytes per row (a multiple of 8).
        expire_word: uint32 word of the expiry, or 0 in a table without TTL.
    """

    dim: int
    dtype: np.dtype
    state_width: int
    voff: int
    row_bytes: int
    expire_word: int = 0

    @staticmethod
    def build(dim: int, dtype: np.dtype, optimizer: Optimizer | None, ttl: bool = False) -> RowLayout:
        item = dtype.itemsize
        header = TTL_HEADER_BYTES if ttl else HEADER_BYTES
        if optimizer is None:
            state = 0
        elif isinstance(optimizer, Adagrad):
            state = dim
        else:
            state = 2 * dim + 1
        raw = header + (dim + state) * item
        return RowLayout(dim, dtype, state, header // item, (raw + 7) // 8 * 8, EXPIRE if ttl else 0)

    @property
    def row_elems(self) -> int:
        return self.row_bytes // self.dtype.itemsize


def init_params(init: Initializer) -> tuple[int, float, float, np.uint64]:
    """``(kind code, a, b, seed)`` for the initializer kernels."""
    code = _INIT_CODES[init.kind]
    if init.kind == "constant":
        a, b = init.value, 0.0
    elif init.kind == "uniform":
        a, b = init.low, init.high
    else:
        a, b = init.mean, init.std
    return code, float(a), float(b), np.uint64(init.seed)


def optimizer_params(opt: Optimizer | None) -> tuple[int, np.ndarray]:
    """``(optimizer code, hyper-parameters)``: eps, beta1, beta2, initial accumulator."""
    hp = np.zeros(4, dtype=np.float64)
    if opt is None:
        return OPT_SGD, hp
    if isinstance(opt, Adagrad):
        hp[0], hp[3] = opt.eps, opt.initial_accumulator
        return OPT_ADAGRAD, hp
    assert isinstance(opt, Adam)
    hp[0], hp[1], hp[2] = opt.eps, opt.beta1, opt.beta2
    return OPT_ADAM, hp


_ADAM_T_MAX = float(2**24)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SEED_MIX = np.uint64(0xD1B54A32D192ED03)
_S11 = np.uint64(11)
_TWO_PI = 2.0 * math.pi
_INV_2_53 = 1.0 / 9007199254740992.0


@inline
def _next(state: int) -> tuple[int, float]:
    """splitmix64 step: (new state, uniform double in [0, 1))."""
    state = state + _GOLDEN
    return state, float(mix64(state) >> _S11) * _INV_2_53


@inline
def _normal(state: int) -> tuple[int, float]:
    """Box-Muller; draws two uniforms, returns one standard normal."""
    state, u1 = _next(state)
    state, u2 = _next(state)
    return state, math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(_TWO_PI * u2)


@inline
def init_values(
    dst: np.ndarray, dim: int, key: int, kind: int, a: float, b: float, seed: int,
) -> None:
    """Fill dst[:dim] from the initializer, a pure function of (key, seed)."""
    state = mix64(key ^ (seed * _SEED_MIX))
    for d in range(dim):
        if kind == 0:
            x = 0.0
        elif kind == 1:
            x = a
        elif kind == 2:
            state, u = _next(state)
            x = a + (b - a) * u
        elif kind == 3:
            state, z = _normal(state)
            x = a + b * z
        else:
            state, z = _normal(state)
            while abs(z) > 2.0:
                state, z = _normal(state)
            x = a + b * z
        dst[d] = x


@inline
def init_state(
    arenav: np.ndarray, r: int, soff: int, dim: int, opt: int, hp: np.ndarray
) -> None:
    """Reset row r's optimizer state (starting at element ``soff``)."""
    st = arenav[r, soff:]
    if opt == OPT_ADAGRAD:
        for d in range(dim):
            st[d] = hp[3]
    elif opt == OPT_ADAM:
        for d in range(2 * dim + 1):
            st[d] = 0.0


@inline
def state_elems(opt: int, dim: int) -> int:
    """Optimizer-state elements per row for optimizer code ``opt``."""
    if opt == OPT_ADAGRAD:
        return dim
    if opt == OPT_ADAM:
        return 2 * dim + 1
    return 0


def finite_limit(dtype: np.dtype) -> float:
    """The float64 magnitude from which a value stops being finite once stored as ``dtype``.

    For float32 it is FLT_MAX plus half an ulp (2**103): a float64 below it rounds
    to a finite float32, one at or above it rounds to inf (FLT_MAX's mantissa is
    odd, so the tie goes up).
    """
    if dtype == np.float32:
        return float(np.finfo(np.float32).max) + 2.0**103
    return math.inf


_EXP32 = np.uint32(0x7F800000)
_EXP64 = np.uint64(0x7FF0000000000000)


def exponent_mask(dtype: np.dtype) -> tuple[np.dtype, np.unsignedinteger]:
    """``(unsigned dtype of the same width, its exponent-field mask)`` for ``nonfinite_rows``."""
    if dtype == np.float32:
        return np.dtype(np.uint32), _EXP32
    return np.dtype(np.uint64), _EXP64


@kernel
def nonfinite_rows(bits: np.ndarray, exp: np.unsignedinteger, bad: np.ndarray) -> int:
    """Count the rows of a value batch holding a NaN or an infinity; bad[i] says which.

    An IEEE float is NaN or infinite exactly when every bit of its exponent field
    is set, so a row is bad when the largest of its exponent fields equals the
    mask: an unsigned max per row, which vectorises (a float ``isfinite`` per
    element does not, for its branch). Measured in ``table.py``'s write docstring.

    Requires: bits (B, W), the values viewed as unsigned integers of their width
    (``exponent_mask``); exp that width's exponent mask; bad bool (B,).
    """
    n = bits.shape[0]
    w = bits.shape[1]
    count = 0
    for i in range(n):
        row = bits[i]
        top = exp ^ exp
        for d in range(w):
            top = max(top, row[d] & exp)
        b = top == exp
        bad[i] = b
        count += b
    return count


@inline
def step_row(
    src: np.ndarray, dst: np.ndarray, dim: int,
    g: np.ndarray, lr: float, opt: int, hp: np.ndarray, lim: float,
) -> bool:
    """One optimizer step with gradient ``g`` (float64, length D) on a row's
    embedding and state ``src``; the new embedding and state go to ``dst``.

    The formulas are PyTorch's dense ones, in float64, rounded once on store.
    Returns whether every new element is finite once stored (magnitude below
    ``lim``, from ``finite_limit``): the check rides on values already in
    registers, so the caller can refuse a step before it touches the row.
    """
    ok = True
    if opt == OPT_SGD:
        for d in range(dim):
            x = src[d] - lr * g[d]
            dst[d] = x
            ok = ok & (abs(x) < lim)
    elif opt == OPT_ADAGRAD:
        eps = hp[0]
        for d in range(dim):
            acc = src[dim + d] + g[d] * g[d]
            x = src[d] - lr * g[d] / (math.sqrt(acc) + eps)
            dst[dim + d] = acc
            dst[d] = x
            ok = ok & (abs(x) < lim) & (acc < lim)
    else:
        eps, beta1, beta2 = hp[0], hp[1], hp[2]
        # t is stored exactly (float32 holds integers to 2**24) and stops there;
        # by then both corrections are 1 in double precision for any beta up to
        # 1 - 2.2e-6 (beta**(2**24) underflows), far past the usual 0.999.
        t = min(src[3 * dim] + 1.0, _ADAM_T_MAX)
        dst[3 * dim] = t
        step = lr / (1.0 - beta1**t)
        sqrt_bc2 = math.sqrt(1.0 - beta2**t)
        for d in range(dim):
            m = beta1 * src[dim + d] + (1.0 - beta1) * g[d]
            v = beta2 * src[2 * dim + d] + (1.0 - beta2) * g[d] * g[d]
            x = src[d] - step * m / (math.sqrt(v) / sqrt_bc2 + eps)
            dst[dim + d] = m
            dst[2 * dim + d] = v
            dst[d] = x
            ok = ok & (abs(x) < lim) & (abs(m) < lim) & (v < lim)
    return ok
