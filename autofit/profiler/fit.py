"""Fit a ShapeFit to values measured at a few (batch, seq) shapes. Pure numpy.

Bytes saved for backward are exact sums of tensor sizes, so they are a polynomial in B and S with
non-negative coefficients: B*S (hidden states), B*S*S (materialised attention), B (per-example tensors
such as a classifier's pooled output and logits), S and S*S (tables shared by the batch), a constant
(autocast's weight copies). The fit takes the non-negative least-squares solution over those terms by
trying every subset of them (there are only 64), which keeps
extrapolation to long sequences from running negative.
"""

from __future__ import annotations

import functools
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

    Memoized (a ShapeFit is immutable): a profile fits the same series many times over (fp16 reuses bf16's
    measurements, many quantities are zero for most blocks). The key holds each value's exact bits."""
    key = (tuple((b, s) for b, s in shapes), tuple(float(v).hex() for v in values), tuple(terms), envelope)
    return _memoized_fit(*key)


@functools.lru_cache(maxsize=4096)
def _memoized_fit(shapes: tuple, values: tuple[str, ...], terms: tuple[str, ...], envelope: bool) -> ShapeFit:
    return _fit_shape(list(shapes), [float.fromhex(v) for v in values], terms, envelope=envelope)


def _fit_shape(shapes: Sequence[tuple[int, int]], values: Sequence[float],
               terms: Sequence[str], *, envelope: bool) -> ShapeFit:
    """fit_shape, computed.

    envelope: fit at or above every measured value. Transients are the maximum over a block's ops, which
    switches from op to op as shapes grow, so the larger and the smaller half of the shapes (by tokens) get
    a fit each, the smaller one as `small`; each has its constant raised until no measurement is above it
    (a plan must not run out of memory on that account). The measurements are kept: within their grid
    they bound the fit from above."""
    if not envelope:
        return _least_squares(shapes, values, terms)
    tokens = sorted(b * s for b, s in shapes)
    median = tokens[len(tokens) // 2]
    large = _lifted(*_subset(shapes, values, lambda t: t >= median), terms)
    update = {"measured": tuple((b, s, float(v)) for (b, s), v in zip(shapes, values))}
    small_shapes, small_values = _subset(shapes, values, lambda t: t <= median)
    if len(small_shapes) >= 2:
        update.update(small=_lifted(small_shapes, small_values, terms), small_tokens=median)
    return large.model_copy(update=update)


def _subset(shapes, values, keep) -> tuple[list, list]:
    chosen = [i for i, (b, s) in enumerate(shapes) if keep(b * s)]
    return [shapes[i] for i in chosen], [values[i] for i in chosen]


def _lifted(shapes, values, terms) -> ShapeFit:
    """The least-squares fit with its constant raised to the largest shortfall."""
    fit = _least_squares(shapes, values, terms)
    shortfall = max(0.0, max(v - fit(*shape) for shape, v in zip(shapes, values)))
    return fit.model_copy(update={"const": fit.const + shortfall})


def _least_squares(shapes, values, terms) -> ShapeFit:
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
    return ShapeFit(**best[2])


def relative_error(fit: ShapeFit, shape: tuple[int, int], measured: float) -> float:
    return abs(fit(*shape) - measured) / max(abs(measured), 1.0)
