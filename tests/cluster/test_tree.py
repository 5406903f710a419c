"""The fan-out tree against a slow reference: a breadth-first fill, level by level."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.cluster import FanoutTree, fanout_tree, tree_depth
from streamrec.errors import ConfigError

members_st = st.lists(st.integers(1, 10_000), min_size=0, max_size=200, unique=True)
k_st = st.integers(1, 9)


def reference_parents(order: list[int], k: int) -> dict[int, int]:
    """Breadth-first: each member in turn takes the first earlier member with room."""
    parents: dict[int, int] = {}
    taken = [0] * len(order)
    for i in range(1, len(order)):
        p = next(j for j in range(i) if taken[j] < k)
        taken[p] += 1
        parents[order[i]] = order[p]
    return parents


def parents_of(t: FanoutTree[int]) -> dict[int, int]:
    out = {}
    for m in t.order:
        p = t.parent(m)
        if p is not None:
            out[m] = p
    return out


def check_tree(t: FanoutTree[int]) -> None:
    parents = parents_of(t)
    # every member but the root has exactly one parent, itself a member
    assert set(parents) == set(t.order) - {t.root}
    assert all(p in t for p in parents.values())
    # children and parent agree, and no member has more than k children
    for m in t.order:
        kids = t.children(m)
        assert len(kids) <= t.k
        assert all(parents[c] == m for c in kids)
    assert sum(len(t.children(m)) for m in t.order) == len(t) - 1
    # no cycles: every member reaches the root in at most depth hops
    for m in t.order:
        seen, x = {m}, m
        while x != t.root:
            x = parents[x]
            assert x not in seen
            seen.add(x)
        assert len(seen) - 1 == t.level(m) <= t.depth
    # balanced: the depth is the smallest possible for n members and fan-out k
    n = len(t)
    assert max(t.level(m) for m in t.order) == t.depth == tree_depth(n, t.k)
    if t.k >= 2 and n > 1:
        assert t.k ** (t.depth - 1) < n  # depth <= ceil(log_k n), the bound
        assert (t.k ** t.depth - 1) // (t.k - 1) < n  # depth - 1 levels would not hold them


@settings(max_examples=200, deadline=None)
@given(members_st, k_st, st.randoms())
def test_build_is_the_reference_and_deterministic(members: list[int], k: int, rnd) -> None:
    t = fanout_tree(0, members, k)
    assert t.order == (0, *sorted(members))
    assert parents_of(t) == reference_parents(list(t.order), k)
    shuffled = list(members)
    rnd.shuffle(shuffled)
    assert fanout_tree(0, shuffled, k) == t  # every member computes the same tree
    check_tree(t)


@settings(max_examples=200, deadline=None)
@given(members_st.filter(lambda m: len(m) >= 1), k_st, st.data())
def test_removal_moves_only_the_last_member_and_the_dead_members_children(
    members: list[int], k: int, data: st.DataObject
) -> None:
    t = fanout_tree(0, members, k)
    dead = data.draw(st.sampled_from(members))
    last = t.order[-1]
    before, dead_kids = parents_of(t), set(t.children(dead))
    after_tree = t.without(dead)
    check_tree(after_tree)
    assert dead not in after_tree and len(after_tree) == len(t) - 1
    after = parents_of(after_tree)
    moved = {m for m in after if after[m] != before[m]}
    if dead == last:
        assert moved == set()
    else:
        # the last member took the dead member's place; the dead member's children follow it
        assert after_tree.slot(last) == t.slot(dead)
        assert after[last] == before[dead]
        assert {c for c in dead_kids if c != last} <= {m for m in after if after[m] == last}
        assert moved <= dead_kids | {last}
        assert set(after_tree.children(last)) == dead_kids - {last}


@settings(max_examples=100, deadline=None)
@given(members_st.filter(lambda m: len(m) >= 3), k_st, st.data())
def test_repeated_failures_stay_a_tree(members: list[int], k: int, data: st.DataObject) -> None:
    t = fanout_tree(0, members, k)
    dead = data.draw(st.lists(st.sampled_from(members), unique=True, max_size=len(members) - 1))
    for d in dead:
        t = t.without(d)
        check_tree(t)
    assert set(t.order) == {0, *members} - set(dead)


@settings(max_examples=100, deadline=None)
@given(members_st, k_st)
def test_join_adds_one_leaf_and_moves_nobody(members: list[int], k: int) -> None:
    t = fanout_tree(0, members, k)
    grown = t.with_member(-1)
    check_tree(grown)
    before, after = parents_of(t), parents_of(grown)
    assert {m: after[m] for m in before} == before
    assert grown.children(-1) == ()


@settings(max_examples=100, deadline=None)
@given(members_st, k_st)
def test_subtree_is_what_hangs_below(members: list[int], k: int) -> None:
    t = fanout_tree(0, members, k)
    parents = parents_of(t)
    for m in t.order[:20]:
        below = set()
        for x in t.order:
            y = x
            while y != m and y in parents:
                y = parents[y]
            if y == m:
                below.add(x)
        assert set(t.subtree(m)) == below
        assert len(t.subtree(m)) == len(below)


@pytest.mark.parametrize(("n", "k", "depth"), [(1, 4, 0), (2, 4, 1), (5, 4, 1), (6, 4, 2), (21, 4, 2),
                                                 (22, 4, 3), (1001, 10, 3), (10_001, 10, 4), (5, 1, 4)])
def test_depth_figures(n: int, k: int, depth: int) -> None:
    assert tree_depth(n, k) == depth


def test_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="fan-out"):
        fanout_tree("a", ["b"], 0)
    with pytest.raises(ConfigError, match="'b' appears twice"):
        FanoutTree(["a", "b", "b"], 2)
    with pytest.raises(ConfigError, match="at least one"):
        FanoutTree([], 2)
    t = fanout_tree("a", ["b", "c"], 2)
    with pytest.raises(ValueError, match="root"):
        t.without("a")
    with pytest.raises(KeyError, match="'z'"):
        t.parent("z")
    with pytest.raises(ConfigError, match="twice"):
        t.with_member("b")
