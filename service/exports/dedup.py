"""Duplicates among the rows of an export: exact (the same folded text) and near (embeddings
at least `threshold` alike, found with FAISS).

Near duplicates follow one rule: a row is dropped when its cosine with a row kept before it
reaches the threshold. Rows come in batches; each batch is compared with the rows kept from
earlier batches through the index, and with its own earlier rows, then its kept rows join
the index.

The index is exact while small: a FAISS IndexFlatIP, searched for each batch of
FLAT_BATCH rows, whose rows are compared with each other by their Gram matrix. Past
`ivf_after` kept rows it becomes an IndexIVFFlat trained on them (k-means, `nlist` lists):
a row is then compared only with the rows in the `nprobe` lists whose centroids are nearest
to it, so a near duplicate in another list is missed (the index is approximate; see
docs/benchmarks.md for its recall), and a row is checked against the first MAX_CANDIDATES
earlier rows of its batch that are near it. Its lists are scanned list by list for a whole batch
with one matrix product each, as faiss.contrib.big_batch_search does: FAISS's own search
takes one query at a time and reads every probed list for each, which on two cores is
bound by memory bandwidth at a few thousand rows a second once the index holds a million.
Where the threshold is high, each product is first taken on a quarter of the dimensions,
and only the rows whose bound (that product plus the longest tails) could reach the
threshold are compared in full: the same rows are dropped, for about a third of the work.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections.abc import Iterator, Sequence
from typing import Any

import faiss
import numpy as np

FLAT_BATCH = 1024  # rows compared at once while the index is exact: their Gram matrix
IVF_AFTER = 16_384  # kept rows at which the index becomes IVF, trained on them
NLIST = 1024
NPROBE = 4
KMEANS_ITERATIONS = 10
KMEANS_SEED = 1234  # the same kept rows train the same lists: a rerun is the same export
QUERY_CHUNK = 256  # rows of a batch compared with one list's members at once (memory)
MAX_CANDIDATES = 8  # earlier rows of a batch a row is checked against, the first ones
THREADS = 2  # FAISS's OpenMP threads (k-means, the flat search) for this thread
# Lists are compared on a quarter of the dimensions first where the threshold is at least
# this: below it, the bound of the rest lets too few rows off the full product.
HEAD_FROM_THRESHOLD = 0.8
BOUND_SLACK = 1e-4  # above the float32 rounding of a bound


def fold(text: str) -> str:
    """Text as compared for exact duplicates: NFKC, case folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def text_key(parts: Sequence[str]) -> bytes:
    """The sha256 of the folded parts; two rows with the same key are exact duplicates.

    The parts are folded as one text with NUL between them, which stored text never holds
    (service/storable.py), so moving words from one part to the next changes the key.
    """
    return hashlib.sha256(fold(" \x00 ".join(parts)).encode()).digest()


class NearDuplicates:
    """The rows kept so far, to drop each new row whose cosine with one reaches threshold.

    Args:
        dimension: Length of the vectors, which must have unit norm.
        threshold: Least cosine at which a row duplicates a kept one.
        ivf_after: Kept rows at which the exact index becomes an IVF one.
        nlist: Lists of the IVF index.
        nprobe: Lists each row is compared with once the index is IVF.
    """

    def __init__(
        self,
        dimension: int,
        threshold: float,
        *,
        ivf_after: int = IVF_AFTER,
        nlist: int = NLIST,
        nprobe: int = NPROBE,
    ) -> None:
        if not 0 < nprobe <= nlist:
            raise ValueError(f"nprobe must be in [1, nlist={nlist}], got {nprobe}")
        if ivf_after < nlist:
            raise ValueError(f"ivf_after must be >= nlist={nlist} to train it, got {ivf_after}")
        self.dimension = dimension
        self.threshold = threshold
        self.ivf_after = ivf_after
        self.nlist = nlist
        self.nprobe = nprobe
        self._flat: Any = faiss.IndexFlatIP(dimension)
        self._ivf: Any = None  # faiss.IndexIVFFlat once trained
        # Lists are compared on their first _head dimensions before all of them (0: at once)
        self._head = dimension // 4 if threshold >= HEAD_FROM_THRESHOLD else 0
        self._longest_tail = np.zeros(nlist, dtype=np.float32)  # per list: its longest tail
        self._trained_on = 0
        self._kept = 0
        faiss.omp_set_num_threads(min(THREADS, os.cpu_count() or 1))

    @property
    def kept(self) -> int:
        return self._kept

    def describe(self) -> dict[str, Any]:
        """The index as an export's manifest records it."""
        if self._ivf is None:
            return {"kind": "flat", "ivf_after": self.ivf_after}
        return {
            "kind": "ivf",
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "trained_on": self._trained_on,
        }

    def keep(self, vectors: np.ndarray) -> np.ndarray:
        """Which rows of a batch (in order) to keep; the kept ones join the index.

        Args:
            vectors: (B, dimension) float32 unit vectors, in the export's order.

        Returns:
            (B,) bool mask of the rows kept.
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        keep = np.ones(len(vectors), dtype=bool)
        start = 0
        while start < len(vectors) and self._ivf is None:
            stop = start + FLAT_BATCH
            keep[start:stop] = self._keep_flat(vectors[start:stop])
            start = stop
            if self._kept >= self.ivf_after:
                self._train_ivf()
        if start < len(vectors):
            keep[start:] = self._keep_ivf(vectors[start:])
        return keep

    # --- exact, while small -------------------------------------------------------------

    def _keep_flat(self, batch: np.ndarray) -> np.ndarray:
        best = np.full(len(batch), -np.inf, dtype=np.float32)
        if self._flat.ntotal:
            best = self._flat.search(batch, 1)[0][:, 0]
        keep = best < self.threshold
        rows = np.flatnonzero(keep)
        gram = batch[rows] @ batch[rows].T  # (R, R)
        query, earlier = np.nonzero(np.tril(gram >= self.threshold, k=-1))
        _resolve(keep, rows[query], rows[earlier])
        self._flat.add(batch[keep])
        self._kept += int(keep.sum())
        return keep

    # --- IVF, once large ----------------------------------------------------------------

    def _train_ivf(self) -> None:
        count = int(self._flat.ntotal)
        kept = faiss.rev_swig_ptr(self._flat.get_xb(), count * self.dimension)
        kept = kept.reshape(count, self.dimension).copy()
        quantizer = faiss.IndexFlatIP(self.dimension)
        ivf = faiss.IndexIVFFlat(quantizer, self.dimension, self.nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.niter = KMEANS_ITERATIONS
        ivf.cp.seed = KMEANS_SEED
        ivf.cp.min_points_per_centroid = 1  # a few per list place the lists well enough
        ivf.train(kept)
        self._ivf, self._flat, self._trained_on = ivf, None, count
        self._add(kept, quantizer.search(kept, 1)[1][:, 0])

    def _keep_ivf(self, batch: np.ndarray) -> np.ndarray:
        # The nearest centroids, nearest first: the lists compared, and the one joined.
        probed = self._ivf.quantizer.search(batch, self.nprobe)[1]  # (B, nprobe)
        home = probed[:, 0]
        keep = self._nearest_kept(batch, probed) < self.threshold
        alive = np.flatnonzero(keep)
        members = dict(_by_list(home[alive, None], alive))
        pairs = [
            _earlier_pairs(batch, queries, members[number], self.threshold)
            for number, queries in _by_list(probed[alive], alive)
            if number in members
        ]
        if pairs:
            queries, earlier = zip(*pairs, strict=True)
            _resolve(keep, np.concatenate(queries), np.concatenate(earlier))
        self._add(batch[keep], home[keep])
        self._kept += int(keep.sum())
        return keep

    def _nearest_kept(self, batch: np.ndarray, probed: np.ndarray) -> np.ndarray:
        """(B,) for each row of batch, the highest cosine with a kept row of its probed
        lists ((B, nprobe) list numbers) where it reaches the threshold; below it, a bound
        that stays below it (-inf where the lists are empty).

        A list is first compared on the first `head` dimensions alone: for unit vectors,
        x.y <= x_head.y_head + |x_tail| * |y_tail|, so a row whose bound from its best
        head product and the list's longest tail stays under the threshold cannot reach
        it there, and only the others are compared in full. On an embedding's 384
        dimensions, a quarter of the products where the threshold is high."""
        head = self._head
        tails = self._tails(batch)
        best = np.full(len(batch), -np.inf, dtype=np.float32)
        for number, queries in _by_list(probed, np.arange(len(batch))):
            stored = self._list_vectors(number)
            if not len(stored):
                continue
            if head:
                found = (batch[queries, :head] @ stored[:, :head].T).max(axis=1)
                found += tails[queries] * self._longest_tail[number] + BOUND_SLACK
                close = np.flatnonzero(found >= self.threshold)
                if len(close):
                    found[close] = (batch[queries[close]] @ stored.T).max(axis=1)
            else:
                found = (batch[queries] @ stored.T).max(axis=1)
            best[queries] = np.maximum(best[queries], found)
        return best

    def _tails(self, vectors: np.ndarray) -> np.ndarray:
        """(R,) the norms of the rows past their first _head dimensions."""
        tail = vectors[:, self._head :]
        return np.sqrt(np.einsum("ij,ij->i", tail, tail))

    def _list_vectors(self, number: int) -> np.ndarray:
        """A view of the vectors in one list of the IVF index, valid until the next add."""
        size = self._ivf.invlists.list_size(number)
        if not size:
            return np.empty((0, self.dimension), dtype=np.float32)
        codes = faiss.rev_swig_ptr(self._ivf.invlists.get_codes(number), size * 4 * self.dimension)
        return codes.view(np.float32).reshape(size, self.dimension)

    def _add(self, vectors: np.ndarray, lists: np.ndarray) -> None:
        """Add vectors to the given lists of the IVF index (their nearest centroids)."""
        count = len(vectors)
        if not count:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.arange(self._ivf.ntotal, self._ivf.ntotal + count, dtype=np.int64)
        lists = np.ascontiguousarray(lists, dtype=np.int64)
        if self._head:
            np.maximum.at(self._longest_tail, lists, self._tails(vectors))
        self._ivf.add_core(
            count, faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(lists)
        )


def _by_list(lists: np.ndarray, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(list, its rows in ascending order) for each list named in lists: (R, P) list
    numbers, a line per row of rows (R,), which is ascending."""
    named = lists.ravel()
    if not len(named):
        return
    owners = np.repeat(rows, lists.shape[1])
    order = np.argsort(named, kind="stable")
    named, owners = named[order], owners[order]
    cuts = np.flatnonzero(named[1:] != named[:-1]) + 1
    for start, stop in zip(np.r_[0, cuts], np.r_[cuts, len(named)], strict=True):
        yield int(named[start]), owners[start:stop]


def _earlier_pairs(
    batch: np.ndarray, queries: np.ndarray, members: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """(query, earlier) rows of the batch with earlier < query at least threshold alike,
    of queries (ascending) and members (ascending); the first MAX_CANDIDATES per query."""
    found: list[tuple[np.ndarray, np.ndarray]] = []
    for start in range(0, len(queries), QUERY_CHUNK):
        chunk = queries[start : start + QUERY_CHUNK]
        near = batch[chunk] @ batch[members].T >= threshold  # (Q, M)
        near &= members[None, :] < chunk[:, None]
        query, member = np.nonzero(near)  # by query, then member: earliest first
        first = np.arange(len(query)) - np.searchsorted(query, query) < MAX_CANDIDATES
        found.append((chunk[query[first]], members[member[first]]))
    return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])


def _resolve(keep: np.ndarray, query: np.ndarray, earlier: np.ndarray) -> None:
    """Drop, in row order, each kept row one of whose earlier candidates is kept.

    Args:
        keep: (B,) the rows kept so far, changed in place.
        query, earlier: Pairs of rows of the batch at least the threshold alike, earlier
            before query.
    """
    if not len(query):
        return
    order = np.lexsort((earlier, query))
    query, earlier = query[order], earlier[order]
    cuts = np.flatnonzero(query[1:] != query[:-1]) + 1
    for start, stop in zip(np.r_[0, cuts], np.r_[cuts, len(query)], strict=True):
        row = query[start]
        if keep[row] and keep[earlier[start:stop]].any():
            keep[row] = False
