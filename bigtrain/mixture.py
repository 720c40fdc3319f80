"""The one data schedule: which samples of which source form each global batch, from the seed alone.

Training on several sources (e.g. web 0.7, code 0.2, books 0.1) means deciding, for every global
batch, how many samples each source gives and which of its blocks they are. `MixtureSchedule` does
it as a pure function of (seed, position): no history, so a run resumed at any world size sees
exactly the same sample stream. Every task's data goes through it: packed blocks and
line-by-line examples of prepared sources, labeled rows and chat rows are one source each
(`MixtureSchedule.single`), and its hold-out rule (`held_out`) is the only one.

Flat ids. Source s has blocks[s] blocks, numbered 0..blocks[s]-1 locally; flat id = base[s] + local
id with base the cumulative sum of blocks, so one integer names a block of any source.

Counts (how many samples of each source). Weights are normalized exactly with `Fraction`
(0.7 is 7/10, not the nearest double), written w_s = a_s / D over a common denominator D, so all
quota arithmetic below is exact integer arithmetic. Samples are dealt in windows of W global
batches, N = W * global_batch samples, W the smallest number with floor(w_s * N) >= 1 for every s
(W = 1 whenever every source's share of one global batch is at least one sample). The number of
samples of source s among the first b windows, C_s(b), is the largest-remainder (Hamilton)
apportionment of b*N: floor(w_s*b*N) each, and the few samples left over (fewer than S) one each to
the sources with the largest fractional remainders, lower source index first on ties. So
    C_s(b) in {floor(w_s*b*N), floor(w_s*b*N) + 1},   hence  |C_s(b) - w_s*b*N| < 1,
at every window boundary, computed in O(S) for any b. Window b holds source s's samples number
C_s(b) .. C_s(b+1)-1 of its own stream: c_s = C_s(b+1) - C_s(b) of them (>= 0, see `_cumulative`).

Order within a window. The N slots interleave the sources evenly: the k-th of source s's c_s
samples gets the key x = (k + 1/2) / c_s, and slots are sorted by (x, source index). The rank of
a sample is a closed form, so a batch never materializes its window (N can be large when a weight
is tiny): the number of samples of source s' with a smaller key is ceil(c_s' * x - 1/2), which is
within 1/2 of c_s' * x, so rank = N*x + O(S). `_candidates` uses that bound to pick, per source, a
contiguous range of k that surely holds every sample ranked in [lo, hi), computes their exact
ranks with integers, and keeps those in range: O(global_batch * S) per batch.

Order within a source. Sample k of source s (its k-th sample overall) is in epoch e = k // T_s,
at j = k % T_s, with T_s its number of training blocks; it reads training block
permute(T_s, (seed, s, e), j): every epoch visits each training block exactly once, in a fresh
order. `permute` is a keyed Feistel network with cycle-walking, evaluated only at the positions
asked for, so a source of 10**9 blocks costs no memory.

Validation hold-out. With valid_fraction > 0 (and no separate validation files) each source of at
least 2 blocks holds out n_valid_s = max(1, round(blocks[s] * valid_fraction)) blocks: with
P = permute(blocks[s], (seed, 7919, s), .), the held-out local ids are P(0..n_valid_s-1) and
training block j is P(n_valid_s + j). A source without hold-out trains on its blocks in local order
(training block j is block j; the per-epoch permutation already shuffles them).
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction

import numpy as np

from bigtrain.errors import UserError

# Feistel rounds. Small domains have tiny halves (1-2 bits): at 6 rounds (perm[0], perm[1]) was still
# measurably non-uniform over keys, at 8 it is not; 8 x 8 bytes is also the largest BLAKE2b digest.
ROUNDS = 8
HOLDOUT_SALT = 7919  # key (seed, HOLDOUT_SALT, s) chooses source s's validation blocks
# Saved in every checkpoint (trainer_state.json "data_order"): the stream a position counts in.
DATA_ORDER = "mixture-v1"
# Exact ranks multiply (2k+1) * c_s' <= 2N * N in int64: N <= 2**30 keeps that below 2**61.
MAX_WINDOW = 1 << 30

_U64 = np.uint64
_MUL1 = _U64(0xBF58476D1CE4E5B9)  # splitmix64 finalizer constants
_MUL2 = _U64(0x94D049BB133111EB)


# --------------------------------------------------------------------------- permutations


def _round_keys(key: tuple[int, ...]) -> np.ndarray:
    """ROUNDS 64-bit round keys from `key`: BLAKE2b of its repr (Python's hash() is salted per process)."""
    text = repr(tuple(int(k) for k in key))  # int(): a numpy integer's repr would differ
    digest = hashlib.blake2b(text.encode(), digest_size=8 * ROUNDS, person=b"bigtrain-perm").digest()
    return np.frombuffer(digest, dtype="<u8").astype(_U64)  # little-endian on every platform


def _half_bits(n: int) -> int:
    """Half the bits of the Feistel domain: the smallest even m >= 2 with 2**m >= n, halved."""
    m = max(2, (int(n) - 1).bit_length())
    return (m + (m & 1)) // 2


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every output bit depends on every input bit (uint64, wrapping)."""
    z = (z ^ (z >> _U64(30))) * _MUL1
    z = (z ^ (z >> _U64(27))) * _MUL2
    return z ^ (z >> _U64(31))


def _feistel(x: np.ndarray, h: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """One pass of a balanced Feistel network on [0, 2**(2h)), per element (h, keys may differ).

    x = (left, right), h bits each; each round maps (left, right) -> (right, left ^ F(right)),
    which is invertible whatever F is, so the whole is a bijection. F keeps the top h bits of the
    mixed value (the best-mixed ones); h <= 32, so the shift 64 - h is always valid.
    """
    mask = (_U64(1) << h) - _U64(1)
    left, right = x >> h, x & mask
    for r in range(keys.shape[1]):
        f = _mix(right ^ keys[:, r]) >> (_U64(64) - h)
        left, right = right, left ^ f
    return (left << h) | right


def _permute_many(n: np.ndarray, h: np.ndarray, keys: np.ndarray, x: np.ndarray) -> np.ndarray:
    """perm_i(x_i) for a keyed permutation of range(n_i) per element (h_i = _half_bits(n_i)).

    Cycle-walking: the Feistel network permutes [0, 2**(2h)), which may exceed n; a value that
    lands outside range(n) is encrypted again until it lands inside. Following the permutation's
    cycle from a point in range(n) to the next point in range(n) is a bijection of range(n), and
    it ends because the cycle returns to its start. Since 2**(2h) < 4n, each step lands inside
    with probability > 1/4, so few passes are needed; each re-encrypts only the entries left.
    """
    n, h = n.astype(_U64), h.astype(_U64)
    with np.errstate(over="ignore"):  # multiplication modulo 2**64 is intended
        out = _feistel(x.astype(_U64), h, keys)
        todo = np.flatnonzero(out >= n)
        while todo.size:
            y = _feistel(out[todo], h[todo], keys[todo])
            out[todo] = y
            todo = todo[y >= n[todo]]
    return out.astype(np.int64)


def permute(n: int, key: tuple[int, ...], idx: np.ndarray) -> np.ndarray:
    """perm[idx] for the pseudo-random permutation `perm` of range(n) chosen by `key`.

    O(len(idx)) time and memory whatever n is, and the same on every process and platform.
    """
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    n = int(n)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"permute: positions must lie in [0, {n})")
    if n <= 1:
        return np.zeros(idx.size, np.int64)
    m = idx.size
    keys = np.broadcast_to(_round_keys(key), (m, ROUNDS))
    return _permute_many(np.full(m, n), np.full(m, _half_bits(n)), keys, idx)


def n_held_out(blocks: int, valid_fraction: float, valid_separate: bool = False) -> int:
    """How many of a source's blocks validation holds out: max(1, round(blocks * fraction)),
    none without a fraction, with separate validation files, or below 2 blocks."""
    hold = valid_fraction > 0 and not valid_separate and blocks >= 2
    return max(1, round(blocks * valid_fraction)) if hold else 0


def held_out(blocks: int, valid_fraction: float, seed: int, source: int = 0) -> np.ndarray:
    """Sorted local ids of the blocks source number `source` holds out (module docstring)."""
    n = n_held_out(blocks, valid_fraction)
    return np.sort(permute(blocks, (seed, HOLDOUT_SALT, source), np.arange(n))).astype(np.int64)


# --------------------------------------------------------------------------- weights


def _normalized_weights(names: list[str], weights: list[float]) -> list[Fraction]:
    """Weights as exact fractions summing to 1; UserError naming the source for a bad one."""
    out = []
    for name, w in zip(names, weights):
        try:
            ok = not isinstance(w, (bool, str, bytes)) and math.isfinite(float(w)) and float(w) > 0
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise UserError(f"data.sources: source '{name}': weight must be a positive finite number, got {w!r}")
        out.append(Fraction(repr(float(w))))  # the decimal the user wrote: 0.7 -> 7/10
    total = sum(out)
    return [w / total for w in out]


# --------------------------------------------------------------------------- schedule


class MixtureSchedule:
    """Which blocks (flat ids) of which sources form each micro-batch of each rank (module docstring).

    `position` counts samples consumed since the start: the same number on every rank and at every
    world size, so resuming at another world size (same global batch) continues the same stream.
    """

    def __init__(
        self,
        names: list[str],
        blocks: list[int],
        weights: list[float],
        global_batch: int,
        micro_batch: int,
        world_size: int,
        rank: int,
        seed: int,
        valid_fraction: float = 0.0,
        valid_separate: bool = False,
    ) -> None:
        _check_shapes(names, blocks, weights, global_batch, micro_batch, world_size, rank, valid_fraction)
        self.names = [str(n) for n in names]
        self.blocks = [int(b) for b in blocks]
        self.global_batch, self.micro_batch = int(global_batch), int(micro_batch)
        self.world_size, self.rank, self.seed = int(world_size), int(rank), int(seed)
        self.accum = self.global_batch // (self.micro_batch * self.world_size)
        self.base = np.concatenate(([0], np.cumsum(self.blocks, dtype=np.int64))).astype(np.int64)
        self.weights = _normalized_weights(self.names, list(weights))
        self._holdout(float(valid_fraction), bool(valid_separate))
        self._window_size()
        # Per-source constants as arrays, indexed by source: the hot path is vectorized over samples.
        self._train = np.array(self.train_blocks, np.int64)
        self._train_h = np.array([_half_bits(t) for t in self.train_blocks], np.int64)
        self._valid = np.array(self.n_valid, np.int64)
        self._blocks = np.array(self.blocks, np.int64)
        self._blocks_h = np.array([_half_bits(b) for b in self.blocks], np.int64)
        self._holdout_keys = np.stack([_round_keys((self.seed, HOLDOUT_SALT, s)) for s in range(len(self.names))])

    @classmethod
    def single(cls, n: int, global_batch: int, micro_batch: int, world_size: int, rank: int, seed: int,
               valid_fraction: float = 0.0, valid_separate: bool = False) -> "MixtureSchedule":
        """The schedule of one source of n samples (ids 0..n-1): labeled rows, chat rows, a task's own examples."""
        return cls(["train"], [n], [1.0], global_batch, micro_batch, world_size, rank, seed, valid_fraction, valid_separate)

    def _holdout(self, valid_fraction: float, valid_separate: bool) -> None:
        """n_valid (blocks held out per source) and train_blocks; UserError for a source left empty."""
        self.n_valid = [n_held_out(b, valid_fraction, valid_separate) for b in self.blocks]
        self.train_blocks = [b - v for b, v in zip(self.blocks, self.n_valid)]
        for name, b, v, t in zip(self.names, self.blocks, self.n_valid, self.train_blocks):
            if t < 1:
                raise UserError(
                    f"data.sources: source '{name}' has no training blocks ({b} blocks, {v} held out for validation); "
                    "add data to it, lower data.valid_fraction, or remove the source"
                )

    def _window_size(self) -> None:
        """W (self.window) and N (self.window_samples), and the weights as integers a_s / D."""
        self._den = math.lcm(*(w.denominator for w in self.weights))
        self._num = [int(w * self._den) for w in self.weights]  # exact: D is a multiple of each denominator
        # floor(a_s * W * G / D) >= 1  <=>  W >= D / (a_s * G): the largest such bound, rounded up.
        g = self.global_batch
        self.window = max(1, max(-(-self._den // (a * g)) for a in self._num))
        self.window_samples = self.window * g
        if self.window_samples > MAX_WINDOW:
            s = min(range(len(self.names)), key=lambda i: self.weights[i])
            raise UserError(
                f"data.sources: source '{self.names[s]}': weight {float(self.weights[s]):.3g} (normalized) is too small: "
                f"it gets one sample only every {self.window_samples:,} samples, more than the {MAX_WINDOW:,} supported; "
                "raise it or drop the source"
            )

    # ----------------------------------------------------------------------- counts

    def _cumulative(self, b: int) -> list[int]:
        """C_s(b): samples of each source in the first b windows (largest-remainder apportionment).

        Monotone in b, so per-window counts are >= 0: C_s(b) <= floor(w_s*b*N) + 1, and
        C_s(b+1) >= floor(w_s*(b+1)*N) >= floor(w_s*b*N) + floor(w_s*N) >= floor(w_s*b*N) + 1
        because floor(w_s*N) >= 1 by the choice of W; so C_s(b+1) >= C_s(b).
        """
        total = b * self.window_samples
        shares = [a * total for a in self._num]
        counts = [q // self._den for q in shares]
        left = total - sum(counts)  # < S: each source lost less than one sample to the floor
        by_remainder = sorted(range(len(counts)), key=lambda s: (-(shares[s] % self._den), s))
        for s in by_remainder[:left]:
            counts[s] += 1
        return counts

    def _window_counts(self, b: int) -> tuple[list[int], np.ndarray]:
        """(C(b), c) with c_s = C_s(b+1) - C_s(b), the samples of each source in window b."""
        start, end = self._cumulative(b), self._cumulative(b + 1)
        return start, np.array([e - s for s, e in zip(start, end)], np.int64)

    def _candidates(self, c: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(src, k, rank, start): samples of the window whose slots may lie in [lo, hi), with exact ranks.

        Sample (s, k) has key x = (2k+1) / (2c_s) and rank in [N*x - S/2, N*x + 3S/2) (module
        docstring). So every k ranked in [lo, hi) lies in [start_s, end_s) below, every k < start_s
        ranks below lo - S/2 and every k >= end_s ranks at hi + S/2 or above. Per source the
        candidates are contiguous (k = start_s, start_s + 1, ...) and their ranks increase with k.
        """
        n, S = self.window_samples, len(c)
        start = np.clip((c * (lo - 2 * S)) // n - 1, 0, c)
        end = np.clip(-((-c * (hi + S)) // n) + 1, start, c)
        lengths = end - start
        src = np.repeat(np.arange(S), lengths)
        first = np.repeat(np.cumsum(lengths) - lengths, lengths)
        k = np.arange(len(src)) - first + np.repeat(start, lengths)
        # Samples of s' with key below x = (2k+1)/(2c_s): #{k' : (2k'+1) c_s < q} with q = (2k+1) c_s',
        # i.e. 2k'+1 <= ceil(q / c_s) - 1: ceil(q / c_s) // 2 of them. Equal keys (q / c_s odd)
        # rank the lower source index first.
        d = c[src][:, None]
        q = (2 * k + 1)[:, None] * c[None, :]
        below = (-(-q // d)) // 2
        ties = (q % d == 0) & ((q // d) % 2 == 1) & (np.arange(S)[None, :] < src[:, None])
        rank = below.sum(axis=1) + ties.sum(axis=1)
        return src, k, rank, start

    def _slots(self, c: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, k) of the window's slots lo..hi-1, in slot order."""
        src, k, rank, _ = self._candidates(c, lo, hi)
        keep = (rank >= lo) & (rank < hi)
        out_src, out_k = np.empty(hi - lo, np.int64), np.empty(hi - lo, np.int64)
        if np.count_nonzero(keep) != hi - lo:  # cannot happen (bounds in _candidates); never return unset slots
            raise RuntimeError(f"mixture: {np.count_nonzero(keep)} samples ranked in [{lo}, {hi}) of window counts {c.tolist()}")
        out_src[rank[keep] - lo] = src[keep]  # ranks are a permutation of range(N): one sample per slot
        out_k[rank[keep] - lo] = k[keep]
        return out_src, out_k

    # ----------------------------------------------------------------------- blocks

    def _flat_ids(self, src: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """Flat block ids of sample number `sample` of source `src`, elementwise."""
        if not src.size:
            return np.zeros(0, np.int64)
        train = self._train[src]
        epoch, j = np.divmod(sample, train)
        # One key per (source, epoch) present: usually one or two per source in a batch.
        pairs, inverse = np.unique(epoch * len(self.names) + src, return_inverse=True)
        table = np.stack([_round_keys((self.seed, int(p % len(self.names)), int(p // len(self.names)))) for p in pairs])
        block = _permute_many(train, self._train_h[src], table[inverse.reshape(-1)], j)
        held = self._valid[src] > 0
        if held.any():  # training block t of a source with hold-out is P(n_valid + t)
            s = src[held]
            block[held] = _permute_many(self._blocks[s], self._blocks_h[s], self._holdout_keys[s], self._valid[s] + block[held])
        return self.base[src] + block

    def valid_ids(self) -> np.ndarray:
        """Sorted flat ids of every held-out validation block (all sources)."""
        parts = [self.base[s] + permute(b, (self.seed, HOLDOUT_SALT, s), np.arange(v)) for s, (b, v) in enumerate(zip(self.blocks, self.n_valid))]
        return np.sort(np.concatenate(parts)).astype(np.int64)

    # ----------------------------------------------------------------------- batches

    def _batch(self, position: int) -> np.ndarray:
        """Flat ids of the global batch that starts at sample `position`, as an int64 array."""
        if position < 0 or position % self.global_batch:
            raise ValueError(f"position {position} is not a non-negative multiple of the global batch {self.global_batch}")
        g = position // self.global_batch
        b, offset = divmod(g, self.window)
        start, c = self._window_counts(b)
        lo = offset * self.global_batch
        src, k = self._slots(c, lo, lo + self.global_batch)
        return self._flat_ids(src, np.array(start, np.int64)[src] + k)

    def global_ids(self, position: int) -> list[int]:
        """Every flat id (over all ranks) of the global batch that starts at sample `position`."""
        return self._batch(position).tolist()

    def micro_batches(self, position: int) -> list[np.ndarray]:
        """This rank's micro-batches of that global batch: micro-step m takes [(m*world + rank)*micro, +micro)."""
        batch = self._batch(position)
        out = []
        for m in range(self.accum):
            first = (m * self.world_size + self.rank) * self.micro_batch
            out.append(batch[first : first + self.micro_batch])
        return out

    # ----------------------------------------------------------------------- accounting

    def _source_counts(self, position: int) -> list[int]:
        """Samples of each source among the first `position` samples (also inside a window)."""
        if position < 0:
            raise ValueError(f"position {position} is negative")
        b, r = divmod(int(position), self.window_samples)
        start, c = self._window_counts(b)
        src, _, rank, first = self._candidates(c, r, r)
        # Every k below first_s ranks below r (see _candidates), so count those plus candidates below r.
        inside = first + np.bincount(src[rank < r], minlength=len(c))
        return [int(s + i) for s, i in zip(start, inside)]

    def source_samples(self, position: int) -> dict[str, int]:
        """Cumulative samples of each source among the first `position` samples."""
        return dict(zip(self.names, self._source_counts(position)))

    def epochs(self, position: int) -> dict[str, int]:
        """The epoch each source's next sample falls in, after `position` samples."""
        return {n: k // t for n, k, t in zip(self.names, self._source_counts(position), self.train_blocks)}

    def plan(self, steps: int) -> dict[str, dict]:
        """Per source: blocks, normalized weight, samples in the first `steps` global batches, and their share."""
        total = steps * self.global_batch
        counts = self._source_counts(total)
        return {
            name: {"blocks": b, "weight": float(w), "samples": k, "share": k / total if total else 0.0}
            for name, b, w, k in zip(self.names, self.blocks, self.weights, counts)
        }


def _check_shapes(names, blocks, weights, global_batch: int, micro_batch: int, world_size: int, rank: int, valid_fraction: float) -> None:
    """The caller's invariants (ValueError: a bug, not bad input) and unique source names (UserError)."""
    if not names or not (len(names) == len(blocks) == len(weights)):
        raise ValueError("MixtureSchedule: names, blocks and weights must be non-empty lists of one length")
    if any(int(b) < 0 for b in blocks):
        raise ValueError(f"MixtureSchedule: negative block count in {list(blocks)}")
    if micro_batch < 1 or world_size < 1 or global_batch < 1 or global_batch % (micro_batch * world_size):
        raise ValueError(f"global batch {global_batch} is not micro_batch {micro_batch} x world_size {world_size} x an integer accum >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction {valid_fraction} is outside [0, 1)")
    seen = set()
    for name in names:
        if name in seen:
            raise UserError(f"data.sources: source name '{name}' appears twice; give each source its own name")
        seen.add(name)
