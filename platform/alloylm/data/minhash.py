"""Near-duplicate detection: MinHash signatures of character shingles and LSH banding.

Written here rather than taken from `datasketch` because datasketch hashes every shingle in a
Python loop (sha1 per shingle), which on a 50 MB corpus costs more than tokenizing it; this
version reads all shingles of a document as integers in one vectorised numpy pass, and computes
the signatures of a whole batch of documents together (`signatures`).

The signature is one-permutation hashing (Li, Owen and Zhang, NeurIPS 2012) with optimal
densification (Shrivastava, ICML 2017): each shingle is hashed once, the hash's high half picks one
of the `num_perm` bins and its low half is the value, and a document's signature is the minimum
value in each bin; a bin no shingle fell into takes the value of the first non-empty bin on a fixed
random probe sequence of its own, the same for every document. The fraction of equal values
estimates the Jaccard similarity of the shingle sets without bias, like `num_perm` independent
permutations, at the cost of one hash per shingle instead of `num_perm`: on the data benchmark's
51.5 MB corpus the signatures took 0.97 CPU-s against 2.2-2.8 for 64 multiply-add-shift functions
(the family before this one). The shingle keys are mixed by MurmurHash3's 64-bit finaliser.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_HIGH = np.uint64(32)
_LOW = np.uint64(0xFFFFFFFF)
_FNV_PRIME = np.uint64(1099511628211)
# MurmurHash3's 64-bit finaliser (fmix64): its shifts and multipliers.
_MIX_SHIFT = np.uint64(33)
_MIX_1 = np.uint64(0xFF51AFD7ED558CCD)
_MIX_2 = np.uint64(0xC4CEB9FE1A85EC53)
# Shingles hashed together per step of `signatures`: its work arrays stay small.
_CHUNK_SHINGLES = 1 << 16
# Probes per bin before densification falls back to the next non-empty bin (see `_densify`): a
# document with a single non-empty bin of 64 is left a bin to fill this way with probability
# (63/64)**512, about 3e-4, per empty bin.
_PROBES_PER_BIN = 8
# Which hash family made a signature: part of the fingerprint of every near-deduplicated data set
# (`prepare.dataset_fingerprint`), so one made with another family is made again. Before this one:
# - "bytes/fmix64/multiply-add-shift" (297f0f2 to 2026-12-07): 64 hash functions of the mixed
#   keys, ((a*x + b) mod 2**64) >> 32; the same estimates at 2.3-2.9 times the cost.
# - ((a*x + b) mod 2**61-1) & (2**32-1) with a, b < 2**32 on unmixed keys: no family of random
#   permutations (h is increasing in x wherever a*x + b < 2**61-1), so the functions shared their
#   minima far more often than independent ones would. Its Jaccard estimates had about 3 times the
#   binomial error, and on the quickstart's general text it called 27 of 300 documents
#   near-duplicates, 19 of them of pairs whose shingle sets overlap by less than 0.7.
FAMILY = "bytes/fmix64/one-permutation/optimal-densification"


def _window_keys(text: str, shingle_chars: int) -> np.ndarray:
    """A uint64 key of every `shingle_chars`-byte window of the lower-cased, whitespace-collapsed
    UTF-8 text, repeats included. Up to 8 bytes, the window's bytes themselves (little-endian),
    read in place through a view with a stride of one byte and masked to the window: distinct
    shingles get distinct keys, in one pass. Longer windows: a polynomial hash, wrapping mod 2**64."""
    data = " ".join(text.lower().split()).encode("utf-8").ljust(shingle_chars, b"\0")
    count = len(data) - shingle_chars + 1
    if shingle_chars <= 8:
        windows = np.ndarray((count,), dtype="<u8", buffer=data + bytes(8 - shingle_chars), strides=(1,))
        return windows & np.uint64((1 << (8 * shingle_chars)) - 1)
    values = np.frombuffer(data, dtype=np.uint8).astype(np.uint64)
    powers = _FNV_PRIME ** np.arange(shingle_chars, dtype=np.uint64)
    # One shifted multiply-add per position in the window: the same sum as (windows * powers).sum()
    # (arithmetic mod 2**64 is exact in any order) without a (count, shingle_chars) intermediate.
    hashes = values[:count].copy()
    for offset in range(1, shingle_chars):
        hashes += values[offset : offset + count] * powers[offset]
    return hashes


@lru_cache(maxsize=8)
def _seed_key(seed: int) -> np.uint64:
    return np.random.default_rng(seed).integers(0, 1 << 64, dtype=np.uint64)


def _shingle_hashes64(text: str, shingle_chars: int, seed: int) -> np.ndarray:
    """The 64-bit hash of every shingle of `text`, repeats included (they cannot change a
    minimum, and sorting them away costs more): the window's key xor the seed's key, through
    MurmurHash3's finaliser, a bijection, so distinct shingles keep distinct hashes. Mixed, the keys
    look random, which the bins and minima need; the bytes of text do not."""
    keys = _window_keys(text, shingle_chars)
    keys ^= _seed_key(seed)
    keys ^= keys >> _MIX_SHIFT
    keys *= _MIX_1
    keys ^= keys >> _MIX_SHIFT
    keys *= _MIX_2
    keys ^= keys >> _MIX_SHIFT
    return keys


def shingle_hashes(text: str, shingle_chars: int) -> np.ndarray:
    """The distinct shingle keys of `text` (lower-cased, whitespace collapsed): the set whose
    Jaccard similarity the signatures estimate."""
    return np.unique(_window_keys(text, shingle_chars))


@lru_cache(maxsize=8)
def _probes(num_perm: int, seed: int) -> np.ndarray:
    """Row i: the bin each bin borrows from at densification attempt i; the same for every document."""
    return np.random.default_rng([seed, num_perm]).integers(0, num_perm, size=(_PROBES_PER_BIN * num_perm, num_perm))


def _densify(values: np.ndarray, filled: np.ndarray, seed: int) -> None:
    """Give each empty bin (not `filled`) of each row the value of the first filled bin on its
    probe sequence (optimal densification), in place; every row has a filled bin."""
    rows = np.flatnonzero(~filled.all(axis=1))
    if rows.size == 0:
        return
    num_perm = values.shape[1]
    source, has = values[rows], filled[rows]
    result, todo = source.copy(), ~has
    for probe in _probes(num_perm, seed):
        take = todo & has[:, probe]
        result[take] = source[:, probe][take]
        todo &= ~take
        if not todo.any():
            break
    else:
        # Rare (a row with very few filled bins): the next filled bin after it, cyclically.
        for offset in range(1, num_perm):
            probe = (np.arange(num_perm) + offset) % num_perm
            take = todo & has[:, probe]
            result[take] = source[:, probe][take]
            todo &= ~take
    values[rows] = result


def _bin_minima(hashes: list[np.ndarray], num_perm: int, values: np.ndarray, filled: np.ndarray) -> None:
    """Each document's minimum value per bin, into `values` and `filled` (rows of these documents)."""
    sizes = np.fromiter((h.size for h in hashes), dtype=np.int64, count=len(hashes))
    flat = np.concatenate(hashes)
    # The bin from the high half (Lemire's multiply-shift range reduction: any num_perm), the value
    # from the low half.
    cells = np.repeat(np.arange(len(hashes), dtype=np.int64) * num_perm, sizes)
    cells += ((flat >> _HIGH) * np.uint64(num_perm) >> _HIGH).astype(np.int64)
    np.minimum.at(values.reshape(-1), cells, (flat & _LOW).astype(np.uint32))
    filled.reshape(-1)[cells] = True


def signatures(texts: list[str], num_perm: int, shingle_chars: int, seed: int = 1) -> np.ndarray:
    """MinHash signatures of many documents, shape (len(texts), num_perm), uint32; row i is
    `signature(texts[i], ...)`. The shingles of many documents are binned together, in one
    scatter-minimum per chunk of shingles."""
    values = np.full((len(texts), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    filled = np.zeros((len(texts), num_perm), dtype=bool)
    chunk: list[np.ndarray] = []
    size = done = 0
    for text in texts:
        chunk.append(_shingle_hashes64(text, shingle_chars, seed))
        size += chunk[-1].size
        if size >= _CHUNK_SHINGLES:
            _bin_minima(chunk, num_perm, values[done : done + len(chunk)], filled[done : done + len(chunk)])
            done, chunk, size = done + len(chunk), [], 0
    if chunk:
        _bin_minima(chunk, num_perm, values[done:], filled[done:])
    _densify(values, filled, seed)  # every text has a shingle (`_window_keys` pads it), so a filled bin
    return values


def signature(text: str, num_perm: int, shingle_chars: int, seed: int = 1) -> np.ndarray:
    """MinHash signature (num_perm uint32 values) of the document's shingle set."""
    return signatures([text], num_perm, shingle_chars, seed)[0]


def lsh_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """Bands and rows per band whose S-curve (1/b)^(1/r) lies closest to `threshold`."""
    best = (num_perm, 1)
    best_error = float("inf")
    for rows in range(1, num_perm + 1):
        if num_perm % rows:
            continue
        bands = num_perm // rows
        error = abs((1 / bands) ** (1 / rows) - threshold)
        if error < best_error:
            best, best_error = (bands, rows), error
    return best


# Clusters of one LSH bucket that a new member is compared with (see near_duplicates).
MAX_BUCKET_CLUSTERS = 256


def near_duplicates(ids: list[str], signatures: np.ndarray, threshold: float) -> dict[str, str]:
    """Map each near-duplicate id to the id it duplicates (the smallest id of its cluster).

    Candidates come from LSH buckets; a candidate pair counts only if the fraction of equal
    signature values (the Jaccard estimate) reaches `threshold`, which removes LSH false positives.
    An id is never mapped to itself: two rows can share one (identical parquet rows that Ray Data
    read in two blocks of one file, `sources._table_rows`), and the rows are dropped by id, so that
    entry would drop every copy; they are kept, as exact deduplication keeps them.
    """
    count, num_perm = signatures.shape
    if count < 2:
        return {}
    bands, rows = lsh_bands(num_perm, threshold)
    parent = list(range(count))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for band in range(bands):
        chunk = np.ascontiguousarray(signatures[:, band * rows : (band + 1) * rows])
        keys = chunk.view(np.dtype((np.void, chunk.dtype.itemsize * rows))).ravel()
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], count]
        shared = ends - starts >= 2  # a bucket of one has nothing to compare: skipped in numpy, not in Python
        for start, end in zip(starts[shared].tolist(), ends[shared].tolist()):
            # Each member against one member of every cluster met so far in this bucket (up to
            # MAX_BUCKET_CLUSTERS of them), joining all it resembles: checked against the bucket's
            # first member only, two near-duplicates sharing their one bucket with an LSH false
            # positive were missed. A bucket of near-duplicates holds one cluster, so that is one
            # comparison per member; the cap bounds a bucket of many look-alikes that are not
            # (templated text) to members x MAX_BUCKET_CLUSTERS comparisons, in numpy.
            reps: list[int] = []
            for member in order[start:end]:
                if reps:
                    alike = np.count_nonzero(signatures[reps] == signatures[member], axis=1) / num_perm >= threshold
                    for rep in np.asarray(reps)[alike]:
                        parent[find(member)] = find(int(rep))
                    if alike.any():
                        continue
                if len(reps) < MAX_BUCKET_CLUSTERS:
                    reps.append(int(member))
    clusters: dict[int, list[int]] = {}
    for i in range(count):
        clusters.setdefault(find(i), []).append(i)
    duplicates = {}
    for members in clusters.values():
        if len(members) > 1:
            keep = min(members, key=lambda i: ids[i])
            for i in members:
                if ids[i] != ids[keep]:
                    duplicates[ids[i]] = ids[keep]
    return duplicates
