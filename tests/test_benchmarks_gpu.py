"""benchmarks/gpu.py, the device check: its --dry-run on the CPU (the same code, CUDA calls skipped, toy
versions of the two catalog models), its refusal without a GPU, and one small real cell where CUDA is."""

import json

import pytest
import torch

from autofit.models import resolve_config
from benchmarks import gpu
from benchmarks._common import spearman

def dry_run(tmp_path, *args: str) -> dict:
    assert gpu.main(["--dry-run", "--out", str(tmp_path), *args]) == 0
    return json.loads((tmp_path / "gpu_dry-run.json").read_text())


def check_cells(result: dict, expected: list[tuple[str, str]]) -> list[dict]:
    """Every expected cell is there and ran, or was skipped with a reason; the ones that ran, measured."""
    cells = result["cells"]
    assert [(c["model"], c["knobs"]) for c in cells] == expected
    assert not [c["error"] for c in cells if c.get("error")]
    ran = [c for c in cells if not c.get("skipped")]
    assert all(isinstance(c["skipped"], str) and c["skipped"] for c in cells if c.get("skipped"))
    for c in ran:
        assert c["measured_allocated_bytes"] > 0 and c["predicted_allocated_bytes"] > 0
        assert c["predicted_reserved_bytes"] >= c["predicted_allocated_bytes"]
        # the CPU has no allocator cache: reserved is what was allocated, and no context sits beside it
        assert c["measured_reserved_bytes"] == c["measured_allocated_bytes"] and not c["over_budget"]
        assert c["measured_step_seconds"] > 0 and c["predicted_step_seconds"] > 0
        assert len(c["step_seconds"]) == gpu.DRY_RUN.steps
        assert abs(c["allocated_error"]) < 0.05, c  # CPU dry run: 1.7% at worst (deberta, 4 micro-batches)
    return ran


@pytest.mark.slow  # ~95 s on 2 cores, most of it profiling the decoder with its LoRA fits
def test_dry_run_of_every_cell_predicts_the_cpu_peaks_and_times_hf(tmp_path):
    result = dry_run(tmp_path)  # the script's defaults: both models, every knob set
    expected = [(m, k) for m in gpu.MODELS for k in gpu.KNOB_SETS if k not in gpu.DECODER_ONLY or m == "llama"]
    ran = check_cells(result, expected)
    fp32 = [c for c in ran if c["knob_values"]["precision"] == "fp32"]
    assert len(fp32) >= 6 and all(abs(c["allocated_error"]) < 0.05 for c in fp32)
    by = {(c["model"], c["knobs"]): c for c in ran}
    for model in gpu.MODELS:  # the HF Trainer reference trained on the CPU too (the plan's device)
        for knobs in gpu.HF_REFERENCE:
            cell = by[model, knobs]
            assert cell["hf_step_seconds"] > 0 and cell["autofit_over_hf"] > 0
        # checkpointing every layer saves memory; accumulation splits the step into 4 micro-batches
        assert by[model, "ckpt"]["measured_allocated_bytes"] < by[model, "plain"]["measured_allocated_bytes"]
        assert by[model, "accum"]["micro_batch"] * gpu.ACCUMULATION == gpu.DRY_RUN.batch[model]
    adapters = [by.get(("llama", k)) for k in gpu.DECODER_ONLY]
    assert [c["knob_values"]["base_dtype"] for c in adapters if c] == ["bf16", "nf4"][:len([c for c in adapters if c])]
    s = result["summary"]
    assert s["ran"] == len(ran) and s["failed"] == [] and s["hf_failed"] == []
    assert 0 <= s["allocated_median_abs_pct"] <= s["allocated_max_abs_pct"] < 5
    assert s["over_budget"] == [] and s["autofit_over_hf_median"] > 0
    assert set(s["targets"]) >= {"reserved + context within the card"} and len(s["targets"]) == 4
    assert s["targets"]["reserved + context within the card"] is True
    assert result["complete"] is True  # (written after every cell too, "complete": false until the end)
    assert result["device"]["name"] == "dry-run" and result["device"]["calibration"]["hardware"] == "cpu"
    assert result["models"]["llama"]["layers"] == 2 and result["setup"]["seq"] == gpu.DRY_RUN.seq


def test_without_cuda_it_says_so_in_one_line_and_exits_1(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert gpu.main(["--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA device" in out and "--dry-run" in out
    assert not list(tmp_path.iterdir())


def test_shrink_keeps_the_family_and_its_proportions():
    llama = gpu.shrink(resolve_config("meta-llama/Llama-3.2-1B")[1])
    assert (llama.num_hidden_layers, llama.hidden_size, llama.head_dim, llama.vocab_size) == (2, 64, 16, 1000)
    assert llama.intermediate_size == 4 * 64 and llama.num_key_value_heads == 1  # 32 heads / 8 kv heads: 4 / 1
    assert max(llama.bos_token_id, llama.eos_token_id) < 1000
    deberta = gpu.shrink(resolve_config("microsoft/deberta-v3-base")[1])
    assert deberta.pooler_hidden_size == deberta.hidden_size == 64 and deberta.relative_attention


def test_spearman_ranks_ties_together():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert spearman([1, 1, 2], [5, 5, 9]) == 1.0
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    assert gpu.slug("NVIDIA H200") == "nvidia-h200"
    assert gpu.slug("NVIDIA GeForce RTX 4090 (x)") == "nvidia-geforce-rtx-4090-x"


def test_failed_and_skipped_cells_are_reported_not_lost():
    ok = {"model": "llama", "knobs": "plain", "micro_batch": 8, "measured_allocated_bytes": 100 * 2**20,
          "predicted_allocated_bytes": 104 * 2**20, "allocated_error": 0.04, "measured_reserved_bytes": 120 * 2**20,
          "reserved_error": -0.01, "over_budget": False, "measured_step_seconds": 0.5, "predicted_step_seconds": 0.4,
          "hf_error": "ValueError: no", "seconds": 3.0}
    failed = {"model": "llama", "knobs": "bf16", "error": "OutOfMemoryError: CUDA out of memory", "seconds": 1.0}
    skipped = {"model": "llama", "knobs": "qlora", "skipped": "bitsandbytes is not importable (x)", "seconds": 0.0}
    s = gpu.summarize([ok, failed, skipped])
    assert (s["cells"], s["ran"], s["allocated_max_abs_pct"], s["time_spearman"]) == (3, 1, 4.0, None)
    assert s["failed"] == ["llama/bf16: OutOfMemoryError: CUDA out of memory"] and len(s["skipped"]) == 1
    assert s["hf_failed"] == ["llama/plain: ValueError: no"] and s["reserved_under_predicted"] == ["llama/plain"]
    assert list(s["targets"].values()) == [False, True, True, False]  # 4% > 3% median; no time ranks of 1 cell
    text = gpu.report([ok, failed, skipped], s)
    assert "FAILED: OutOfMemoryError" in text and "skipped: bitsandbytes" in text and "| FAIL |" in text
    assert "hf FAILED" in gpu.cell_line(ok) and "FAILED: OutOfMemoryError" in gpu.cell_line(failed)
    assert gpu.summarize([failed])["targets"] == dict.fromkeys(s["targets"], False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_small_cell_on_the_card():
    from autofit.card import card_spec

    spec = card_spec()
    setup = gpu.Setup("cuda", 128, {"llama": 4}, steps=3, shrink=True)
    models, cells = gpu.run_all(setup, spec, spec.memory_bytes, ["llama"], ["plain"], log=lambda line: None)
    (cell,) = cells
    assert "error" not in cell, cell
    assert models["llama"]["layers"] == 2 and cell["time_measured"]
    assert cell["measured_reserved_bytes"] >= cell["measured_allocated_bytes"] > 0
    assert cell["context_bytes"] == spec.context_bytes > 0 and not cell["over_budget"]
    # the plumbing (the accuracy is the benchmark's): a toy's few MB beside the card's cuBLAS workspace
    assert abs(cell["allocated_error"]) < 0.5 and cell["hf_step_seconds"] > 0
