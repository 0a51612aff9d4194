"""autofit/card.py and autofit calibrate: the visible GPU's calibrated spec and timed, kernel-corrected profile.
On a machine without a GPU the same code runs as a dry run on the CPU; the real card is tested in
tests/test_gpu.py (marked gpu)."""

import json

import pytest
import torch

from autofit import budget, card
from autofit.budget import parse_budget
from autofit.calibration import Calibration
from autofit.cli import app
from autofit.cost import is_measured
from autofit.devices import get_device
from autofit.knobs import Knobs
from autofit.profiler.cache import cached_profile
from autofit.profiler.schema import ShapeFit, TimeFit
from typer.testing import CliRunner

from _profiles import make_profile
from _tiny import tiny_model

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


def test_dry_run_calibration_measures_steps_on_the_cpu():
    found = card.card_calibration("cpu", force=True)
    assert found.hardware == "cpu" and found.context_source == "none"
    assert len(found.samples) == 3 and all(s.allocated > 1_000_000 for s in found.samples)
    # the tracker counts tensors only: nothing reserved above them, no context, no workspace
    assert all(s.reserved == s.allocated for s in found.samples)
    assert (found.context_bytes, found.workspace_bytes, found.reserve_fraction, found.reserve_bytes) == (0, 0, 0.0, 0)
    spec = card.dry_run_spec()
    assert spec.kind == "cpu" and spec.calibration.startswith("cpu, torch ")
    assert card.card_calibration("cpu") is found  # kept for the process, never written to the cache


def test_dry_run_profile_is_timed_and_its_kernel_correction_is_zero():
    model = tiny_model("llama", "causal-lm")
    spec = card.dry_run_spec()
    profile = card.card_profile(model, "causal-lm", spec, adapters=False, device_type="cpu")
    assert profile.device == "cpu" and profile.kernel_correction == "cpu"
    assert set(profile.block("layer").time) == {"fp32", "bf16", "fp16"}
    # the CPU's real kernels save exactly what their fake twin saved: the method finds no difference
    fixes = card.card_calibration("cpu").saved["llama/" + profile.attn_implementation]
    assert set(fixes) == {"fp32", "bf16", "fp16"} and all(f.is_zero for f in fixes.values())
    assert all(len(f.measured) == 4 for f in fixes.values())
    plain = cached_profile(model, task="causal-lm", timing=("fp32", "bf16", "fp16"))
    assert [b.activations for b in profile.blocks] == [b.activations for b in plain.blocks]


@no_gpu
def test_without_a_gpu_nothing_is_on_the_card():
    assert card.card_spec() is None
    assert not card.on_card(get_device("h100"))
    assert not card.on_card(get_device("h100").model_copy(update={"hardware": "NVIDIA H100"}))


def test_measured_times_are_used_only_on_the_card_they_were_measured_on():
    fit = TimeFit(forward=ShapeFit(per_token=1e-6), backward=ShapeFit(per_token=2e-6))
    times = {kind: {"fp32": fit} for kind in ("embeddings", "layer", "head")}
    profile = make_profile(hidden=64, layers=2, vocab=1000, device="cuda", times=times).model_copy(
        update={"device_name": "NVIDIA H200"})
    h200 = get_device("h200")
    assert is_measured(profile, Knobs(), h200.model_copy(update={"hardware": "NVIDIA H200"}))
    assert not is_measured(profile, Knobs(), h200)  # a spec-sheet H200: not this card
    assert not is_measured(profile, Knobs(), get_device("a100").model_copy(update={"hardware": "NVIDIA A100"}))


def test_vram_auto_is_free_memory_plus_this_process_own(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (10 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 512 * 2**20)
    monkeypatch.setattr(budget, "process_used_bytes", lambda: 2**30)  # NVML: context + pool
    assert parse_budget("auto") == 11 * 2**30
    monkeypatch.setattr(budget, "process_used_bytes", lambda: None)  # no NVML: the pool alone
    assert parse_budget("auto") == 10 * 2**30 + 512 * 2**20


@no_gpu
def test_calibrate_cli_needs_a_gpu_or_a_dry_run():
    runner = CliRunner()
    result = runner.invoke(app, ["calibrate"])
    assert result.exit_code == 1
    assert "no CUDA device is visible" in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["calibrate", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "calibration of cpu" in result.output and "allocator reserve" in result.output
    assert "dry run: not saved" in result.output
    result = runner.invoke(app, ["calibrate", "--dry-run", "--json"])
    assert result.exit_code == 0
    found = Calibration.model_validate(json.loads(result.stdout))
    assert found.hardware == "cpu" and len(found.samples) == 3


def test_card_names_map_to_the_catalog():
    assert card.catalog_key("NVIDIA H100 80GB HBM3") == "h100"
    assert card.catalog_key("NVIDIA H200") == "h200"
    assert card.catalog_key("Tesla T4") == "t4"
    assert card.catalog_key("NVIDIA GeForce RTX 4090") == "rtx4090"
    assert card.catalog_key("NVIDIA B200") == "cuda"  # unknown: the generic card, with its real memory
    assert card.catalog_key("NVIDIA L40S") == "cuda" and card.catalog_key("NVIDIA L4") == "l4"
    assert card.catalog_key("NVIDIA A100-SXM4-40GB") == "a100" and card.catalog_key("NVIDIA A10G") == "a10g"


@no_gpu
def test_a_named_device_is_the_spec_sheet_without_a_gpu():
    from autofit.api import target_device

    assert card.visible_as("h200") is None
    assert target_device("h200") == get_device("h200")


def test_the_visible_card_gets_its_cached_calibration(tmp_path, monkeypatch):
    """card_spec and target_device on a machine that shows an H200 (torch.cuda mocked): the catalog's entry,
    with the card's real memory, its name, and the calibration cached for this card and software stack."""
    from types import SimpleNamespace

    from autofit.api import target_device
    from autofit.calibration import save_calibration
    from autofit.profiler.device import software_stack

    monkeypatch.setenv("AUTOFIT_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: SimpleNamespace(total_memory=150 * 10**9))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert card.card_spec(calibrate=False).calibration is None  # none cached, none measured
    stack = software_stack("cuda")
    assert stack["hardware"] == "NVIDIA H200" and stack["cuda_version"] == "12.8"
    save_calibration(Calibration(**stack, context_bytes=611 * 2**20, workspace_bytes=9 * 2**20,
                                 reserve_fraction=0.02, reserve_bytes=40 * 2**20, created="2026-12-02T12:00:00"))
    spec = card.card_spec()
    assert (spec.name, spec.hardware, spec.memory_bytes) == ("h200", "NVIDIA H200", 150 * 10**9)
    assert (spec.context_bytes, spec.workspace_bytes, spec.allocator_reserve_bytes) == (611 * 2**20, 9 * 2**20, 40 * 2**20)
    assert spec.calibration.startswith("NVIDIA H200, torch ") and card.on_card(spec)
    assert target_device(None) == spec and target_device("h200") == spec  # the named card is the visible one
    assert target_device("a100") == get_device("a100")  # another card: the spec sheet
