"""Fit a ShapeFit to values measured at a few (batch, seq) shapes. Pure numpy.

Bytes saved for backward are exact sums of tensor sizes, so they are a polynomial in B and S with
non-negative coefficients: B*S (hidden states), B*S*S (materialised attention), B (per-example tensors
such as a classifier's pooled output and logits), S and S*S (tables shared by the batch), a constant
(autocast's weight copies). The fit takes the non-negative least-squares solution over those terms by
trying every subset of them (there are only 64), which keeps
extrapolation to long sequences from running negative.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from autofit.profiler.schema import ShapeFit

TERMS = ("const", "per_batch", "per_token", "per_token_seq", "per_seq", "per_seq_sq")
TIME_TERMS = ("const", "per_token", "per_token_seq")
"""Timings are noisy: fit only the terms that compute scales with."""


def _features(shapes: Sequence[tuple[int, int]], terms: Sequence[str]) -> np.ndarray:
    columns = {
        "const": lambda b, s: 1.0,
        "per_batch": lambda b, s: float(b),
        "per_token": lambda b, s: float(b * s),
        "per_token_seq": lambda b, s: float(b * s * s),
        "per_seq": lambda b, s: float(s),
        "per_seq_sq": lambda b, s: float(s * s),
    }
    return np.array([[columns[t](b, s) for t in terms] for b, s in shapes])


def fit_shape(shapes: Sequence[tuple[int, int]], values: Sequence[float],
              terms: Sequence[str] = TERMS, *, envelope: bool = False) -> ShapeFit:
    """The non-negative least-squares ShapeFit of `values` measured at `shapes` over `terms`.

    envelope: raise the constant until the fit is at or above every measured value. Transients are the
    maximum over a block's ops, which switches from op to op as shapes grow; a fit that never falls
    below a measurement keeps a plan from running out of memory on that account. Only the larger half
    of the shapes (by tokens) is fitted: that is where plans' peaks are, and small shapes carry constant
    bookkeeping tensors that would bend the fit everywhere."""
    if envelope:
        tokens = sorted(b * s for b, s in shapes)
        keep = [i for i, (b, s) in enumerate(shapes) if b * s >= tokens[len(tokens) // 2]]
        shapes, values = [shapes[i] for i in keep], [values[i] for i in keep]
    x = _features(shapes, terms)
    y = np.asarray(values, dtype=float)
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    xs = x / scale
    feasible: list[tuple[float, int, dict[str, float]]] = []
    for size in range(len(terms) + 1):
        for subset in itertools.combinations(range(len(terms)), size):
            coef = np.linalg.lstsq(xs[:, subset], y, rcond=None)[0] if size else np.zeros(0)
            if np.any(coef < 0):
                continue
            residual = float(np.sum((xs[:, subset] @ coef - y) ** 2))
            feasible.append((residual, size, {terms[i]: float(c / scale[i]) for i, c in zip(subset, coef)}))
    # Among the subsets that fit as well as the best (to rounding), the one with fewest terms.
    tolerance = min(r for r, _, _ in feasible) * 1.0001 + 1e-12 * float(np.sum(y ** 2))
    best = min((f for f in feasible if f[0] <= tolerance), key=lambda f: (f[1], f[0]))
    fit = ShapeFit(**best[2])
    if envelope:
        shortfall = max(0.0, max(v - fit(*shape) for shape, v in zip(shapes, y)))
        fit = fit.model_copy(update={"const": fit.const + shortfall})
    return fit


def relative_error(fit: ShapeFit, shape: tuple[int, int], measured: float) -> float:
    return abs(fit(*shape) - measured) / max(abs(measured), 1.0)
