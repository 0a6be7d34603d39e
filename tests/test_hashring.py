"""The ring maps nodes to live conductors evenly and moves few nodes when membership changes."""
from collections import Counter

import pytest

from labmetal.conductor.hashring import POINTS_PER_CONDUCTOR, HashRing

pytestmark = pytest.mark.fast

NODES = [f"node-{i}" for i in range(6000)]


def test_every_node_has_one_owner_among_the_members():
    ring = HashRing(["c1", "c2", "c3"])
    owners = Counter(ring.owner(node) for node in NODES)
    assert set(owners) == {"c1", "c2", "c3"}
    assert POINTS_PER_CONDUCTOR >= 32
    # each conductor gets a fair share (1/3 +- 30 %)
    assert all(1400 < count < 2600 for count in owners.values()), owners


def test_same_members_same_mapping_in_any_order():
    assert ([HashRing(["a", "b", "c"]).owner(n) for n in NODES[:500]]
            == [HashRing(["c", "a", "b"]).owner(n) for n in NODES[:500]])


def test_losing_a_conductor_moves_only_its_nodes():
    before = HashRing(["c1", "c2", "c3"])
    after = HashRing(["c1", "c2"])
    moved = [n for n in NODES if before.owner(n) != after.owner(n)]
    assert moved and all(before.owner(n) == "c3" for n in moved)


def test_adding_a_conductor_moves_about_a_quarter():
    before = HashRing(["c1", "c2", "c3"])
    after = HashRing(["c1", "c2", "c3", "c4"])
    moved = [n for n in NODES if before.owner(n) != after.owner(n)]
    assert all(after.owner(n) == "c4" for n in moved)
    assert 0.15 < len(moved) / len(NODES) < 0.35


def test_empty_ring_owns_nothing():
    assert HashRing([]).owner("node") is None
