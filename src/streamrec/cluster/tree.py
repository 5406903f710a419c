"""The fan-out tree that carries committed batches to read-only replicas.

Owns: the shape of a balanced k-ary tree over a shard's members (who is whose
parent), its deterministic construction from a membership list, and its repair
when a member leaves or joins. The tree is kept in *heap layout*: ``order[0]``
is the root (the source of committed batches, the shard's writable group), and
the member in slot ``s`` has the children in slots ``k*s + 1 .. k*s + k``. A
heap layout is balanced by construction: the depth of ``n`` members is the
smallest ``d`` with ``1 + k + ... + k**d >= n``, about ``log_k(n)``.

Determinism: :func:`fanout_tree` sorts the non-root members, so every member
that sees the same membership computes the same tree without talking to the
others. Incremental changes (:meth:`FanoutTree.without`,
:meth:`FanoutTree.with_member`) are deterministic functions of (tree, change),
so members that apply the same changes in the same order also agree; a full
:func:`fanout_tree` rebuild at a new membership epoch is always available.

What a repair moves (pinned by tests/cluster/test_tree.py): removing a member
moves the *last* slot's member into the removed member's slot. Only these
attachments change: the moved member's parent (it takes the removed member's
parent) and the removed member's children (their parent becomes the moved
member). Every other member keeps its parent, and the tree stays balanced. The
moved member was a leaf, so its uplink is idle when it takes over the subtree.
Joining appends at the next free slot: only the newcomer gains a parent.

Re-attaching (:func:`attach`): a member that finds others dead builds the tree
over the members it believes alive (itself always included) under the first
live source. Members with different beliefs compute different trees, but never
a cycle: in every member's tree a parent sorts before its child (or is the
root), so following parents always reaches a source.

Must not: do I/O, read time, or import anything of ours beyond ``errors``.

Thread safety: a ``FanoutTree`` is immutable and may be shared freely.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

from streamrec.errors import ConfigError

__all__ = ["FanoutTree", "attach", "fanout_tree", "tree_depth"]

M = TypeVar("M", bound=Hashable)


def tree_depth(n: int, k: int) -> int:
    """Levels below the root of a heap-layout ``k``-ary tree of ``n`` members.

    The smallest ``d`` with ``1 + k + ... + k**d >= n`` (0 for one member; a
    chain, ``n - 1``, when ``k == 1``).

    Raises:
        ConfigError: ``n < 1`` or ``k < 1``.
    """
    if n < 1:
        raise ConfigError(f"a tree needs at least one member, got n={n}", field="n")
    if k < 1:
        raise ConfigError(f"fan-out must be >= 1, got k={k}", field="k")
    if k == 1:
        return n - 1
    depth, covered, level = 0, 1, 1
    while covered < n:
        level *= k
        covered += level
        depth += 1
    return depth


class FanoutTree(Generic[M]):
    """A balanced ``k``-ary tree over members, in heap layout (module doc).

    Args:
        order: the members, slot by slot; ``order[0]`` is the root. Members
            must be distinct and hashable.
        k: the fan-out, children per member (>= 1).

    Raises:
        ConfigError: ``k < 1``, an empty ``order``, or a member twice.

    Thread safety: immutable.

    Example::

        t = fanout_tree("src", ["r3", "r1", "r2", "r4"], k=2)
        t.order                  # ('src', 'r1', 'r2', 'r3', 'r4')
        t.children("r1")         # ('r3', 'r4')
        t.without("r1").parent("r3")   # 'r4': the last member took r1's slot
    """

    __slots__ = ("_order", "_slot", "k")

    def __init__(self, order: Iterable[M], k: int) -> None:
        members = tuple(order)
        if k < 1:
            raise ConfigError(f"fan-out must be >= 1, got k={k}", field="k")
        if not members:
            raise ConfigError("a tree needs at least one member (its root)", field="members")
        slot = {m: s for s, m in enumerate(members)}
        if len(slot) != len(members):
            twice = next(m for m, n in Counter(members).items() if n > 1)
            raise ConfigError(f"member {twice!r} appears twice", field="members")
        self.k = k
        self._order = members
        self._slot = slot

    # -- reading the shape -------------------------------------------------

    @property
    def order(self) -> tuple[M, ...]:
        """The members slot by slot (``order[0]`` the root)."""
        return self._order

    @property
    def root(self) -> M:
        return self._order[0]

    @property
    def depth(self) -> int:
        """Levels below the root (``tree_depth(len(self), k)``)."""
        return tree_depth(len(self._order), self.k)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, member: object) -> bool:
        return member in self._slot

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FanoutTree) and (self.k, self._order) == (other.k, other._order)

    def __hash__(self) -> int:
        return hash((self.k, self._order))

    def __repr__(self) -> str:
        return f"FanoutTree(k={self.k}, members={len(self._order)}, depth={self.depth})"

    def slot(self, member: M) -> int:
        """The member's slot. Raises ``KeyError`` naming an unknown member."""
        try:
            return self._slot[member]
        except KeyError:
            raise KeyError(f"{member!r} is not in the tree") from None

    def parent(self, member: M) -> M | None:
        """The member's parent, or None for the root."""
        s = self.slot(member)
        return None if s == 0 else self._order[(s - 1) // self.k]

    def children(self, member: M) -> tuple[M, ...]:
        """The member's children, in slot order (empty for a leaf)."""
        first = self.k * self.slot(member) + 1
        return self._order[first:first + self.k]

    def level(self, member: M) -> int:
        """Hops from the root to the member (0 for the root)."""
        s, hops = self.slot(member), 0
        while s:
            s = (s - 1) // self.k
            hops += 1
        return hops

    def subtree(self, member: M) -> tuple[M, ...]:
        """The member and everything below it, level by level."""
        out: list[M] = []
        lo = hi = self.slot(member)
        n = len(self._order)
        while lo < n:
            out.extend(self._order[lo:min(hi, n - 1) + 1])
            lo, hi = self.k * lo + 1, self.k * hi + self.k
        return tuple(out)

    # -- changing membership -----------------------------------------------

    def without(self, dead: M) -> FanoutTree[M]:
        """The tree after ``dead`` leaves: the last slot's member takes its slot.

        Only the moved member's parent and ``dead``'s children's parent change
        (module doc). REQUIRES: ``dead`` is not the root: the root is the
        source, and a new source means a new tree (:func:`fanout_tree`).

        Raises:
            KeyError: ``dead`` is not in the tree.
            ValueError: ``dead`` is the root.
        """
        s = self.slot(dead)
        if s == 0:
            raise ValueError(f"{dead!r} is the root (the source); build a new tree with fanout_tree")
        order = list(self._order)
        last = order.pop()
        if s < len(order):
            order[s] = last
        return FanoutTree(order, self.k)

    def with_member(self, member: M) -> FanoutTree[M]:
        """The tree after ``member`` joins, in the next free slot (a leaf).

        Raises:
            ConfigError: ``member`` is already in the tree.
        """
        return FanoutTree((*self._order, member), self.k)


def fanout_tree(root: M, members: Iterable[M], k: int) -> FanoutTree[M]:
    """The tree every member computes from the same membership.

    Args:
        root: the source of the batches (slot 0).
        members: the receiving replicas, in any order; the root may be among
            them (it is placed once). They must be mutually comparable: they
            are sorted, so the result does not depend on the order given.
        k: the fan-out (>= 1).

    Raises:
        ConfigError: ``k < 1`` or a member given twice.
    """
    rest = [m for m in members if m != root]
    return FanoutTree((root, *sorted(rest)), k)  # type: ignore[type-var]


def attach(sources: Iterable[M], members: Iterable[M], k: int, me: M,
           dead: Iterable[M] = ()) -> tuple[M, M]:
    """``(root, parent)`` of ``me``: where it pulls committed batches from.

    The root is the first of ``sources`` not in ``dead`` (sources in the order
    given: a shard's writable replicas, so every member picks the same one);
    the tree is :func:`fanout_tree` over ``members`` not in ``dead`` (``me``
    always kept). Deterministic: members with the same ``dead`` agree.

    Raises:
        ValueError: every source is dead, or ``me`` is not among ``members``.
        ConfigError: ``k < 1``.
    """
    gone = set(dead)
    roots = [s for s in sources if s not in gone]
    if not roots:
        raise ValueError("every source is dead: no root to attach under")
    live = [m for m in members if m == me or m not in gone]
    if me not in live:
        raise ValueError(f"{me!r} is not a member")
    tree = fanout_tree(roots[0], live, k)
    parent = tree.parent(me)
    assert parent is not None  # me is never the root: sources are not members
    return roots[0], parent
