"""On a real CUDA card (marked gpu; skipped without one): calibration, --vram auto, the timed and
kernel-corrected profile, CUDA-event timing. benchmarks/gpu.py checks predictions against the allocator."""

import pytest
import torch

from autofit import card
from autofit.budget import parse_budget
from autofit.profiler.instrument import EventClock

from _tiny import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOFIT_CACHE", str(tmp_path))


def test_calibration_measures_the_card(own_cache):
    found = card.card_calibration("cuda", force=True)
    assert found.hardware == torch.cuda.get_device_name() and found.cuda_version == torch.version.cuda
    assert 50 * 2**20 < found.context_bytes < 4 * 2**30  # a CUDA context is hundreds of MB
    assert all(s.reserved >= s.allocated > 0 for s in found.samples)
    assert all(s.reserved <= s.allocated * (1 + found.reserve_fraction) + found.reserve_bytes + 1
               for s in found.samples)
    spec = card.card_spec()
    assert spec.hardware == found.hardware and spec.calibration is not None
    assert (spec.context_bytes, spec.workspace_bytes) == (found.context_bytes, found.workspace_bytes)


def test_vram_auto_reads_this_card():
    free, total = torch.cuda.mem_get_info()
    assert free <= parse_budget("auto") <= total


def test_event_clock_times_the_gpu():
    clock = EventClock()
    a = torch.randn(2048, 2048, device="cuda")
    start = clock.mark()
    for _ in range(10):
        a = a @ a / 2048
    seconds = clock.seconds(start, clock.mark())
    assert 0 < seconds < 5


def test_profile_on_the_card_is_timed_and_corrected(own_cache):
    spec = card.card_spec()
    model = tiny_model("llama", "causal-lm")
    profile = card.card_profile(model.config, "causal-lm", spec, adapters=False)
    assert profile.device == "cuda" and profile.device_name == spec.hardware
    assert profile.kernel_correction == spec.hardware
    assert {"fp32", "fp16"} <= set(profile.block("layer").time)
    found = card.card_calibration("cuda")
    assert f"llama/{profile.attn_implementation}" in found.saved
