"""One tenant's vectors in FAISS: exact while small, an inverted file once large.

A shard is keyed by SQL row id and scores by inner product (cosine on the unit vectors
the embedders produce). Below `ivf_threshold` vectors it is a flat index, searched
exhaustively; above it an IVF index whose coarse quantizer is trained on a sample of
the shard and retrained as the shard grows. Neither kind does I/O or locking: the
VectorIndex around them does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

FLAT = "flat"
IVF = "ivf"
ENCODINGS = ("flat", "sq8")
TRAIN_POINTS_PER_LIST = 40  # FAISS warns below 39 training points per centroid
KMEANS_ITERATIONS = 10
ADD_CHUNK = 65_536
# FAISS's SWIG classes take keyword arguments its type stubs do not declare.
_SearchParameters: Any = faiss.SearchParameters
_SearchParametersIVF: Any = faiss.SearchParametersIVF


@dataclass(frozen=True)
class ShardPolicy:
    """When a shard is an IVF index and how that index is built and searched."""

    ivf_threshold: int = 50_000  # vectors at which a shard becomes IVF
    encoding: str = "flat"  # how IVF lists store vectors: "flat" (float32) or "sq8"
    nprobe: int | None = None  # lists searched; None: chosen from nlist
    retrain_growth: float = 4.0  # retrain once a shard holds this many times its training size

    def __post_init__(self) -> None:
        if self.ivf_threshold < 1:
            raise ValueError(f"ivf_threshold must be >= 1, got {self.ivf_threshold}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if self.nprobe is not None and self.nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {self.nprobe}")
        if self.retrain_growth <= 1:
            raise ValueError(f"retrain_growth must be > 1, got {self.retrain_growth}")

    def nlist_for(self, count: int) -> int:
        """About 2 * sqrt(count) lists (2048 at 1M), a power of two from 64 to 8192."""
        lists = 2 ** round(math.log2(max(1, 2 * math.isqrt(count))))
        return int(min(8192, max(64, lists)))

    def nprobe_for(self, nlist: int) -> int:
        """Lists searched: about 12k vectors' worth (n ~ nlist^2 / 4), at least 24 lists.

        At 1M vectors (2048 lists) that is 24 lists: recall@10 0.96 at a p99 under 4 ms on
        2 cores (docs/benchmarks.md); smaller shards can afford a larger share.
        """
        if nlist == 0:  # a flat shard has no lists
            return 0
        return min(nlist, self.nprobe or max(24, 32_768 // nlist))

    def wanted(self, shard: Shard) -> str | None:
        """The kind the shard should be rebuilt as, or None when it is fine as it is."""
        count = shard.ntotal
        if shard.kind == FLAT:
            return IVF if count >= self.ivf_threshold else None
        if count < self.ivf_threshold // 4:
            return FLAT
        stale = count >= self.retrain_growth * shard.trained_on
        return IVF if stale or shard.encoding != self.encoding else None


class Shard:
    """A FAISS index of one tenant's vectors, keyed by SQL row id."""

    def __init__(self, index: faiss.Index, *, trained_on: int = 0) -> None:
        self.index: Any = index  # IndexIDMap2 over IndexFlatIP, or an IndexIVF
        self.trained_on = trained_on  # vectors the IVF quantizer was trained on; 0 for flat
        self.dirty = True  # changed since it was last written to disk

    @classmethod
    def flat(cls, dimension: int) -> Shard:
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dimension)))

    @property
    def kind(self) -> str:
        return IVF if isinstance(self.index, faiss.IndexIVF) else FLAT

    @property
    def encoding(self) -> str:
        return "sq8" if isinstance(self.index, faiss.IndexIVFScalarQuantizer) else "flat"

    @property
    def nlist(self) -> int:
        return int(self.index.nlist) if self.kind == IVF else 0

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dimension(self) -> int:
        return int(self.index.d)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if ids.size:
            self.index.add_with_ids(vectors, ids)
            self.dirty = True

    def remove(self, ids: Sequence[int]) -> int:
        if not ids or not self.ntotal:
            return 0
        batch = np.ascontiguousarray(ids, dtype=np.int64)
        removed = int(
            self.index.remove_ids(faiss.IDSelectorBatch(batch.size, faiss.swig_ptr(batch)))
        )
        self.dirty = self.dirty or removed > 0
        return removed

    def remove_above(self, last_id: int) -> None:
        self.index.remove_ids(faiss.IDSelectorRange(last_id + 1, 2**63 - 1))

    def search(
        self,
        matrix: np.ndarray,
        fetch: int,
        *,
        nprobe: int,
        allowed: np.ndarray | None = None,
    ) -> list[tuple[int, float]]:
        """Up to fetch (id, score) pairs, best first; only ids in allowed when it is given.

        Runs on the calling thread alone: one query gains little from OpenMP threads, and
        their start-up and spinning cost far more when other requests keep the cores busy.
        """
        faiss.omp_set_num_threads(1)  # OpenMP settings are per thread
        selector = None
        if allowed is not None:
            selector = faiss.IDSelectorBatch(allowed.size, faiss.swig_ptr(allowed))
        if self.kind == IVF:
            params = _SearchParametersIVF(sel=selector, nprobe=nprobe)
        else:
            params = _SearchParameters(sel=selector)
        scores, ids = self.index.search(matrix, fetch, params=params)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of (ids, vectors) of every vector held; vectors exact for flat storage."""
        if self.kind == FLAT:
            ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
            return ids, self.index.index.reconstruct_n(0, self.ntotal)
        invlists = self.index.invlists
        all_ids = []
        for number in range(self.nlist):
            size = invlists.list_size(number)
            if size:
                all_ids.append(faiss.rev_swig_ptr(invlists.get_ids(number), size).copy())
        ids = np.concatenate(all_ids) if all_ids else np.zeros(0, dtype=np.int64)
        vectors = np.empty((ids.size, self.dimension), dtype=np.float32)
        start = 0
        for number in range(self.nlist):
            size = invlists.list_size(number)
            if size:
                codes = faiss.rev_swig_ptr(invlists.get_codes(number), size * invlists.code_size)
                vectors[start : start + size] = self._decode(codes.reshape(size, -1))
                start += size
        return ids, vectors

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        if self.encoding == "flat":
            return codes.view(np.float32).reshape(len(codes), self.dimension)
        return self.index.sq.decode(np.ascontiguousarray(codes))


def build(
    ids: np.ndarray, vectors: np.ndarray, *, kind: str, policy: ShardPolicy, dimension: int
) -> Shard:
    """A new shard of the given kind holding vectors keyed by ids, built on every core."""
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # this thread only; searches set 1
    if kind == FLAT:
        shard = Shard.flat(dimension)
        shard.add(ids, vectors)
        return shard
    count = len(ids)
    nlist = policy.nlist_for(count)
    quantizer = faiss.IndexFlatIP(dimension)
    if policy.encoding == "sq8":
        index: faiss.IndexIVF = faiss.IndexIVFScalarQuantizer(
            quantizer, dimension, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
    else:
        index = faiss.IndexIVFFlat(quantizer, dimension, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = KMEANS_ITERATIONS
    index.cp.seed = count  # the same rows train the same quantizer
    sample_size = min(count, TRAIN_POINTS_PER_LIST * nlist)
    rng = np.random.default_rng(count)
    sample = np.sort(rng.choice(count, size=sample_size, replace=False))
    index.train(np.ascontiguousarray(vectors[sample]))
    shard = Shard(index, trained_on=count)
    for start in range(0, count, ADD_CHUNK):
        shard.add(ids[start : start + ADD_CHUNK], vectors[start : start + ADD_CHUNK])
    return shard
