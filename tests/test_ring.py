"""Placement on the consistent-hash ring: determinism, balance, movement on join, weights."""

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import blake3
import numpy as np
import pytest

import chunkstore
from chunkstore.ring import HashRing, key_position

KEYS = 200_000


@pytest.fixture(scope="module")
def keys() -> list[bytes]:
    """Random 32-byte chunk ids, the same in every run."""
    data = np.random.default_rng(20261127).bytes(32 * KEYS)
    return [data[i : i + 32] for i in range(0, len(data), 32)]


def ring_of(count: int, **weights: float) -> HashRing:
    return HashRing([(f"node-{i}", weights.get(f"node_{i}", 1.0)) for i in range(count)])


def primaries(ring: HashRing, keys: list[bytes]) -> list[str]:
    return [owners[0] for owners in ring.owners_many(keys, 1)]


def test_key_position_uses_chunk_id_prefix_else_blake3():
    assert key_position(bytes(range(32))) == 0x0001020304050607
    assert key_position(b"abc") == int.from_bytes(blake3.blake3(b"abc").digest()[:8], "big")


def test_placement_is_pinned():
    """Changing these owners would strand every stored chunk: placement must never drift."""
    ring = HashRing([("alpha", 1.0), ("beta", 1.0), ("gamma", 2.0), ("delta", 1.0)])
    got = [ring.owners(blake3.blake3(f"chunk-{i}".encode()).digest(), 3) for i in range(4)]
    assert got == [
        ["gamma", "alpha", "delta"],
        ["alpha", "delta", "gamma"],
        ["delta", "gamma", "beta"],
        ["gamma", "alpha", "delta"],
    ]
    assert ring.owners(b"repo/llama-ft", 2) == ["gamma", "alpha"]


def test_same_owners_across_instances_orders_and_processes(keys):
    nodes = [(f"node-{i}", 1.0 + i % 3) for i in range(10)]
    a, b = HashRing(nodes), HashRing(list(reversed(nodes)))
    sample = keys[:2000]
    expected = [a.owners(k, 3) for k in sample]
    assert [b.owners(k, 3) for k in sample] == expected
    script = (
        "import sys; from chunkstore.ring import HashRing\n"
        f"r = HashRing({nodes!r})\n"
        f"keys = [bytes.fromhex(h) for h in {[k.hex() for k in sample[:50]]!r}]\n"
        "print([list(o) for o in r.owners_many(keys, 3)])"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(chunkstore.__file__).parents[1],
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == repr(expected[:50])


@pytest.mark.parametrize("count", [1, 3, 10])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 12])
def test_owners_are_distinct_and_min_n_nodes(keys, count, n):
    ring = ring_of(count)
    sample = keys[:3000]
    many = ring.owners_many(sample, n)
    for key, owners in zip(sample, many, strict=True):
        assert len(owners) == min(n, count) == len(set(owners))
        assert tuple(ring.owners(key, n)) == owners
        assert list(owners[:1]) == ring.owners(key, 1)


def test_non_chunk_id_keys_are_hashed(keys):
    ring = ring_of(5)
    names = [f"repo-{i}".encode() for i in range(20_000)]
    counts = Counter(primaries(ring, names))
    assert len(counts) == 5
    assert max(counts.values()) <= 1.3 * len(names) / 5
    assert ring.owners_many(names, 3) == [tuple(ring.owners(k, 3)) for k in names]


@pytest.mark.parametrize("count", [3, 10, 30])
def test_balance(keys, count):
    ring = ring_of(count)
    load = Counter(primaries(ring, keys))
    assert len(load) == count
    assert max(load.values()) <= 1.2 * len(keys) / count
    assert sum(ring.share(f"node-{i}") for i in range(count)) == pytest.approx(1.0)
    for node_id, hits in load.items():
        assert hits / len(keys) == pytest.approx(ring.share(node_id), abs=0.01)


@pytest.mark.parametrize("count", [3, 10, 30])
def test_join_moves_about_one_over_n_plus_1_only_to_new_node(keys, count):
    before, after = ring_of(count), ring_of(count + 1)
    old, new = primaries(before, keys), primaries(after, keys)
    moved = [b for a, b in zip(old, new, strict=True) if a != b]
    assert set(moved) == {f"node-{count}"}
    ideal = 1 / (count + 1)
    assert 0.7 * ideal <= len(moved) / len(keys) <= 1.4 * ideal


def test_join_changes_each_replica_set_only_by_the_new_node(keys):
    """New owners = old owners with the new node inserted somewhere, cut to length."""
    sample = keys[:20_000]
    old_sets, new_sets = ring_of(6).owners_many(sample, 3), ring_of(7).owners_many(sample, 3)
    for old, new in zip(old_sets, new_sets, strict=True):
        if "node-6" in new:
            assert tuple(x for x in new if x != "node-6") == old[:2]
        else:
            assert new == old


def test_weight_two_gets_twice_the_keys(keys):
    ring = ring_of(5, node_0=2.0)
    load = Counter(primaries(ring, keys))
    others = sum(load[f"node-{i}"] for i in range(1, 5)) / 4
    assert 1.7 <= load["node-0"] / others <= 2.3
    assert ring.share("node-0") == pytest.approx(2 / 6, rel=0.15)


def test_weight_zero_owns_nothing(keys):
    ring = ring_of(4, node_3=0.0)
    assert ring.share("node-3") == 0.0
    assert all("node-3" not in owners for owners in ring.owners_many(keys[:20_000], 4))
    assert len(ring.owners(keys[0], 4)) == 3
    assert HashRing([("a", 0.0)]).owners(keys[0], 3) == []
    assert HashRing([]).owners_many(keys[:2], 1) == [(), ()]


def test_single_node_owns_everything():
    ring = HashRing([("only", 0.01)])
    assert ring.share("only") == 1.0
    assert ring.owners(b"x", 3) == ["only"]


@pytest.mark.parametrize(
    ("nodes", "vnodes", "message"),
    [
        ([("a", 1.0), ("a", 2.0)], 128, "duplicate node id 'a'"),
        ([("a", -1.0)], 128, "node 'a': weight must be finite and >= 0"),
        ([("a", float("nan"))], 128, "node 'a': weight must be finite and >= 0"),
        ([("a", 1.0)], 0, "vnodes_per_weight must be >= 1"),
    ],
)
def test_rejects_bad_rings(nodes, vnodes, message):
    with pytest.raises(ValueError, match=message):
        HashRing(nodes, vnodes_per_weight=vnodes)


def test_rejects_bad_n_and_unknown_share():
    ring = ring_of(3)
    with pytest.raises(ValueError, match="n must be >= 1"):
        ring.owners(b"x", 0)
    with pytest.raises(KeyError):
        ring.share("nope")


def test_ring_is_immutable():
    ring = ring_of(3)
    with pytest.raises(AttributeError):
        ring.nodes = ()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ring.extra = 1  # type: ignore[attr-defined]
