"""Near-duplicate detection: MinHash signatures of character shingles and LSH banding.

Written here rather than taken from `datasketch` because datasketch hashes every shingle in a
Python loop (sha1 per shingle), which on a 50 MB corpus costs more than tokenizing it; this
version reads all shingles of a document as integers in one vectorised numpy pass, and computes
the signatures of a whole batch of documents together (`signatures`). The method is the standard
one (Broder 1997; Leskovec et al., Mining of Massive Datasets, ch. 3), with Dietzfelbinger's
multiply-add-shift hashing (1996) over keys mixed by MurmurHash3's finaliser.
"""

from __future__ import annotations

import numpy as np

_HIGH = np.uint64(32)
_FNV_PRIME = np.uint64(1099511628211)
# MurmurHash3's 64-bit finaliser (fmix64): its shifts and multipliers.
_MIX_SHIFT = np.uint64(33)
_MIX_1 = np.uint64(0xFF51AFD7ED558CCD)
_MIX_2 = np.uint64(0xC4CEB9FE1A85EC53)
# Shingles hashed together per step of `signatures`: its work arrays (512 KiB each) stay in cache.
_CHUNK_SHINGLES = 1 << 16
# Which hash family made a signature: part of the fingerprint of every near-deduplicated data set
# (`prepare.dataset_fingerprint`), so one made with another family is made again. The family before
# this one, ((a*x + b) mod 2**61-1) & (2**32-1) with a, b < 2**32, was no family of random
# permutations: h is increasing in x wherever a*x + b < 2**61-1 (a quarter of the keys for a typical
# a), so the 64 functions shared their minima far more often than independent ones would. Its
# Jaccard estimates had about 3 times the binomial error of 64 permutations, and on the quickstart's
# general text it called 27 of 300 documents near-duplicates, 19 of them of pairs whose shingle sets
# overlap by less than 0.7 (one by 0.21); this family finds 4 (overlaps 0.72-0.79).
FAMILY = "bytes/fmix64/multiply-add-shift"


def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) coefficients of `num_perm` hash functions h(x) = ((a*x + b) mod 2**64) >> 32 of
    32-bit keys x: Dietzfelbinger's multiply-add-shift, a strongly universal family for 64-bit a, b.
    a is odd: a = 0 would send every key to one value."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1 << 64, size=num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 1 << 64, size=num_perm, dtype=np.uint64)
    return a, b


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


def _shingle_keys(text: str, shingle_chars: int) -> np.ndarray:
    """32-bit keys of every shingle of `text`, repeats included: the high half of the window's key
    after MurmurHash3's finaliser. A 2-universal family such as multiply-add-shift gives unbiased
    minima only on keys that look random, and the bytes of text do not: mixed first, the estimates
    have the binomial error of 64 permutations (`tests/data/test_prepare.py`)."""
    keys = _window_keys(text, shingle_chars)
    keys ^= keys >> _MIX_SHIFT
    keys *= _MIX_1
    keys ^= keys >> _MIX_SHIFT
    keys *= _MIX_2
    keys ^= keys >> _MIX_SHIFT
    return keys >> _HIGH


def shingle_hashes(text: str, shingle_chars: int) -> np.ndarray:
    """The distinct 32-bit shingle keys of `text` (lower-cased, whitespace collapsed): the set whose
    Jaccard similarity the signatures estimate."""
    return np.unique(_shingle_keys(text, shingle_chars))


def _min_hashes(shingles: list[np.ndarray], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Signatures of the documents whose shingle keys are `shingles` (none empty)."""
    starts = np.zeros(len(shingles), dtype=np.int64)
    np.cumsum([s.size for s in shingles[:-1]], out=starts[1:])
    flat = np.concatenate(shingles)
    values = np.empty_like(flat)
    out = np.empty((len(shingles), len(a)), dtype=np.uint32)
    for column, (a_i, b_i) in enumerate(zip(a, b)):
        # a*x + b wraps mod 2**64 as uint64 arithmetic does; the hash is its high 32 bits, and as a
        # shift keeps order, each document's minimum is taken first and shifted once.
        np.multiply(flat, a_i, out=values)
        np.add(values, b_i, out=values)
        out[:, column] = np.minimum.reduceat(values, starts) >> _HIGH
    return out


def signatures(texts: list[str], a: np.ndarray, b: np.ndarray, shingle_chars: int) -> np.ndarray:
    """MinHash signatures of many documents, shape (len(texts), len(a)), uint32; row i is `signature(texts[i])`.

    The shingles of many documents are hashed together, one permutation at a time, and reduced per
    document with `np.minimum.reduceat`: three vector operations per permutation, instead of a
    (permutations x shingles) matrix for every document.
    """
    out = np.empty((len(texts), len(a)), dtype=np.uint32)
    chunk: list[np.ndarray] = []
    size = done = 0
    for text in texts:
        # Repeated shingles are kept: they cannot change a minimum, and sorting them away costs more.
        chunk.append(_shingle_keys(text, shingle_chars))
        size += chunk[-1].size
        if size >= _CHUNK_SHINGLES:
            out[done : done + len(chunk)] = _min_hashes(chunk, a, b)
            done, chunk, size = done + len(chunk), [], 0
    if chunk:
        out[done:] = _min_hashes(chunk, a, b)
    return out


def signature(text: str, a: np.ndarray, b: np.ndarray, shingle_chars: int) -> np.ndarray:
    """MinHash signature (len(a) uint32 values) of the document's shingle set."""
    return signatures([text], a, b, shingle_chars)[0]


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
