"""fit_shape: the non-negative least-squares ShapeFit over (batch, seq) terms. Pure numpy, no model."""

import numpy as np
import pytest
from scipy.optimize import nnls

from autofit.profiler.fit import TERMS, TIME_TERMS, _features, fit_shape, relative_error
from autofit.profiler.schema import ShapeFit

GRID = [(b, s) for b in (1, 4) for s in (32, 64, 128, 256)]
"""A profiler-like grid: two batch sizes, four sequence lengths."""
HELD_OUT = [(3, 96), (2, 512), (8, 1024)]


def _coefficients(fit: ShapeFit) -> dict[str, float]:
    return {t: getattr(fit, t) for t in TERMS}


def _values(truth: ShapeFit, shapes) -> list[float]:
    return [truth(b, s) for b, s in shapes]


@pytest.mark.parametrize("truth", [
    # a BERT-like layer: hidden states per token, eager attention scores per token per position
    ShapeFit(per_token=1552.0, per_token_seq=8.0),
    # embeddings with a shared position table and a constant
    ShapeFit(const=4096.0, per_token=144.0, per_seq=8.0),
    # a classifier head: last hidden states, plus per-example pooled output and logits
    ShapeFit(const=4.0, per_batch=144.0, per_token=128.0),
    # DeBERTa-like relative-position tables shared by the batch
    ShapeFit(per_token=3000.0, per_seq=512.0, per_seq_sq=24.0),
], ids=["layer", "embeddings", "head", "relative-positions"])
def test_recovers_a_known_polynomial_exactly(truth):
    fit = fit_shape(GRID, _values(truth, GRID))
    for term, want in _coefficients(truth).items():
        got = getattr(fit, term)
        if want == 0.0:
            assert got == 0.0, f"{term} should be left out of the fit, got {got}"
        else:
            assert got == pytest.approx(want, rel=1e-6), term
    for shape in HELD_OUT:  # exact terms extrapolate exactly
        assert fit(*shape) == pytest.approx(truth(*shape), rel=1e-9)
        assert relative_error(fit, shape, truth(*shape)) < 1e-9


def test_batch_only_term_is_needed_for_per_example_tensors():
    """Without a B term a head's per-example bytes (pooled output, logits: 144 B each here) are smeared over
    the constant and the B*S term, and extrapolate wrongly (the bug this term fixed)."""
    truth = ShapeFit(const=2180.0, per_batch=144.0)  # a bf16 BERT classifier head: nothing per token
    values = _values(truth, GRID)
    without = fit_shape(GRID, values, terms=[t for t in TERMS if t != "per_batch"])
    assert relative_error(without, (2, 512), truth(2, 512)) > 0.05
    fit = fit_shape(GRID, values)
    assert relative_error(fit, (2, 512), truth(2, 512)) < 1e-9
    assert relative_error(fit, (64, 8), truth(64, 8)) < 1e-9


def test_coefficients_are_never_negative_and_the_fit_is_the_nnls_optimum():
    # Concave in S (as if some buffer were reused at long lengths): unconstrained least squares wants a
    # negative B*S*S coefficient, which would make long sequences predict less than nothing.
    values = [1000.0 * b * s - 0.9 * b * s * s + 50.0 for b, s in GRID]
    x = _features(GRID, TERMS)
    free = np.linalg.lstsq(x, np.array(values), rcond=None)[0]
    assert free.min() < 0, "the data must tempt an unconstrained fit into a negative coefficient"
    fit = fit_shape(GRID, values)
    assert all(c >= 0.0 for c in _coefficients(fit).values()), _coefficients(fit)
    assert fit(1, 1 << 16) > 0
    # The subset search must find the non-negative least-squares optimum (scipy's NNLS), up to the 1e-4
    # by which it may trade residual for fewer terms.
    scale = np.abs(x).max(axis=0)
    coef, _ = nnls(x / scale, np.array(values))
    best = float(np.sum((x / scale @ coef - values) ** 2))
    ours = float(np.sum((np.array([fit(b, s) for b, s in GRID]) - values) ** 2))
    assert ours <= best * (1 + 2e-4) + 1e-6


def test_a_decreasing_series_fits_a_non_negative_constant():
    values = [1000.0 - s for _, s in GRID]  # falls with S: no non-negative S term can follow it
    fit = fit_shape(GRID, values)
    assert all(c >= 0.0 for c in _coefficients(fit).values())
    assert fit.per_seq == fit.per_token == fit.per_seq_sq == fit.per_token_seq == 0.0
    assert fit.const == pytest.approx(np.mean(values))


def test_ties_take_the_fewest_terms():
    # At batch 1, B*S and S are the same column, and B*S*S and S*S are too: infinitely many exact fits.
    shapes = [(1, 32), (1, 64), (1, 128), (1, 256)]
    values = [10.0 * s + 3.0 * s * s for _, s in shapes]
    fit = fit_shape(shapes, values)
    used = {t for t, c in _coefficients(fit).items() if c != 0.0}
    assert len(used) == 2, used
    assert len(used & {"per_token", "per_seq"}) == 1 and len(used & {"per_token_seq", "per_seq_sq"}) == 1
    assert fit(1, 512) == pytest.approx(10.0 * 512 + 3.0 * 512 * 512)
    # B and the constant are one column at a single batch size too: one term, not both.
    values = [7.0] * len(shapes)
    used = {t for t, c in _coefficients(fit_shape(shapes, values)).items() if c != 0.0}
    assert len(used) == 1 and used <= {"const", "per_batch"}


def test_zero_data_gives_the_empty_fit():
    assert fit_shape(GRID, [0.0] * len(GRID)) == ShapeFit()


def test_noisy_data_stays_close_and_non_negative():
    rng = np.random.default_rng(0)
    truth = ShapeFit(const=2048.0, per_token=1552.0, per_token_seq=8.0)
    values = [v * (1 + rng.normal(0, 0.01)) for v in _values(truth, GRID)]
    fit = fit_shape(GRID, values)
    assert all(c >= 0.0 for c in _coefficients(fit).values())
    for shape in GRID + HELD_OUT[:2]:
        assert relative_error(fit, shape, truth(*shape)) < 0.03, shape


def test_noisy_times_use_only_the_compute_terms():
    rng = np.random.default_rng(1)
    shapes = [(1, 32), (2, 64), (4, 64), (4, 128)]  # the profiler's timing shapes
    truth = ShapeFit(const=2e-4, per_token=3e-6, per_token_seq=1e-9)
    values = [v * (1 + rng.normal(0, 0.03)) for v in _values(truth, shapes)]
    fit = fit_shape(shapes, values, TIME_TERMS)
    assert {t for t, c in _coefficients(fit).items() if c != 0.0} <= set(TIME_TERMS)
    assert all(c >= 0.0 for c in _coefficients(fit).values())
    for shape in shapes + [(8, 128)]:
        assert relative_error(fit, shape, truth(*shape)) < 0.12, shape


def test_shape_fit_never_predicts_below_zero():
    assert ShapeFit(const=10.0, per_seq=-1.0)(1, 100) == 0.0
    assert relative_error(ShapeFit(const=110.0), (1, 1), 100.0) == pytest.approx(0.1)


def test_the_envelope_is_above_every_measurement_and_tight_at_the_small_end():
    """A transient that switches ops: small shapes peak in a per-token op, large ones in the attention
    scores. One lifted fit over the large shapes overshoots the small ones; the `small` fit does not."""
    shapes = [(b, s) for b in (2, 8) for s in (64, 128, 256)]
    values = [max(512.0 * b * s, 40.0 * b * s * s - 6e6) for b, s in shapes]
    fit = fit_shape(shapes, values, envelope=True)
    assert fit.small is not None and fit.small_tokens == 512
    assert all(fit(*shape) >= v - 1e-6 for shape, v in zip(shapes, values))
    assert fit(2, 64) <= 1.05 * values[0]
    assert fit(8, 256) == pytest.approx(values[-1])
    # within the measured grid, the nearest measurement at or above a shape bounds it (transients grow
    # with the shape): the measured shapes come back exactly, the ones between no higher than their bound
    assert all(fit(*shape) == pytest.approx(v) for shape, v in zip(shapes, values))
    assert fit(4, 100) <= values[shapes.index((8, 128))]
    # beyond the grid only the fit speaks
    assert fit(8, 512) > values[-1]


def test_the_grid_bound_never_falls_below_a_max_of_monomial_sums():
    """Between measured shapes the log-log interpolation of a transient (a max over ops of sums of
    monomials with non-negative coefficients) stays above it, and well below the next measured corner."""
    def transient(b, s):
        return max(40.0 * b * s * s + 4096.0 * s, 900.0 * b * s + 3.0 * s * s)

    shapes = [(b, s) for b in (1, 2, 8) for s in (64, 256, 512)]
    fit = ShapeFit(measured=[(b, s, transient(b, s)) for b, s in shapes], const=1e12)  # the fit itself: no bound
    for b, s in [(3, 96), (6, 200), (2, 100), (5, 64), (8, 300), (1, 65)]:
        bound = fit.grid_bound(b, s)
        assert transient(b, s) <= bound <= transient(8, 512)
        assert fit(b, s) == bound
    assert fit.grid_bound(16, 64) is None and fit.grid_bound(2, 1024) is None  # above the grid
    assert fit.grid_bound(4, 128) < 0.6 * transient(8, 256)  # tighter than the next measured corner
    # below the shortest measured length a transient is at most the grid's edge (it grows with the shape),
    # where an extrapolated fit can be far above it (a tiny distilbert's was 2x at seq 56)
    for b, s in [(4, 56), (2, 8), (8, 1)]:
        assert transient(b, s) <= fit.grid_bound(b, s) == fit.grid_bound(b, 64)
        assert fit(b, s) == fit.grid_bound(b, s)
