"""The one device check: memory and step-time predictions against a real GPU, and HF Trainer's speed beside it.

    python -m benchmarks.gpu [--dry-run] [--out DIR] [--models deberta,llama] [--knobs plain,bf16,...]

Two catalog models with random weights, sequence length 512: DeBERTa-v3-base (classification, steps of 32)
and Llama-3.2-1B (causal LM, steps of 8), each trained for a few optimizer steps with fixed knob sets: plain
fp32, all layers checkpointed, bf16, 8-bit AdamW, gradient accumulation (4 micro-batches a step), bf16 with
checkpointing, and on the decoder LoRA (bf16 base) and QLoRA (NF4 base); cells that need bitsandbytes are
skipped with a note where it does not import. For every cell:

  target      autofit.card.card_spec(): the visible GPU's DeviceSpec with its calibration (context, cuBLAS
              workspace, allocator reserve: measured once per card and torch version, then cached);
  profile     autofit.card.card_profile: block times measured on the card, layers' saved bytes corrected for
              its kernels (made once per model, with LoRA fits when an adapter cell runs);
  predicted   autofit.memory.predict_peak: allocated, reserved and peak bytes; autofit.cost.predict_time's
              step seconds;
  measured    autofit.executor.run_plan on a fresh copy of the model: TrainResult.measured_peak_bytes
              (torch.cuda.max_memory_allocated after the first step) and measured_reserved_bytes
              (max_memory_reserved); the median seconds of the steps after the first;
  reference   for the plain and bf16 cells, HF Trainer with Plan.to_training_arguments on the same model and
              data for the same steps, timed the same way (steady-state seconds per step): autofit / HF.

Targets: allocated error median <= 3% and worst <= 8%, no measured reserved peak (+ context) above the card,
Spearman rank correlation of predicted and measured step times >= 0.8. One line per cell as it finishes; a
cell that fails (out of memory, a library error) records its error and the rest go on. Writes
benchmarks/results/gpu_<device>.json (e.g. gpu_nvidia-h200.json). Without a GPU, `--dry-run` runs the same
code on the CPU (dry-run calibration, live-tensor tracker, two-layer models of hidden 64, length 64) into
gpu_dry-run.json: a check that the script works, not of any card (~1.5 min on 2 cores, most of it profiling
the decoder with its LoRA fits; its step times include the tracker's overhead, so its time ranks mean little).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import environment, quiet_libraries, torch_threads, write_result
from benchmarks.accuracy import make_data
from benchmarks._gpu_report import TARGETS, cell_line, report, summarize

MODELS = {"deberta": ("microsoft/deberta-v3-base", "classification"), "llama": ("meta-llama/Llama-3.2-1B", "causal-lm")}
ACCUMULATION = 4
"""Micro-batches per optimizer step of the "accum" knob set."""
KNOB_SETS: dict[str, dict[str, Any]] = {
    "plain": {}, "ckpt": {"checkpoint_layers": "ALL"}, "bf16": {"precision": "bf16"}, "8bit": {"optimizer_bits": 8},
    "accum": {"micro_batches": ACCUMULATION}, "bf16+ckpt": {"precision": "bf16", "checkpoint_layers": "ALL"},
    "lora": {"adapter": "lora", "lora_targets": "all-linear", "precision": "bf16", "base_dtype": "bf16"},
    "qlora": {"adapter": "lora", "lora_targets": "all-linear", "precision": "bf16", "base_dtype": "nf4"},
}
DECODER_ONLY = ("lora", "qlora")
NEEDS_BITSANDBYTES = ("8bit", "qlora")
HF_REFERENCE = ("plain", "bf16")


@dataclass(frozen=True)
class Setup:
    device_type: str
    seq: int
    batch: dict[str, int]
    """Examples per optimizer step, per model."""
    steps: int
    """Optimizer steps per run; the first is left out of every measurement."""
    shrink: bool


GPU = Setup("cuda", 512, {"deberta": 32, "llama": 8}, steps=6, shrink=False)
DRY_RUN = Setup("cpu", 64, {"deberta": 4, "llama": 4}, steps=3, shrink=True)


def shrink(config, hidden: int = 64, heads: int = 4, layers: int = 2, vocab: int = 1000):
    """`config` scaled down to a two-layer toy of the same family: every size equal to the hidden size (the
    pooler's too) becomes `hidden`, the MLP keeps its ratio, grouped-query attention its grouping."""
    old = config.to_dict()
    update = {k: hidden for k, v in old.items() if k.endswith("_size") and v == config.hidden_size}
    update.update(num_hidden_layers=layers, num_attention_heads=heads, vocab_size=vocab,
                  intermediate_size=config.intermediate_size * hidden // config.hidden_size)
    if old.get("num_key_value_heads"):
        update["num_key_value_heads"] = max(1, heads * old["num_key_value_heads"] // config.num_attention_heads)
    if old.get("head_dim"):
        update["head_dim"] = hidden // heads
    for key, value in (("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 0)):
        if isinstance(old.get(key), int) and old[key] >= vocab:
            update[key] = value
    config = copy.deepcopy(config)
    for key, value in update.items():
        setattr(config, key, value)
    return config


def make_knobs(name: str, num_layers: int, step_batch: int):
    from autofit.knobs import Knobs

    spec = dict(KNOB_SETS[name])
    micro = step_batch // spec.pop("micro_batches", 1)
    if spec.pop("checkpoint_layers", None) == "ALL":
        spec["checkpoint_layers"] = tuple(range(num_layers))
    return Knobs(micro_batch_size=micro, pad_to_multiple_of=8, **spec)


def skip_reason(name: str) -> str | None:
    if name in NEEDS_BITSANDBYTES:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as error:  # noqa: BLE001 - not installed, or no kernels for this platform
            return f"bitsandbytes is not importable ({type(error).__name__}: {error})"
    return None


def release(cuda: bool) -> None:
    gc.collect()
    if cuda:
        import torch
        torch.cuda.empty_cache()


@dataclass
class ModelRun:
    """One model on the target: what every cell of it shares."""

    name: str
    task: str
    config: Any
    setup: Setup
    spec: Any
    budget: int
    profile: Any = None
    base_plan: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.setup.batch[self.name]

    def fresh_model(self, device: str | None = None):
        import torch

        from autofit.models import build_model

        torch.manual_seed(0)
        return build_model(self.config, self.task, device=device or self.setup.device_type)

    def data(self):
        return make_data(self.task, self.setup.seq, self.batch * self.setup.steps, vocab=self.config.vocab_size)


def prepare(name: str, setup: Setup, spec, budget: int, knob_names: list[str], log) -> ModelRun:
    """Resolve, profile on the target and make the base plan of model `name`."""
    from autofit.api import make_workload, plan_from_profile
    from autofit.card import card_profile
    from autofit.models import resolve_config

    model_id, task = MODELS[name]
    config = resolve_config(model_id)[1]
    run = ModelRun(name, task, shrink(config) if setup.shrink else config, setup, spec, budget)
    started = time.perf_counter()
    run.profile = card_profile(run.config, task, spec, adapters=any(k in DECODER_ONLY for k in knob_names),
                               device_type=setup.device_type)
    seq, batch = setup.seq, run.batch
    workload = make_workload(task, seq_len=seq, batch_size=batch, lengths=[seq] * (batch * setup.steps))
    run.base_plan = plan_from_profile(run.profile, workload, budget, spec, n_trials=20)
    run.info = {"model_id": model_id, "task": task, "params": run.profile.num_params,
                "layers": run.profile.num_layers, "attention": run.profile.attn_implementation,
                "step_batch": batch, "seq": seq, "profile_seconds": round(time.perf_counter() - started, 1)}
    log(f"# {name}: {run.profile.num_params:,} params, {run.profile.num_layers} layers, "
        f"{run.profile.attn_implementation} attention, profiled and planned in {run.info['profile_seconds']}s")
    return run


def measure_cell(run: ModelRun, name: str) -> dict[str, Any]:
    """Predict, then train `name`'s knobs for the setup's steps; the HF reference too for HF_REFERENCE."""
    from autofit.api import make_workload
    from autofit.cost import predict_time
    from autofit.executor import run_plan
    from autofit.memory import predict_peak

    setup, batch = run.setup, run.batch
    knobs = make_knobs(name, run.profile.num_layers, batch)
    workload = make_workload(run.task, seq_len=setup.seq, batch_size=batch, lengths=[setup.seq] * (batch * setup.steps))
    memory = predict_peak(run.profile, knobs, workload, run.spec)
    timing = predict_time(run.profile, knobs, workload, run.spec)
    plan = run.base_plan.model_copy(update={"knobs": knobs, "predicted": memory, "workload": workload, "time": timing})
    # built on the card (fast), except under an adapter: its fp32 weights would leave the blocks of the ones the
    # base replaces in the allocator's cache, as no user's model does (loaded on the CPU, cast before it moves)
    model = run.fresh_model("cpu" if knobs.adapter == "lora" else None)
    result = run_plan(model, plan, run.data(), max_steps=setup.steps, quiet=True)
    if result.fallbacks:
        raise RuntimeError(f"the run fell back: {result.fallbacks[0].summary}")
    measured = result.measured_peak_bytes
    reserved = result.measured_reserved_bytes or measured  # the CPU has no allocator cache: reserved = allocated
    cell = {"model": run.name, "knobs": name, "micro_batch": knobs.micro_batch_size, "step_batch": batch,
            "knob_values": knobs.model_dump(mode="json"), "breakdown": memory.model_dump(mode="json"),
            "predicted_allocated_bytes": memory.allocated_bytes, "measured_allocated_bytes": measured,
            "allocated_error": (memory.allocated_bytes - measured) / measured,
            "predicted_reserved_bytes": memory.reserved_bytes, "measured_reserved_bytes": reserved,
            "reserved_error": (memory.reserved_bytes - reserved) / reserved,
            "predicted_peak_bytes": memory.peak_bytes, "context_bytes": run.spec.context_bytes,
            "over_budget": reserved + run.spec.context_bytes > run.budget, "memory_warning": result.memory_warning,
            "predicted_step_seconds": timing.step_seconds, "time_measured": timing.measured,
            "measured_step_seconds": statistics.median(r.seconds for r in result.history[1:]),
            "step_seconds": [round(r.seconds, 4) for r in result.history]}
    del result, model
    release(setup.device_type == "cuda")
    if name in HF_REFERENCE:
        try:
            cell["hf_step_seconds"] = hf_step_seconds(run, plan)
            cell["autofit_over_hf"] = cell["measured_step_seconds"] / cell["hf_step_seconds"]
        except Exception as error:  # noqa: BLE001 - the reference failing loses no measurement of autofit's
            cell["hf_error"] = f"{type(error).__name__}: {error}"[:2000]
    return cell


def hf_step_seconds(run: ModelRun, plan) -> float:
    """Median seconds per optimizer step after the first of HF Trainer training the same model and data with
    the plan's TrainingArguments (between consecutive step ends, the device synchronised)."""
    import torch
    from transformers import PrinterCallback, Trainer, TrainerCallback

    cuda = run.setup.device_type == "cuda"

    class StepEnds(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    data, timer = run.data(), StepEnds()
    ones = torch.ones(run.setup.seq, dtype=torch.long)
    rows = [{"input_ids": torch.tensor(ids), "attention_mask": ones,
             "labels": torch.tensor(data.labels[i] if data.labels else ids)} for i, ids in enumerate(data.input_ids)]
    with tempfile.TemporaryDirectory() as out:
        args = plan.to_training_arguments(output_dir=out, max_steps=run.setup.steps, learning_rate=2e-5,
                                          weight_decay=0.01, logging_strategy="no", save_strategy="no",
                                          disable_tqdm=True, seed=0)
        trainer = Trainer(model=run.fresh_model(), args=args, train_dataset=rows, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # it prints the run's metrics dict
        trainer.train()
    del trainer
    release(cuda)
    return statistics.median(b - a for a, b in zip(timer.ends, timer.ends[1:]))


def run_all(setup: Setup, spec, budget: int, model_names: list[str], knob_names: list[str], log=print,
            progress=lambda models, cells: None):
    """(models' info, cells): every knob set of every model, failures recorded, not raised; `progress` sees
    both after every cell."""
    models, cells = {}, []
    for name in model_names:
        todo = [k for k in knob_names if k not in DECODER_ONLY or MODELS[name][1] == "causal-lm"]
        try:
            run = prepare(name, setup, spec, budget, todo, log)
            models[name] = run.info
            release(setup.device_type == "cuda")  # what profiling left in the allocator's cache
        except Exception as error:  # noqa: BLE001 - recorded: the other model still runs
            models[name] = {"error": f"{type(error).__name__}: {error}"}
            cells += [{"model": name, "knobs": k, "error": f"profiling failed: {models[name]['error']}"} for k in todo]
            log(f"# {name}: profiling failed: {models[name]['error']}")
            continue
        for knob in todo:
            reason = skip_reason(knob)
            started = time.perf_counter()
            try:
                cell = {"model": name, "knobs": knob, "skipped": reason} if reason else measure_cell(run, knob)
            except Exception as error:  # noqa: BLE001 - an OOM or library error: recorded, the rest go on
                cell = {"model": name, "knobs": knob, "error": f"{type(error).__name__}: {error}"[:2000]}
            release(setup.device_type == "cuda")  # out here: the traceback no longer holds the failed run
            cell["seconds"] = round(time.perf_counter() - started, 1)
            cells.append(cell)
            log(cell_line(cell))
            progress(models, cells)
    return models, cells


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def target(dry_run: bool):
    """(setup, spec, budget, device name) of the visible GPU, or of the CPU dry run."""
    if dry_run:
        import os

        from autofit.card import dry_run_spec
        return DRY_RUN, dry_run_spec(), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "dry-run"
    from autofit.card import card_spec
    spec = card_spec()
    return GPU, spec, spec.memory_bytes, spec.hardware


def device_info(setup: Setup, spec, budget: int, name: str) -> dict[str, Any]:
    import torch

    from autofit.card import card_calibration

    found = card_calibration(setup.device_type, measure=False)
    return {"name": name, "torch": torch.__version__, "cuda": torch.version.cuda, "budget_bytes": budget,
            "spec": spec.model_dump(mode="json"), "calibration_stamp": spec.calibration,
            "calibration": found.model_dump(mode="json") if found is not None else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU with toy models")
    parser.add_argument("--out", help="folder for the JSON result (default benchmarks/results)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    parser.add_argument("--knobs", default=",".join(KNOB_SETS), help=f"subset of {','.join(KNOB_SETS)}")
    args = parser.parse_args(argv)
    models, knobs = args.models.split(","), args.knobs.split(",")
    unknown = sorted(set(models) - set(MODELS)) + sorted(set(knobs) - set(KNOB_SETS))
    if unknown:
        parser.error(f"unknown model or knob set: {', '.join(unknown)}")
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA device is visible; run it on a GPU, or pass --dry-run to check the script")
        return 1
    quiet_libraries()
    started = time.perf_counter()
    setup, spec, budget, name = target(args.dry_run)
    head = {"benchmark": "gpu", "mode": "dry-run" if args.dry_run else "cuda", **environment(),
            "setup": {"seq": setup.seq, "step_batch": setup.batch, "steps": setup.steps, "hf_reference":
                      list(HF_REFERENCE), "knob_sets": {k: KNOB_SETS[k] for k in knobs}, "targets": TARGETS}}

    def save(info, cells, complete=False) -> Path:  # after every cell: a run cut short keeps what it measured
        payload = {**head, "device": device_info(setup, spec, budget, name), "complete": complete,
                   "seconds": round(time.perf_counter() - started, 1), "models": info, "cells": cells,
                   "summary": summarize(cells)}
        return write(args.out, f"gpu_{slug(name)}", payload)

    with torch_threads(1 if args.dry_run else torch.get_num_threads()):
        info, cells = run_all(setup, spec, budget, models, knobs, log=partial(print, flush=True), progress=save)
    path = save(info, cells, complete=True)
    summary = summarize(cells)
    print("\n" + report(cells, summary))
    print(f"\n{summary['ran']} of {len(cells)} cells ran in {time.perf_counter() - started:.0f}s; wrote {path}")
    return 0


def write(out: str | None, name: str, payload: dict[str, Any]) -> Path:
    if out is None:
        return write_result(name, payload)
    path = Path(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
