"""Weighted data mixtures: the keyed permutation, per-source counts, window order, epochs, hold-out, ranks.

Expected values are computed here independently (exact Fractions, brute-force sorts, counting the
sample stream), never copied from the module's output.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bigtrain.errors import UserError
from bigtrain.mixture import MixtureSchedule, permute

# --------------------------------------------------------------------------- helpers


def exact_weights(weights: list[float]) -> list[Fraction]:
    """The weights as the decimals written, normalized: 0.7 -> 7/10."""
    fr = [Fraction(repr(float(w))) for w in weights]
    return [w / sum(fr) for w in fr]


def expected_window(weights: list[float], global_batch: int) -> int:
    """Smallest W with floor(w_s * W * G) >= 1 for every source, by search."""
    ws = exact_weights(weights)
    w = 1
    while any(math.floor(x * w * global_batch) < 1 for x in ws):
        w += 1
    return w


def make(weights, blocks=None, global_batch=16, micro=None, world=1, rank=0, seed=3, **kw) -> MixtureSchedule:
    names = [f"src{i}" for i in range(len(weights))]
    blocks = blocks or [50 + 17 * i for i in range(len(weights))]
    micro = micro or global_batch // world
    return MixtureSchedule(names, blocks, weights, global_batch, micro, world, rank, seed, **kw)


def stream(sched: MixtureSchedule, n_batches: int, first: int = 0) -> np.ndarray:
    """Flat ids of global batches first .. first + n_batches - 1, one after another."""
    g = sched.global_batch
    return np.array([i for b in range(first, first + n_batches) for i in sched.global_ids(b * g)], np.int64)


def sources_of(sched: MixtureSchedule, ids: np.ndarray) -> np.ndarray:
    """Source index of each flat id (flat id = base[s] + local id)."""
    return np.searchsorted(sched.base, ids, side="right") - 1


def hamilton(ws: list[Fraction], total: int) -> list[int]:
    """Largest-remainder apportionment of `total`: floors, then +1 by largest remainder, lower index first."""
    counts = [math.floor(w * total) for w in ws]
    remainders = [w * total - c for w, c in zip(ws, counts)]
    for s in sorted(range(len(ws)), key=lambda i: (-remainders[i], i))[: total - sum(counts)]:
        counts[s] += 1
    return counts


def interleaved(counts: list[int]) -> list[int]:
    """Source labels of one window by brute force: sample k of c_s gets key (k + 1/2) / c_s, ties by source."""
    keyed = [(Fraction(2 * k + 1, 2 * c), s) for s, c in enumerate(counts) for k in range(c)]
    return [s for _, s in sorted(keyed)]


# --------------------------------------------------------------------------- permute


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 16, 17, 64, 100, 1000, 4097, 65537])
def test_permute_is_a_bijection_and_pointwise(n):
    for key in [(0,), (1, 2), (123456789, 7919, 3)]:
        perm = permute(n, key, np.arange(n))
        assert perm.dtype == np.int64
        assert np.array_equal(np.sort(perm), np.arange(n))
        # Evaluating at a few positions gives the same values as the whole permutation.
        idx = np.random.default_rng(n).integers(0, n, size=min(n, 50))
        assert np.array_equal(permute(n, key, idx), perm[idx])


def test_permute_edge_cases_and_huge_n():
    assert permute(0, (1,), np.zeros(0, np.int64)).shape == (0,)
    assert permute(1, (1,), np.zeros(3, np.int64)).tolist() == [0, 0, 0]
    # A domain of 10**15 costs nothing: distinct values in range at a few positions.
    n = 10**15
    idx = np.random.default_rng(0).choice(n, size=2000, replace=False)
    out = permute(n, (5, 6), idx)
    assert out.min() >= 0 and out.max() < n and len(np.unique(out)) == len(idx)
    assert np.array_equal(out[::7], permute(n, (5, 6), idx[::7]))
    n = 2**63 - 1  # the largest int64 domain (64-bit Feistel)
    out = permute(n, (1,), np.array([0, 1, n - 1], np.int64))
    assert len(set(out.tolist())) == 3 and all(0 <= v < n for v in out.tolist())
    with pytest.raises(ValueError):
        permute(10, (1,), np.array([10]))


def test_permute_keys_choose_orders():
    n = 1000
    orders = {tuple(permute(n, (7, k), np.arange(n)).tolist()) for k in range(20)}
    assert len(orders) == 20
    a = permute(n, (7, 1), np.arange(n))
    assert np.array_equal(a, permute(n, (7, 1), np.arange(n)))
    assert np.array_equal(a, permute(n, (np.int64(7), np.int32(1)), np.arange(n)))  # numpy ints are the same key
    assert not np.array_equal(a, np.arange(n))


@pytest.mark.parametrize("n", [10, 16, 37])
def test_permute_first_position_is_uniform_over_keys(n):
    keys = 200 * n
    firsts = np.array([permute(n, (11, k), np.array([0]))[0] for k in range(keys)])
    observed = np.bincount(firsts, minlength=n)
    expected = keys / n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    # chi-square with n-1 degrees of freedom: mean n-1, sd sqrt(2(n-1)); the identity scores keys*(n-1).
    assert chi2 < (n - 1) + 6 * math.sqrt(2 * (n - 1)), (chi2, observed)


@pytest.mark.parametrize("n", [8, 13])
def test_permute_first_two_positions_are_jointly_uniform(n):
    """(perm[0], perm[1]) over keys covers the n(n-1) ordered pairs evenly: a weak round function
    (e.g. one that ignores its input, making the network XOR with a constant) fails this."""
    per_cell, cells = 50, n * (n - 1)
    pairs = np.array([permute(n, (13, k), np.array([0, 1])) for k in range(per_cell * cells)])
    observed = np.bincount(pairs[:, 0] * n + pairs[:, 1], minlength=n * n).reshape(n, n)
    assert np.all(np.diag(observed) == 0)
    off = observed[~np.eye(n, dtype=bool)]
    chi2 = float(((off - per_cell) ** 2 / per_cell).sum())
    assert chi2 < (cells - 1) + 6 * math.sqrt(2 * (cells - 1)), chi2


def test_permute_is_the_same_in_another_process():
    code = "import numpy as np; from bigtrain.mixture import permute; print(permute(10**9, (4, 2, 7919), np.arange(20)).tolist())"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == str(permute(10**9, (4, 2, 7919), np.arange(20)).tolist())


# --------------------------------------------------------------------------- counts and order


CASES = [
    ([0.7, 0.2, 0.1], 16, 300),
    ([0.999, 0.001], 16, 60),  # one sample of the tiny source every ~1000: windows of 63 batches
    ([1, 1, 1], 8, 300),  # thirds: never a whole number of samples per batch
    (list(np.random.default_rng(42).uniform(0.05, 3.0, size=5)), 32, 200),
    ([0.5, 0.5], 6, 200),
]


@pytest.mark.parametrize("weights,global_batch,windows", CASES)
def test_counts_stay_within_one_sample_of_the_weights(weights, global_batch, windows):
    sched = make(weights, blocks=[40, 3, 25, 9, 60][: len(weights)], global_batch=global_batch)
    w = expected_window(weights, global_batch)
    assert sched.window == w
    n = w * global_batch
    labels = sources_of(sched, stream(sched, windows * w))
    ws = exact_weights(weights)
    previous = [0] * len(weights)
    for b in range(1, windows + 1):
        counts = np.bincount(labels[: b * n], minlength=len(weights)).tolist()
        for s, (c, x) in enumerate(zip(counts, ws)):
            assert abs(c - x * b * n) < 1, (b, s, c, float(x * b * n))
            assert c - previous[s] >= 0
        assert counts == hamilton(ws, b * n), b
        previous = counts
    # Every source shows up: W guarantees at least one sample per window over time.
    assert set(labels.tolist()) == set(range(len(weights)))


@pytest.mark.parametrize("weights,global_batch,windows", CASES)
def test_windows_interleave_sources_evenly(weights, global_batch, windows):
    sched = make(weights, global_batch=global_batch)
    n = sched.window * global_batch
    shown = min(windows, 12)
    labels = sources_of(sched, stream(sched, shown * sched.window))
    for b in range(shown):
        window = labels[b * n : (b + 1) * n]
        counts = np.bincount(window, minlength=len(weights)).tolist()
        assert window.tolist() == interleaved(counts), b


@settings(max_examples=25, deadline=None)
@given(
    weights=st.lists(st.floats(min_value=0.05, max_value=1.0), min_size=1, max_size=5),
    global_batch=st.sampled_from([2, 4, 6, 12]),
    seed=st.integers(0, 2**31),
)
def test_random_mixtures_count_and_interleave_exactly(weights, global_batch, seed):
    sched = make(weights, blocks=[5] * len(weights), global_batch=global_batch, seed=seed)
    w = expected_window(weights, global_batch)
    assert sched.window == w
    n = w * global_batch
    labels = sources_of(sched, stream(sched, 4 * w))
    ws = exact_weights(weights)
    for b in range(4):
        window = labels[b * n : (b + 1) * n]
        counts = np.bincount(window, minlength=len(weights)).tolist()
        assert window.tolist() == interleaved(counts)
        total = np.bincount(labels[: (b + 1) * n], minlength=len(weights))
        assert all(abs(int(c) - x * (b + 1) * n) < 1 for c, x in zip(total, ws))


# --------------------------------------------------------------------------- epochs and hold-out


def per_source_local_ids(sched: MixtureSchedule, ids: np.ndarray) -> list[np.ndarray]:
    src = sources_of(sched, ids)
    return [ids[src == s] - sched.base[s] for s in range(len(sched.names))]


def expected_n_valid(blocks: list[int], fraction: float) -> list[int]:
    return [max(1, round(b * fraction)) if b >= 2 else 0 for b in blocks]


def test_every_epoch_visits_each_training_block_once_in_a_new_order():
    blocks, fraction = [7, 13, 5, 1], 0.2
    sched = make([0.4, 0.3, 0.2, 0.1], blocks=blocks, global_batch=8, valid_fraction=fraction, seed=9)
    n_valid = expected_n_valid(blocks, fraction)
    assert sched.train_blocks == [b - v for b, v in zip(blocks, n_valid)]
    valid = sched.valid_ids()
    ids = stream(sched, 150)
    for s, local in enumerate(per_source_local_ids(sched, ids)):
        held = set((valid[sources_of(sched, valid) == s] - sched.base[s]).tolist())
        training = sorted(set(range(blocks[s])) - held)
        t = len(training)
        epochs = [local[i : i + t].tolist() for i in range(0, len(local) - t + 1, t)]
        assert len(epochs) >= 5, s
        for order in epochs:
            assert sorted(order) == training, (s, order)
        if t >= 4:  # fresh orders, not one repeated: about as many distinct ones as random draws give
            assert len({tuple(o) for o in epochs}) >= min(len(epochs), math.factorial(t)) // 2, s
        # epochs() names the epoch of each source's next sample.
        for position in (0, 8 * 37, 8 * 150):
            k = sched.source_samples(position)[f"src{s}"]
            assert sched.epochs(position)[f"src{s}"] == k // t


def test_stream_follows_the_documented_permutations():
    """Sample k of source s is block P_s(n_valid + permute(T, (seed, s, k // T), k % T)); resuming relies on it."""
    blocks, seed = [11, 6], 21
    sched = make([0.6, 0.4], blocks=blocks, global_batch=10, valid_fraction=0.3, seed=seed)
    n_valid = expected_n_valid(blocks, 0.3)
    for s, local in enumerate(per_source_local_ids(sched, stream(sched, 20))):
        t = blocks[s] - n_valid[s]
        for k, block in enumerate(local.tolist()):
            j = permute(t, (seed, s, k // t), np.array([k % t]))[0]
            assert block == permute(blocks[s], (seed, 7919, s), np.array([n_valid[s] + j]))[0]


def test_held_out_blocks_never_train():
    blocks, fraction = [40, 2, 1, 100], 0.1
    sched = make([0.3, 0.2, 0.1, 0.4], blocks=blocks, global_batch=16, valid_fraction=fraction, seed=1)
    n_valid = expected_n_valid(blocks, fraction)
    valid = sched.valid_ids()
    assert valid.dtype == np.int64 and np.array_equal(valid, np.sort(valid))
    assert np.bincount(sources_of(sched, valid), minlength=4).tolist() == n_valid
    for s, v in enumerate(n_valid):
        expected = sched.base[s] + permute(blocks[s], (1, 7919, s), np.arange(v))
        assert set(expected.tolist()) <= set(valid.tolist())
    train = stream(sched, 200)
    assert not set(train.tolist()) & set(valid.tolist())
    # Long enough to see every training block of every source at least once.
    assert set(train.tolist()) | set(valid.tolist()) == set(range(sum(blocks)))

    separate = make([0.3, 0.2, 0.1, 0.4], blocks=blocks, global_batch=16, valid_fraction=fraction, valid_separate=True)
    assert separate.valid_ids().size == 0 and separate.train_blocks == blocks
    assert set(stream(separate, 200).tolist()) == set(range(sum(blocks)))


# --------------------------------------------------------------------------- ranks and resume


@pytest.mark.parametrize("weights", [[0.7, 0.2, 0.1], [0.995, 0.005]])
def test_ranks_split_the_global_batch_and_world_size_does_not_change_the_stream(weights):
    global_batch = 48
    reference = make(weights, global_batch=global_batch, valid_fraction=0.1)
    positions = [b * global_batch for b in [0, 1, 2, 5, 9, 13, 40, 41]]
    for world, micro in [(1, 48), (1, 24), (1, 4), (2, 24), (2, 6), (4, 12), (4, 3), (4, 2)]:
        ranks = [make(weights, global_batch=global_batch, micro=micro, world=world, rank=r, valid_fraction=0.1) for r in range(world)]
        for position in positions:
            expected = reference.global_ids(position)
            assert ranks[0].global_ids(position) == expected  # same stream whatever world size built it
            micro_batches = [sched.micro_batches(position) for sched in ranks]
            accum = global_batch // (micro * world)
            assert all(len(m) == accum for m in micro_batches)
            assert all(len(b) == micro and b.dtype == np.int64 for m in micro_batches for b in m)
            # Micro-step m of rank r holds samples [(m * world + r) * micro, + micro).
            rebuilt = [int(i) for m in range(accum) for r in range(world) for i in micro_batches[r][m]]
            assert rebuilt == expected


def test_source_samples_and_plan_match_the_stream():
    weights, global_batch = [0.996, 0.004], 16  # windows of 16 batches: positions inside a window too
    sched = make(weights, global_batch=global_batch)
    labels = sources_of(sched, stream(sched, 70))
    rng = np.random.default_rng(5)
    for position in [0, 1, 15, 16, 17, 255, 256, 257] + rng.integers(0, len(labels), 40).tolist():
        counts = np.bincount(labels[:position], minlength=2).tolist()
        assert sched.source_samples(position) == {"src0": counts[0], "src1": counts[1]}, position
    for steps in [1, 3, 16, 70]:
        plan = sched.plan(steps)
        assert set(plan) == {"src0", "src1"}
        assert math.isclose(sum(p["share"] for p in plan.values()), 1.0)
        assert [p["samples"] for p in plan.values()] == list(sched.source_samples(steps * global_batch).values())
        assert [p["weight"] for p in plan.values()] == [float(w) for w in exact_weights(weights)]
        assert [p["blocks"] for p in plan.values()] == [50, 67]


def test_a_batch_of_huge_sources_is_fast():
    sched = MixtureSchedule([f"s{i}" for i in range(8)], [10**9] * 8, [1, 2, 3, 4, 5, 6, 7, 8], 1024, 8, 8, 5, 0, valid_fraction=0.01)
    sched.micro_batches(0)
    times = []
    for step in range(20):
        start = time.perf_counter()
        sched.micro_batches(step * 1024 * 1001)
        times.append(time.perf_counter() - start)
    assert sorted(times)[len(times) // 2] < 0.005


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [0, 0.0, -1, float("nan"), float("inf"), "0.5", None, True])
def test_bad_weight_names_the_source(bad):
    with pytest.raises(UserError, match="source 'code'.*weight must be a positive finite number"):
        MixtureSchedule(["web", "code"], [10, 10], [0.5, bad], 8, 8, 1, 0, 0)


def test_source_without_training_blocks_names_it():
    with pytest.raises(UserError, match="source 'books' has no training blocks"):
        MixtureSchedule(["web", "books"], [10, 0], [0.5, 0.5], 8, 8, 1, 0, 0)
    with pytest.raises(UserError, match="source 'tiny' has no training blocks"):  # all of it held out
        MixtureSchedule(["web", "tiny"], [10, 2], [0.5, 0.5], 8, 8, 1, 0, 0, valid_fraction=0.9)


def test_caller_bugs_are_value_errors():
    with pytest.raises(ValueError):
        MixtureSchedule(["a"], [10], [1.0], 10, 4, 1, 0, 0)  # 10 is not 4 x 1 x accum
    with pytest.raises(ValueError):
        MixtureSchedule(["a"], [10], [1.0], 8, 4, 2, 2, 0)  # rank outside the world
    sched = MixtureSchedule(["a"], [10], [1.0], 8, 4, 2, 1, 0)
    with pytest.raises(ValueError):
        sched.global_ids(4)  # not the start of a global batch
