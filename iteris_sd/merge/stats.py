"""Streamed per-layer statistics: the only thing the solver needs from a calibration run.

For one layer and one concept i, with X (n, d_in) the layer's inputs in the model carrying
LoRA i alone and X~ (n, d_in) the inputs of the merged model on the same data, row for row,
the solve needs

    G = X^T X      (d_in, d_in)   used by the adaptive weights and the residuals
    C = X^T X~     (d_in, d_in)
    H = X~^T X~

summed over prompts, timesteps and tokens. For the automatic ridge (`iteris_sd.merge.ridge`)
the reference pass can also split G into two folds of calibration pictures, G = G_0 + G_1
(``track_folds``; rows come tagged with their fold, 0 or 1). They are kept in one of two forms:

- **Gram form** (`ConceptStats`, the default): the three d_in x d_in sums themselves,
  accumulated as the passes run. Exact; 3 d_in^2 floats per layer and concept.
- **Sample form** (`SampledStats`): at most k token rows of X and the *same* rows of X~
  (a seeded bottom-k sample over the whole pass: every row gets a key from a generator
  seeded by the layer, the concept and the forward call, and the k smallest keys are
  kept). G, C and H are then (n / k) X_s^T X_s etc. When a layer sees no more than k rows,
  every row is kept and the statistics are exact. 2 k d_in floats per layer and concept,
  and the solver can use the dual (k x k) form instead of the d_in x d_in one.

Both forms allocate lazily, on the device and in the dtype of the first rows they see
(float32 by default), so they live on the compute device without a copy to the CPU.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

F64 = torch.float64


def _normal_zeros(*shape, dtype, device) -> Tensor:
    """Zeros that are a normal tensor even when allocated inside torch.inference_mode (the
    sinks run there), so they can be updated in place inside and outside it."""
    with torch.inference_mode(False):
        return torch.zeros(*shape, dtype=dtype, device=device)


def _f64(t: Tensor, device) -> Tensor:
    """A float64 copy of t on device (never t itself: callers modify it in place)."""
    return t.to(device=device, dtype=F64, copy=True)


@dataclass
class ConceptStats:
    """The Gram statistics of one layer for one concept (see the module docstring).

    ``gram`` holds the reference statistics (None until rows arrived when created with
    `lazy`); ``cross`` and ``gram_merged`` are None until the merged model has been
    captured: the first solve uses X~ = X, so both equal ``gram`` then.
    """

    gram: Tensor | None
    cross: Tensor | None = None
    gram_merged: Tensor | None = None
    rows: int = 0
    d_in: int = 0
    dtype: torch.dtype = torch.float32
    track_folds: bool = False
    fold_gram: Tensor | None = None  # G_1, the rows of fold 1 (with track_folds)
    fold_rows: tuple[int, int] = (0, 0)

    form = "gram"

    def __post_init__(self):
        if self.gram is not None:
            self.d_in, self.dtype = self.gram.shape[0], self.gram.dtype

    @classmethod
    def zeros(cls, d_in: int, dtype=torch.float32, device="cpu") -> ConceptStats:
        return cls(_normal_zeros(d_in, d_in, dtype=dtype, device=device))

    @classmethod
    def lazy(cls, d_in: int, dtype=torch.float32, track_folds: bool = False) -> ConceptStats:
        """Allocated on the device of the first rows added."""
        return cls(None, d_in=d_in, dtype=dtype, track_folds=track_folds)

    # ----- accumulation (called from the capture sinks)
    def _alloc(self, like: Tensor) -> Tensor:
        return _normal_zeros(self.d_in, self.d_in, dtype=self.dtype, device=like.device)

    def add_reference(self, X: Tensor, folds: Tensor | None = None) -> None:
        """gram += X^T X for a batch of rows X (n, d_in) of the LoRA-i model; with
        ``track_folds``, ``folds`` (n,) bool marks the rows of fold 1 (None: all in fold 0)."""
        if self.gram is None:
            self.gram = self._alloc(X)
        X = X.to(self.gram.dtype)
        self.gram.addmm_(X.T, X)
        self.rows += X.shape[0]
        if self.track_folds:
            ones = 0 if folds is None else int(folds.sum())
            if ones:
                if self.fold_gram is None:
                    self.fold_gram = self._alloc(X)
                X1 = X[folds.to(X.device)]
                self.fold_gram.addmm_(X1.T, X1)
            self.fold_rows = (self.fold_rows[0] + X.shape[0] - ones, self.fold_rows[1] + ones)

    def add_pair(self, X: Tensor, X_merged: Tensor, reference: bool = False) -> None:
        """cross += X^T X~, gram_merged += X~^T X~ for rows paired one to one; with
        ``reference`` also gram += X^T X (the reference statistics recomputed in the
        paired pass instead of kept from the reference pass)."""
        if self.cross is None:
            self.cross = self._alloc(X)
            self.gram_merged = self._alloc(X)
        X, Xm = X.to(self.cross.dtype), X_merged.to(self.cross.dtype)
        if reference:
            if self.gram is None:
                self.gram = self._alloc(X)
            self.gram.addmm_(X.T, X)
            self.rows += X.shape[0]
        self.cross.addmm_(X.T, Xm)
        self.gram_merged.addmm_(Xm.T, Xm)

    def reset_merged(self) -> None:
        """Forget the merged-model statistics before the next capture of X~."""
        self.cross = None
        self.gram_merged = None

    def reset_reference(self) -> None:
        """Forget the reference statistics too (they are recaptured when needed)."""
        self.gram = None
        self.fold_gram = None
        self.fold_rows = (0, 0)
        self.rows = 0
        self.reset_merged()

    # ----- what the solver reads
    @property
    def has_reference(self) -> bool:
        return self.gram is not None

    @property
    def has_merged(self) -> bool:
        return self.cross is not None

    @property
    def device(self) -> torch.device:
        return self.gram.device if self.gram is not None else torch.device("cpu")

    def _gram(self) -> Tensor:
        if self.gram is None:  # no rows ever reached the layer for this concept
            self.gram = _normal_zeros(self.d_in, self.d_in, dtype=self.dtype, device="cpu")
        return self.gram

    def gram64(self, device=None) -> Tensor:
        """G in float64 (a fresh copy)."""
        G = self._gram()
        return _f64(G, device or G.device)

    def cross64(self, device=None) -> Tensor:
        """C in float64 (a fresh copy); G before the merged model was captured."""
        C = self._gram() if self.cross is None else self.cross
        return _f64(C, device or C.device)

    def merged_gram64(self, device=None) -> Tensor:
        """H in float64 (a fresh copy); G before the merged model was captured."""
        H = self._gram() if self.gram_merged is None else self.gram_merged
        return _f64(H, device or H.device)

    def fold_grams64(self, device=None) -> tuple[Tensor, Tensor] | None:
        """(G_0, G_1) in float64, or None unless both folds received rows."""
        if not all(self.fold_rows):
            return None
        G1 = _f64(self.fold_gram, device or self.fold_gram.device)
        return self.gram64(device) - G1, G1

    def energy(self, M: Tensor) -> float:
        """||X M^T||_F^2 = tr(M G M^T) for M (d_out, d_in) float64."""
        G = self._gram()
        M = M.to(G.device)
        return float(((M @ G.double()) * M).sum())

    def solve_inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """(G, C, H) in float64, with C = H = G before the merged model was captured."""
        G = self._gram().double()
        if self.cross is None:
            return G, G, G
        return G, self.cross.double(), self.gram_merged.double()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gram, self.cross, self.gram_merged, self.fold_gram)
                   if t is not None)


def sample_seed(seed: int, layer: str, concept: int) -> int:
    """The seed of a layer's and concept's token sample: the same in every pass."""
    return (seed * 1_000_003 + zlib.crc32(layer.encode()) * 131 + concept) % (2**62)


@dataclass
class _Sketch:
    """A bottom-k sample over one pass: slot s holds the row whose key is slot_keys[s];
    slots still empty hold key +inf and zero rows."""

    keys: Tensor  # (k,) float64 on the CPU
    calls: int = 0
    rows: int = 0

    @classmethod
    def empty(cls, k: int) -> _Sketch:
        return cls(torch.full((k,), math.inf, dtype=F64))

    def offer(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """Keys for a call of n rows; returns (slots to overwrite, incoming row indices)."""
        g = torch.Generator().manual_seed((seed * 7919 + self.calls) % (2**63))
        new = torch.rand(n, generator=g, dtype=F64)
        self.calls += 1
        self.rows += n
        k = self.keys.numel()
        both = torch.cat([self.keys, new])
        chosen = torch.zeros(k + n, dtype=torch.bool)
        chosen[torch.topk(both, k, largest=False).indices] = True
        slots = (~chosen[:k]).nonzero().flatten()
        incoming = chosen[k:].nonzero().flatten()
        self.keys[slots] = new[incoming]
        return slots, incoming


@dataclass
class SampledStats:
    """At most ``size`` token rows of X and the same rows of X~ for one layer and concept.

    ``sample`` holds the reference pass's rows of X; ``pair_sample`` and ``merged_sample``
    the paired pass's rows of X and X~, in the same slots (the keys depend only on the seed,
    the forward call and the row, and both passes make the same calls). ``rows`` counts the
    rows seen, so (rows / kept) rescales the sums to the full pass.
    """

    d_in: int
    size: int
    seed: int = 0
    dtype: torch.dtype = torch.float32
    sample: Tensor | None = None
    pair_sample: Tensor | None = None
    merged_sample: Tensor | None = None
    rows: int = 0
    track_folds: bool = False
    sample_folds: Tensor | None = None  # (size,) bool: the kept reference row is in fold 1
    _ref: _Sketch | None = field(default=None, repr=False)
    _pair: _Sketch | None = field(default=None, repr=False)

    form = "sample"

    def _buffer(self, like: Tensor) -> Tensor:
        return _normal_zeros(self.size, self.d_in, dtype=self.dtype, device=like.device)

    def add_reference(self, X: Tensor, folds: Tensor | None = None) -> None:
        if self.sample is None:
            self.sample = self._buffer(X)
            self._ref = _Sketch.empty(self.size)
            self.sample_folds = torch.zeros(self.size, dtype=torch.bool)
        slots, incoming = self._ref.offer(X.shape[0], self.seed)
        if slots.numel():
            dev = self.sample.device
            self.sample[slots.to(dev)] = X[incoming.to(X.device)].to(self.dtype)
            self.sample_folds[slots] = False if folds is None else folds.cpu()[incoming]
        self.rows = self._ref.rows

    def add_pair(self, X: Tensor, X_merged: Tensor, reference: bool = False) -> None:
        if self.merged_sample is None:
            self.pair_sample = self._buffer(X)
            self.merged_sample = self._buffer(X)
            self._pair = _Sketch.empty(self.size)
        slots, incoming = self._pair.offer(X.shape[0], self.seed)
        if slots.numel():
            s, i = slots.to(self.merged_sample.device), incoming.to(X.device)
            self.pair_sample[s] = X[i].to(self.dtype)
            self.merged_sample[s] = X_merged[i].to(self.dtype)
        if reference:  # the paired pass's X is the reference sample
            self.sample, self._ref, self.rows = self.pair_sample, self._pair, self._pair.rows

    def reset_merged(self) -> None:
        if self.sample is not None and self.sample is self.pair_sample:
            self._ref = _Sketch(self._pair.keys.clone(), self._pair.calls, self._pair.rows)
        self.pair_sample = self.merged_sample = None
        self._pair = None

    def reset_reference(self) -> None:
        self.sample = None
        self.sample_folds = None
        self._ref = None
        self.rows = 0
        self.reset_merged()

    @property
    def has_reference(self) -> bool:
        return self.sample is not None

    @property
    def has_merged(self) -> bool:
        return self.merged_sample is not None

    @property
    def device(self) -> torch.device:
        return self.sample.device if self.sample is not None else torch.device("cpu")

    @property
    def kept(self) -> int:
        """Rows actually kept (<= size)."""
        return 0 if self._ref is None else int(torch.isfinite(self._ref.keys).sum())

    @property
    def scale(self) -> float:
        """rows / kept: what turns sums over the sample into sums over the pass."""
        kept = self.kept
        return self.rows / kept if kept else 1.0

    def rows64(self, device=None) -> tuple[Tensor, Tensor, Tensor, float]:
        """(X_s, X_pair, X~_s, scale) in float64, empty slots removed; X_pair = X~_s = X_s
        before the merged model was captured. Scaled sums: G = scale X_s^T X_s, etc."""
        if self.sample is None:
            z = torch.zeros(0, self.d_in, dtype=F64, device=device or "cpu")
            return z, z, z, 1.0
        dev = device or self.sample.device
        keep = torch.isfinite(self._ref.keys)
        if self.merged_sample is not None:
            pair_keys = self._pair.keys
            if not torch.equal(torch.isfinite(pair_keys), keep) or not torch.equal(pair_keys[keep], self._ref.keys[keep]):
                raise RuntimeError(
                    "token sample: the paired pass did not repeat the reference pass's forward calls "
                    "(the backend must capture the same data in the same order)"
                )
        idx = keep.nonzero().flatten().to(self.sample.device)
        X = self.sample.index_select(0, idx).to(device=dev, dtype=F64)
        if self.merged_sample is None:
            return X, X, X, self.scale
        Xp = self.pair_sample.index_select(0, idx).to(device=dev, dtype=F64)
        Xm = self.merged_sample.index_select(0, idx).to(device=dev, dtype=F64)
        return X, Xp, Xm, self.scale

    # The Gram-form interface, built from the rows (the primal solve of a sampled layer).
    def gram64(self, device=None) -> Tensor:
        X, _, _, s = self.rows64(device)
        return s * (X.T @ X)

    def cross64(self, device=None) -> Tensor:
        _, Xp, Xm, s = self.rows64(device)
        return s * (Xp.T @ Xm)

    def merged_gram64(self, device=None) -> Tensor:
        _, _, Xm, s = self.rows64(device)
        return s * (Xm.T @ Xm)

    def fold_grams64(self, device=None) -> tuple[Tensor, Tensor] | None:
        """(G_0, G_1) from the kept rows of each fold (rescaled like G), or None unless
        ``track_folds`` and both folds kept rows."""
        if not self.track_folds or self.sample is None:
            return None
        X, _, _, s = self.rows64(device)
        ones = self.sample_folds[torch.isfinite(self._ref.keys)].to(X.device)
        if not 0 < int(ones.sum()) < ones.numel():
            return None
        X0, X1 = X[~ones], X[ones]
        return s * (X0.T @ X0), s * (X1.T @ X1)

    def energy(self, M: Tensor) -> float:
        X, _, _, s = self.rows64()
        return s * float(((X @ M.to(X.device).T) ** 2).sum())

    def solve_inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.gram64(), self.cross64(), self.merged_gram64()

    def nbytes(self) -> int:
        tensors = {id(t): t for t in (self.sample, self.pair_sample, self.merged_sample) if t is not None}
        return sum(t.numel() * t.element_size() for t in tensors.values())


Stats = ConceptStats | SampledStats


def gram_bytes(d_in: int, itemsize: int = 4) -> int:
    """Bytes of one d_in x d_in statistic."""
    return d_in * d_in * itemsize


def sample_bytes(d_in: int, k: int, itemsize: int = 4) -> int:
    """Bytes of one k-row sample of a layer's inputs (with its keys)."""
    return k * d_in * itemsize + k * 8
