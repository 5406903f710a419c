"""The generator's kernels: alias-method sampling and the fused candidate draw with its ground truth.

Owns: ``_Segments`` (O(1) weighted sampling within segments: all items, the items of one category, users)
and the two kernels ``sample_items`` and ``ground_truth`` that ``generate.GroundTruth.draw_impressions``
runs per batch of requests. Private to ``pipeline.generate``, which checks every input it passes in; the
numpy reference of ``ground_truth`` is ``GroundTruth.probabilities`` (tests hold them equal).

Thread safety: kernels are pure functions of their arguments (writes go to the outputs passed in);
``_Segments`` is read-only after construction.
"""

from __future__ import annotations

import numpy as np

from streamrec.store._jit import kernel, prefetch

__all__ = ["Segments", "ground_truth", "sample_items"]


@kernel
def _alias_segments(weights: np.ndarray, starts: np.ndarray, prob: np.ndarray, alias: np.ndarray) -> None:
    """Walker/Vose alias tables for each segment ``weights[starts[s]:starts[s+1]]``, in place.

    ``alias`` holds indices local to the segment. Requires: every segment non-empty, weights >= 0 with a
    positive sum per segment, prob/alias as long as weights.
    """
    for s in range(starts.size - 1):
        lo, hi = starts[s], starts[s + 1]
        n = hi - lo
        total = 0.0
        for i in range(lo, hi):
            total += weights[i]
        small = np.empty(n, np.int64)
        large = np.empty(n, np.int64)
        ns = nl = 0
        for i in range(n):
            prob[lo + i] = weights[lo + i] * n / total
            alias[lo + i] = i
            if prob[lo + i] < 1.0:
                small[ns] = i
                ns += 1
            else:
                large[nl] = i
                nl += 1
        while ns > 0 and nl > 0:
            ns -= 1
            nl -= 1
            sm, lg = small[ns], large[nl]
            alias[lo + sm] = lg
            prob[lo + lg] -= 1.0 - prob[lo + sm]
            if prob[lo + lg] < 1.0:
                small[ns] = lg
                ns += 1
            else:
                large[nl] = lg
                nl += 1
        for i in range(ns):  # leftovers are 1 up to rounding
            prob[lo + small[i]] = 1.0
        for i in range(nl):
            prob[lo + large[i]] = 1.0


class Segments:
    """O(1) sampling of a member of segment s with probability proportional to its weight (alias method).

    ``table`` is (slots, 3) float64: the slot's keep probability, its member, its alias's member; one row
    per slot, so a draw touches one cache line (the generator is bound by these random reads).
    """

    def __init__(self, weights: np.ndarray, starts: np.ndarray, members: np.ndarray) -> None:
        self.starts = starts.astype(np.int64)
        self.sizes = np.diff(self.starts).astype(np.float64)
        prob = np.empty(weights.size, np.float64)
        alias = np.empty(weights.size, np.int64)
        _alias_segments(np.ascontiguousarray(weights, np.float64), self.starts, prob, alias)
        alias += np.repeat(self.starts[:-1], np.diff(self.starts))  # global slots
        self.table = np.stack([prob, members.astype(np.float64), members[alias].astype(np.float64)], axis=1)

    def sample(self, segment: np.ndarray | int, u: np.ndarray) -> np.ndarray:
        """Members for uniforms ``u`` in [0, 1): the integer part of u*size picks the slot, the rest
        decides between the slot and its alias (one uniform per draw)."""
        x = u * self.sizes[segment]
        j = x.astype(np.int64)
        row = self.table[self.starts[segment] + j]
        return np.where(x - j < row[:, 0], row[:, 1], row[:, 2]).astype(np.int64)


@kernel
def sample_items(m: np.ndarray, user: np.ndarray, interests: np.ndarray, u: np.ndarray, v: np.ndarray,
                  rare_cum: np.ndarray, kf: int, share: float, cat_starts: np.ndarray, cat_table: np.ndarray,
                  all_table: np.ndarray, out_item: np.ndarray) -> None:
    """Draw each request's candidate items; a repeat of an item already in the request is -1.

    Per candidate, uniform ``u`` picks the source ([0, rare total) a rare interest by its cumulative
    thresholds, then ``share`` the frequent interests evenly, else global popularity) and ``v`` the item
    (alias method, ``Segments.table``). This loop only samples: the catalog tables live in DRAM, and with
    the ground truth's exp calls in the same body the out-of-order window held one candidate, so the
    dependent misses of consecutive candidates did not overlap (measured 5x slower at 100k items).
    Requires: m >= 1 per request; arrays as built by ``GroundTruth``; out_item sized sum(m).
    """
    k_all = interests.shape[1]
    kr = rare_cum.shape[1]
    n_items = all_table.shape[0]
    i = 0
    for r in range(m.size):
        usr = user[r]
        rare_total = rare_cum[usr, kr - 1] if kr > 0 else 0.0
        first = i
        for _ in range(m[r]):
            uu = u[i]
            k = -1
            if uu < rare_total:
                k = kf
                while k < k_all - 1 and uu >= rare_cum[usr, k - kf]:
                    k += 1
            elif uu < rare_total + share:
                k = min(int((uu - rare_total) / share * kf), kf - 1)
            if k >= 0:
                c = interests[r, k]
                lo = cat_starts[c]
                x = v[i] * (cat_starts[c + 1] - lo)
                slot = lo + int(x)
                item = int(cat_table[slot, 1] if x - int(x) < cat_table[slot, 0] else cat_table[slot, 2])
            else:
                x = v[i] * n_items
                slot = int(x)
                item = int(all_table[slot, 1] if x - slot < all_table[slot, 0] else all_table[slot, 2])
            for prev in range(first, i):  # (request, item) is the join's key: one impression each
                if out_item[prev] == item:
                    item = -1
                    break
            out_item[i] = item
            i += 1


@kernel
def ground_truth(m: np.ndarray, user: np.ndarray, interests: np.ndarray, item: np.ndarray,
                  strength: np.ndarray, item_table: np.ndarray, user_bias: np.ndarray, like_bias: np.ndarray,
                  device_effect: np.ndarray, device: np.ndarray, hour: np.ndarray, base_logit: float,
                  out_pos: np.ndarray, out_p: np.ndarray) -> None:
    """Position and (p_click, p_like, p_finish) of each request's candidates; the fused twin of
    ``GroundTruth.probabilities`` (tests hold them equal). ``item_table`` rows are (category, quality,
    duration); rows are prefetched a few candidates ahead. Requires: item sized sum(m), ids valid."""
    k_all = interests.shape[1]
    n = item.size
    i = 0
    for r in range(m.size):
        usr = user[r]
        context = base_logit + user_bias[usr] + device_effect[device[r]] + \
            0.25 * np.cos((hour[r] - 21.0) * (2 * np.pi / 24))
        for j in range(m[r]):
            if i + 8 < n:
                prefetch(item_table, item[i + 8])
            it = item[i]
            cat = int(item_table[it, 0])
            aff = 0.0
            for kk in range(k_all):
                if interests[r, kk] == cat and strength[usr, kk] > aff:
                    aff = strength[usr, kk]
            q = item_table[it, 1]
            click = 1.0 / (1.0 + np.exp(-(context + q + aff - 0.15 * np.log1p(j))))
            out_pos[i] = j
            out_p[0, i] = click
            out_p[1, i] = click / (1.0 + np.exp(-(-1.0 + like_bias[usr] + 0.6 * aff + 0.5 * q)))
            out_p[2, i] = click / (1.0 + np.exp(-(1.5 - item_table[it, 2] / 30.0 + 0.5 * aff)))
            i += 1
