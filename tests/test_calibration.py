"""autofit/calibration.py: the reserve and correction fits, the cache, and what a calibration changes in the
memory model's predictions (reserved = allocated + reserve; the context is outside both)."""

import pytest

from autofit import calibration as cal
from autofit.calibration import AllocatorSample, Calibration, SavedCorrection, corrected, fit_correction, fit_reserve
from autofit.devices import get_device
from autofit.knobs import Knobs
from autofit.memory import predict_step_peak
from autofit.plan import MemoryBreakdown

from _profiles import make_profile

MIB = 2**20


def _calibration(**update) -> Calibration:
    fields = dict(hardware="NVIDIA Test GPU", torch_version="2.13.0", cuda_version="12.8", context_bytes=500 * MIB,
                  context_source="process", workspace_bytes=8 * MIB, reserve_fraction=0.04, reserve_bytes=20 * MIB,
                  samples=[AllocatorSample(allocated=100 * MIB, reserved=130 * MIB)], created="2026-12-02T10:00:00")
    return Calibration(**{**fields, **update})


def test_reserve_fit_is_an_upper_envelope_of_the_samples():
    samples = [AllocatorSample(allocated=a * MIB, reserved=r * MIB) for a, r in
               [(10, 22), (100, 120), (1000, 1060), (4000, 4170), (2000, 2130)]]
    fraction, fixed = fit_reserve(samples)
    assert 0.02 < fraction < 0.06 and fixed > 0
    for s in samples:  # no sample above the line: a plan's predicted reserved peak never below a measured one
        assert s.reserved <= s.allocated * (1 + fraction) + fixed + 1
    # and it is tight: some sample lies on it
    assert min(s.allocated * (1 + fraction) + fixed - s.reserved for s in samples) < 1 * MIB


def test_reserve_fit_of_an_exact_allocator_is_zero_and_slope_is_clipped():
    assert fit_reserve([AllocatorSample(allocated=a, reserved=a) for a in (10, 20, 30)]) == (0.0, 0)
    fraction, _ = fit_reserve([AllocatorSample(allocated=a, reserved=3 * a) for a in (10, 20, 30)])
    assert fraction == 0.5  # a wild slope is held at 50%, the intercept takes the rest
    with pytest.raises(ValueError, match="no allocator samples"):
        fit_reserve([])


def test_correction_fit_recovers_a_logsumexp_and_an_attention_matrix():
    # real kernels keep 4 bytes per token more (a logsumexp) and 2 bytes x B*S*S less (no probabilities)
    points = [(b, s, 1000 + 4 * b * s, 1000 + 2 * b * s * s) for b, s in ((2, 128), (2, 256), (4, 256), (4, 128))]
    fix = fit_correction(points)
    assert fix.per_token == pytest.approx(4) and fix.per_token_seq == pytest.approx(-2)
    assert fix.const == pytest.approx(0, abs=1e-3) and not fix.is_zero
    assert fix(3, 100) == pytest.approx(4 * 300 - 2 * 300 * 100)
    assert fit_correction([(2, 128, 5.0, 5.0), (4, 256, 7.0, 7.0)]).is_zero


def test_cache_round_trip_is_per_card_and_stack(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOFIT_CACHE", str(tmp_path))
    found = _calibration()
    path = cal.save_calibration(found)
    assert path is not None and path.parent == tmp_path / "calibration" and " " not in path.name
    assert cal.load_calibration("NVIDIA Test GPU", "2.13.0", "12.8", "") == found
    assert cal.load_calibration("NVIDIA Test GPU", "2.14.0", "12.8", "") is None  # another torch measures again
    assert cal.load_calibration("NVIDIA Test GPU", "2.13.0", "12.8", "expandable_segments:True") is None
    path.write_text("{not json")
    assert cal.load_calibration("NVIDIA Test GPU", "2.13.0", "12.8", "") is None
    monkeypatch.setenv("AUTOFIT_CACHE", "0")
    assert cal.save_calibration(found) is None and cal.calibration_dir() is None


def test_a_calibration_sets_the_device_terms_and_the_reserved_prediction():
    spec = _calibration().apply(get_device("a100"))
    assert (spec.context_bytes, spec.workspace_bytes, spec.allocator_reserve_bytes) == (500 * MIB, 8 * MIB, 20 * MIB)
    assert spec.calibration.startswith("NVIDIA Test GPU, torch 2.13.0, CUDA 12.8, 2026-12-02")
    profile = make_profile(hidden=64, layers=2, vocab=1000)
    plain = predict_step_peak(profile, Knobs(), 4, 64, get_device("cpu"))
    peak = predict_step_peak(profile, Knobs(), 4, 64, spec)
    tensors = plain.allocated_bytes
    assert peak.workspace == 8 * MIB and peak.allocated_bytes == tensors + 8 * MIB  # the workspace is allocated
    assert peak.context == 500 * MIB
    reserve = int(0.04 * (tensors + 8 * MIB) + 20 * MIB)
    assert abs(peak.reserved_bytes - (peak.allocated_bytes + reserve)) <= 1
    assert peak.peak_bytes == peak.reserved_bytes + 500 * MIB  # an OOM comes at reserved + context


def test_breakdown_json_checks_the_reserved_total_and_the_context():
    m = MemoryBreakdown(weights=10, gradients=0, optimizer_state=0, activations=5, temporaries=0, overhead=7,
                        context=4, workspace=2, peak_phase="forward")
    assert (m.peak_bytes, m.allocated_bytes, m.reserved_bytes) == (24, 17, 20)
    data = m.model_dump(mode="json")
    assert MemoryBreakdown.model_validate(data) == m
    with pytest.raises(ValueError, match="reserved_bytes is not the sum"):
        MemoryBreakdown.model_validate({**data, "reserved_bytes": 21})
    with pytest.raises(ValueError, match="part of overhead"):
        MemoryBreakdown.model_validate({**data, "context": 8, "reserved_bytes": 16})


def test_correction_moves_only_the_layers_saved_fits():
    profile = make_profile(hidden=64, layers=2, vocab=1000)
    fix = SavedCorrection(const=100.0, per_token=8.0, measured=[(2, 64, 1124.0, 0.0)])
    moved = corrected(profile, {p: fix for p in ("fp32", "bf16", "fp16")}, "NVIDIA Test GPU")
    assert moved.kernel_correction == "NVIDIA Test GPU"
    before, after = profile.block("layer").activations["fp32"], moved.block("layer").activations["fp32"]
    for b, s in ((2, 64), (8, 256)):
        assert after.saved(b, s) == pytest.approx(before.saved(b, s) + 100 + 8 * b * s)
        assert after.saved_first_trainable(b, s) == pytest.approx(before.saved_first_trainable(b, s) + 100 + 8 * b * s)
        assert after.output(b, s) == before.output(b, s)
    assert moved.block("head") == profile.block("head")
    # a correction measured as zero leaves every fit as it was
    zero = corrected(profile, {"fp32": SavedCorrection(measured=[(2, 64, 5.0, 5.0)])}, "cpu")
    assert zero.blocks == profile.blocks and zero.kernel_correction == "cpu"
