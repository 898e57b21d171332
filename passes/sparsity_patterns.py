"""Sparsity patterns and their masks on a weight seen as a matrix [N outputs, K reduction].

Every weight the sparsify pass touches is viewed as `W2[N, K]`: rows are output features/channels, columns run
along the reduction axis (MatMul: `W.T`; Gemm: `B` or `B.T`; Conv: `W[O, I, kh, kw] -> [O, kh*kw*I]`, i.e.
input channels innermost, the order an NHWC im2col reads). Patterns, named as on the command line:

- `unstructured`: any element may be zero.
- `block:RxC` (or `RxC`): whole R x C blocks are zero, R rows of N by C columns of K - the BSR block of the
  kernels in `codegen/sparse` (`16x1` fills an AVX-512 vector along the outputs, `1x4` runs along K).
- `N:M` (e.g. `2:4`): at most N nonzeros in every group of M consecutive elements along K (the sparsity is
  fixed at 1 - N/M).

A pattern turns a score matrix (|w|^2, or the OBS saliency w^2 / [H^-1]_kk^2 with calibration data) into a
keep-mask of the same shape; edges that a block or group does not fill are handled as partial blocks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from sparsecc.errors import BadInput


def _pad_to(a: np.ndarray, rows: int, cols: int) -> np.ndarray:
    n, k = a.shape
    pn, pk = -n % rows, -k % cols
    return np.pad(a, ((0, pn), (0, pk))) if pn or pk else a


def prune_lowest(scores: np.ndarray, count: int) -> np.ndarray:
    """Keep-mask of a flat score array with the `count` lowest entries pruned (stable on ties)."""
    keep = np.ones(scores.size, bool)
    if count > 0:
        order = np.argsort(scores.ravel(), kind="stable")
        keep[order[:count]] = False
    return keep.reshape(scores.shape)


@dataclass(frozen=True)
class Unstructured:
    name: str = "unstructured"
    fixed_sparsity: float | None = None

    def group_scores(self, scores: np.ndarray) -> np.ndarray:
        return scores

    def expand(self, group_keep: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        return group_keep

    def mask(self, scores: np.ndarray, sparsity: float) -> np.ndarray:
        return prune_lowest(scores, int(round(sparsity * scores.size)))

    def holds(self, w2: np.ndarray, sparsity: float = 0.0) -> bool:
        """At least `sparsity` of the elements are zero."""
        return bool(w2.size - np.count_nonzero(w2) >= int(round(sparsity * w2.size)))


@dataclass(frozen=True)
class BlockPattern:
    rows: int
    cols: int
    fixed_sparsity: float | None = None

    @property
    def name(self) -> str:
        return f"block:{self.rows}x{self.cols}"

    def group_scores(self, scores: np.ndarray) -> np.ndarray:
        """Mean score per block (mean, so partial edge blocks compare fairly), shape [N/R, K/C] rounded up."""
        n, k = scores.shape
        r, c = self.rows, self.cols
        ones = _pad_to(np.ones_like(scores), r, c)
        padded = _pad_to(scores, r, c)
        nb, kb = padded.shape[0] // r, padded.shape[1] // c
        total = padded.reshape(nb, r, kb, c).sum(axis=(1, 3))
        count = ones.reshape(nb, r, kb, c).sum(axis=(1, 3))
        return total / count

    def expand(self, group_keep: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        full = np.kron(group_keep, np.ones((self.rows, self.cols), bool)).astype(bool)
        return full[: shape[0], : shape[1]]

    def mask(self, scores: np.ndarray, sparsity: float) -> np.ndarray:
        g = self.group_scores(scores)
        return self.expand(prune_lowest(g, int(round(sparsity * g.size))), scores.shape)

    def holds(self, w2: np.ndarray, sparsity: float = 0.0) -> bool:
        """At least `sparsity` of the (edge-padded) blocks are entirely zero."""
        zb = self.zero_blocks(w2)
        return bool(zb.sum() >= int(round(sparsity * zb.size)))

    def zero_blocks(self, w2: np.ndarray) -> np.ndarray:
        n, k = w2.shape
        r, c = self.rows, self.cols
        p = _pad_to(np.abs(w2), r, c)
        return p.reshape(p.shape[0] // r, r, p.shape[1] // c, c).max(axis=(1, 3)) == 0


@dataclass(frozen=True)
class NMPattern:
    n: int
    m: int

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def fixed_sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def group_scores(self, scores: np.ndarray) -> np.ndarray:
        return scores

    def expand(self, group_keep: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        return group_keep

    def mask(self, scores: np.ndarray, sparsity: float | None = None) -> np.ndarray:
        rows, k = scores.shape
        padded = np.pad(scores, ((0, 0), (0, -k % self.m)), constant_values=-np.inf)
        groups = padded.reshape(rows, -1, self.m)
        order = np.argsort(-groups, axis=2, kind="stable")  # highest first
        keep = np.zeros_like(groups, dtype=bool)
        np.put_along_axis(keep, order[:, :, : self.n], True, axis=2)
        return keep.reshape(rows, -1)[:, :k]

    def holds(self, w2: np.ndarray, sparsity: float | None = None) -> bool:
        """At most N nonzeros in every group of M along K."""
        rows, k = w2.shape
        padded = np.pad(w2 != 0, ((0, 0), (0, -k % self.m)))
        return bool((padded.reshape(rows, -1, self.m).sum(axis=2) <= self.n).all())


Pattern = Unstructured | BlockPattern | NMPattern

_BLOCK = re.compile(r"^(?:block:)?(\d+)x(\d+)$")
_NM = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(text: str) -> Pattern:
    """`unstructured`, `block:RxC` / `RxC`, or `N:M`; anything else is a BadInput naming the accepted forms."""
    t = str(text).strip().lower()
    if t == "unstructured":
        return Unstructured()
    if mb := _BLOCK.match(t):
        r, c = int(mb.group(1)), int(mb.group(2))
        if r < 1 or c < 1 or r * c < 2 or r > 64 or c > 64:
            raise BadInput(f"--pattern '{text}': block sides must be 1..64 and the block at least 2 elements")
        return BlockPattern(r, c)
    if mn := _NM.match(t):
        n, m = int(mn.group(1)), int(mn.group(2))
        if not 0 < n < m or m > 64:
            raise BadInput(f"--pattern '{text}': N:M needs 0 < N < M <= 64")
        return NMPattern(n, m)
    raise BadInput(f"--pattern '{text}': expected 'unstructured', 'block:RxC' (e.g. block:4x4, or 4x4), "
                   "or 'N:M' (e.g. 2:4)")
