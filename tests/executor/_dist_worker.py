"""One process of test_distributed.py's 2-process runs: `torchrun --nproc_per_node 2 _dist_worker.py OUT`.

Runs every case of _dist_cases.py, then the resume and refusal checks, and writes what it saw to
OUT/rank<r>.json (process 0 also writes each case's trained weights to OUT/<case>.pt)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import _dist_cases as cases  # noqa: E402

from autofit.executor import ExecutorInputError, run_plan  # noqa: E402
from autofit.executor import run as executor_run  # noqa: E402
from autofit.executor.output_dir import claim_output_dir  # noqa: E402
from autofit.techniques import checkpointing  # noqa: E402


def train_case(name: str, out: Path, rank: int) -> dict:
    kind, task, _ = cases.CASES[name]
    flags = {n: p.requires_grad for n, p in cases.model(kind, task).named_parameters()}
    model, result, norms = cases.run(name, cases.PROCESSES, output_dir=str(out / "runs" / name))
    trained = result.model
    if rank == 0:
        torch.save({n: p.detach().cpu() for n, p in trained.named_parameters()}, out / f"{name}.pt")
    return dict(
        losses=[r.loss for r in result.history], grad_norms=norms, eval=[(e.loss, e.accuracy) for e in result.eval],
        micro_batches=[r.micro_batches for r in result.history],
        samples=[r.samples for r in result.history], measured=result.measured_peak_bytes,
        rank_peaks=result.rank_peak_bytes, processes=result.processes, rank=result.rank,
        checksum=float(sum(p.detach().double().sum() for p in trained.parameters())),
        flags_restored=cases.CASES[name][2].get("adapter") == "lora"
        or flags == {n: p.requires_grad for n, p in model.named_parameters()},
        forward_restored=not checkpointing.checkpointed_indices(model), adapter_dir=result.adapter_dir,
        adapter_saved=bool(result.adapter_dir) and (Path(result.adapter_dir) / "adapter_config.json").exists(),
        warning=result.memory_warning)


def resume_case(out: Path) -> dict:
    """bert-fsdp with dropout: 4 steps uninterrupted, then killed in step 3 (after the checkpoint of step 2)
    and resumed. Every process's dropout masks must come back."""
    kind, task, _ = cases.CASES["bert-fsdp"]
    settings = dict(lr=cases.LR, quiet=True, max_steps=cases.STEPS, checkpoint_every=2)
    whole = run_plan(cases.model(kind, task, dropout=True), cases.plan("bert-fsdp", cases.PROCESSES),
                     cases.data(task), output_dir=str(out / "runs" / "whole"), **settings)
    output_dir = str(out / "runs" / "resumed")
    original = executor_run._Run.train_step

    def killed(self, step):
        if self.state.step == 2:
            raise RuntimeError("killed")
        return original(self, step)

    executor_run._Run.train_step = killed
    try:
        run_plan(cases.model(kind, task, dropout=True), cases.plan("bert-fsdp", cases.PROCESSES),
                 cases.data(task), output_dir=output_dir, **settings)
    except RuntimeError as error:
        assert str(error) == "killed", error
    finally:
        executor_run._Run.train_step = original
    resumed = run_plan(cases.model(kind, task, dropout=True), cases.plan("bert-fsdp", cases.PROCESSES),
                       cases.data(task), output_dir=output_dir, resume=True, **settings)
    return dict(whole=[r.loss for r in whole.history], resumed=[r.loss for r in resumed.history],
                checkpoints=sorted(os.listdir(output_dir)))


def wrong_world() -> str:
    """A plan for 1 process run by 2: refused in one line."""
    kind, task, _ = cases.CASES["bert-ddp"]
    try:
        run_plan(cases.model(kind, task), cases.plan("bert-ddp", 1), cases.data(task), quiet=True, max_steps=1)
    except ExecutorInputError as error:
        return str(error)
    return "not refused"


def other_seeds(rank: int) -> str:
    """Each process given its own seed: refused on every process, not a hang (FSDP) or wrong steps (DDP)."""
    kind, task, _ = cases.CASES["bert-fsdp"]
    try:
        run_plan(cases.model(kind, task), cases.plan("bert-fsdp", cases.PROCESSES), cases.data(task), quiet=True,
                 max_steps=1, seed=rank)
    except ExecutorInputError as error:
        return str(error)
    return "not refused"


def locked_output_dir(out: Path, rank: int) -> str:
    """An output directory another run holds (process 0 holds it here): refused on every process, not a hang
    of the others at the next collective."""
    kind, task, _ = cases.CASES["bert-ddp"]
    output_dir = out / "runs" / "locked"
    held = claim_output_dir(output_dir) if rank == 0 else None
    try:
        run_plan(cases.model(kind, task), cases.plan("bert-ddp", cases.PROCESSES), cases.data(task), quiet=True,
                 max_steps=1, output_dir=str(output_dir))
    except ValueError as error:
        return str(error).replace(str(output_dir), "OUT")
    finally:
        if held is not None:
            held.release()
    return "not refused"


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    seen: dict = {name: train_case(name, out, rank) for name in cases.CASES}
    seen["resume"] = resume_case(out)
    seen["wrong-world"] = wrong_world()
    seen["other-seeds"] = other_seeds(rank)
    seen["locked"] = locked_output_dir(out, rank)
    (out / f"rank{rank}.json").write_text(json.dumps(seen, indent=1))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
