"""Near-duplicate detection: MinHash signatures of character shingles and LSH banding.

Written here rather than taken from `datasketch` because datasketch hashes every shingle in a
Python loop (sha1 per shingle), which on a 50 MB corpus costs more than tokenizing it; this
version hashes all shingles of a document with one vectorised numpy rolling hash. The method is
the standard one (Broder 1997; Leskovec et al., Mining of Massive Datasets, ch. 3).
"""

from __future__ import annotations

import numpy as np

_MERSENNE = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64(0xFFFFFFFF)


def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) coefficients of `num_perm` universal hash functions h(x) = (a*x + b) mod p."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 32, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64)
    return a, b


def shingle_hashes(text: str, shingle_chars: int) -> np.ndarray:
    """32-bit hashes of every distinct character n-gram of `text` (lower-cased, whitespace collapsed)."""
    data = np.frombuffer(" ".join(text.lower().split()).encode("utf-8"), dtype=np.uint8).astype(np.uint64)
    if data.size < shingle_chars:
        data = np.pad(data, (0, shingle_chars - data.size))
    # Polynomial rolling hash over each window, vectorised across all windows at once.
    windows = np.lib.stride_tricks.sliding_window_view(data, shingle_chars)
    powers = np.uint64(1099511628211) ** np.arange(shingle_chars, dtype=np.uint64)
    hashes = (windows * powers).sum(axis=1, dtype=np.uint64)
    return np.unique(hashes & _MAX32)


def signature(text: str, a: np.ndarray, b: np.ndarray, shingle_chars: int) -> np.ndarray:
    """MinHash signature (len(a) uint32 values) of the document's shingle set."""
    shingles = shingle_hashes(text, shingle_chars)
    # (num_perm, n_shingles) products stay below 2**64 because a, x < 2**32.
    values = (np.outer(a, shingles) + b[:, None]) % _MERSENNE
    return (values.min(axis=1) & _MAX32).astype(np.uint32)


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


def near_duplicates(ids: list[str], signatures: np.ndarray, threshold: float) -> dict[str, str]:
    """Map each near-duplicate id to the id it duplicates (the smallest id of its cluster).

    Candidates come from LSH buckets; a candidate pair counts only if the fraction of equal
    signature values (the Jaccard estimate) reaches `threshold`, which removes LSH false positives.
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
        for start, end in zip(starts, ends):
            if end - start < 2:
                continue
            members = order[start:end]
            first = members[0]
            for other in members[1:]:
                if find(first) == find(other):
                    continue
                if np.mean(signatures[first] == signatures[other]) >= threshold:
                    parent[find(other)] = find(first)
    clusters: dict[int, list[int]] = {}
    for i in range(count):
        clusters.setdefault(find(i), []).append(i)
    duplicates = {}
    for members in clusters.values():
        if len(members) > 1:
            keep = min(members, key=lambda i: ids[i])
            for i in members:
                if i != keep:
                    duplicates[ids[i]] = ids[keep]
    return duplicates
