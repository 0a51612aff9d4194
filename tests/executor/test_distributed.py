"""run_plan on 2 processes (torchrun, gloo on the CPU) under FSDP2 and DDP: the same losses and weights as one
process training the same effective batch, each process's peak, an exact resume, the refusals.

One torchrun launch (_dist_worker.py) runs every 2-process case; the tests here compare what it wrote with
1-process references run in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import _dist_cases as cases
import pytest
import torch
from _dist import free_port

import autofit
from autofit.executor import ExecutorInputError, run_plan
from autofit.executor.distributed import World, share_step
from autofit.knobs import Knobs
from autofit.plan import Plan, PlanFileError
from autofit.techniques.accumulation import StepSampler, bucket_uppers
from autofit.techniques.loss_weighting import count_units
from autofit.techniques.padding import PaddingCollator

HERE = Path(__file__).parent
WORKER = HERE / "_dist_worker.py"
LAUNCH_SECONDS = 300


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """(what each of the 2 processes saw, the folder with process 0's trained weights)."""
    out = tmp_path_factory.mktemp("two-processes")
    paths = [str(Path(autofit.__file__).parents[1]), str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cases.PROCESSES),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_SECONDS)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(cases.PROCESSES)], out


@pytest.fixture(scope="module")
def references():
    """Each case trained by one process with the same knobs and effective batch: (losses, gradient norms,
    evaluation, final weights)."""
    found = {}
    for name in cases.CASES:
        _, result, norms = cases.run(name, 1)
        found[name] = ([r.loss for r in result.history], norms, [(e.loss, e.accuracy) for e in result.eval],
                       {n: p.detach().clone() for n, p in result.model.named_parameters()})
    return found


pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("case", list(cases.CASES))
def test_two_processes_train_exactly_like_one(launched, references, case):
    """Same losses (the whole step's mean), gradient norms, evaluation and trained weights, gathered whole on
    every process."""
    seen, out = launched
    losses, norms, evaluation, weights = references[case]
    for rank in seen:
        assert rank[case]["losses"] == pytest.approx(losses, rel=1e-4)
        assert rank[case]["grad_norms"] == pytest.approx(norms, rel=1e-4)  # the gradients' scale, not only Adam's
        assert [loss for loss, _ in rank[case]["eval"]] == pytest.approx([loss for loss, _ in evaluation], rel=1e-4)
        assert [accuracy for _, accuracy in rank[case]["eval"]] == [accuracy for _, accuracy in evaluation]
        assert len(rank[case]["eval"]) == (len(losses) == cases.STEPS)
        assert rank[case]["samples"] == ([4, 4, 4, 1] if len(losses) == 4 else [4, 4])
        assert rank[case]["flags_restored"] and rank[case]["forward_restored"]
    assert seen[0][case]["checksum"] == seen[1][case]["checksum"]  # every process holds the same model
    trained = torch.load(out / f"{case}.pt")
    assert trained.keys() == weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(trained[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    moved = [name for name, tensor in weights.items() if not torch.equal(tensor, cases_initial(case)[name])]
    assert moved, "nothing trained"


def cases_initial(case: str) -> dict[str, torch.Tensor]:
    kind, task, knobs = cases.CASES[case]
    model = cases.model(kind, task)
    if knobs.get("adapter") == "lora":  # the reference's names: peft's wrapper, adapters as initialised
        from accelerate.utils import set_seed

        from autofit.techniques import lora
        set_seed(0)
        model = lora.apply(model, rank=knobs["lora_rank"], targets="attention", task=task)
    return {n: p.detach() for n, p in model.named_parameters()}


def test_the_data_runs_zero_weight_passes():
    """The cases' steps really make the processes' micro-batch counts differ, and the epoch's last step leaves
    one process without an example: both run zero-weight passes, whose weights add up to the whole step."""
    _, task, knobs = cases.CASES["bert-fsdp"]
    data = cases.data(task)
    plan = cases.plan("bert-fsdp", 2)
    collate = PaddingCollator(0, plan.knobs.pad_to_multiple_of, task=task)
    units = lambda i: count_units(collate([data.example(i)]), task)  # noqa: E731
    uppers, exact = bucket_uppers(data.lengths, plan.knobs)
    uneven = empty = 0
    for step in StepSampler(len(data), cases.BATCH).epoch_steps(0):
        shares = [share_step(step, data.lengths, units, plan.knobs, uppers, exact, World(rank=r, size=2))
                  for r in range(2)]
        assert len({len(s.pieces) for s in shares}) == 1
        assert sum(w for s in shares for w in s.weights) == pytest.approx(1.0)
        assert all(w == 0 for s in shares for w in s.weights[len(s.pieces) - s.padding:])
        uneven += any(s.padding and s.padding < len(s.pieces) for s in shares)
        empty += any(s.padding == len(s.pieces) for s in shares)
    assert uneven and empty


def test_each_process_measures_its_peak(launched):
    seen, _ = launched
    for name in cases.CASES:
        peaks = seen[0][name]["rank_peaks"]
        assert len(peaks) == 2 and all(p > 0 for p in peaks)
        assert seen[1][name]["rank_peaks"] == peaks
        assert seen[0][name]["measured"] == max(peaks)
        assert seen[0][name]["processes"] == 2 and [r[name]["rank"] for r in seen] == [0, 1]
    for model in ("bert", "llama"):  # shards, not replicas, of weights, gradients and optimizer state
        assert seen[0][f"{model}-fsdp"]["measured"] < seen[0][f"{model}-ddp"]["measured"]


def test_resume_after_a_kill_is_exact_under_fsdp(launched):
    """Killed in step 3 with dropout on, resumed from step 2's checkpoint: every loss as uninterrupted."""
    seen, _ = launched
    for rank in seen:
        assert len(rank["resume"]["whole"]) == cases.STEPS
        assert rank["resume"]["resumed"] == rank["resume"]["whole"]
    assert seen[0]["resume"]["whole"] != seen[0]["bert-fsdp"]["losses"]  # dropout was on


def test_lora_adapters_are_saved_once(launched):
    seen, _ = launched
    for case in ("lora-fsdp", "lora-ddp"):
        assert all(rank[case]["adapter_saved"] for rank in seen)


def test_a_plan_for_one_process_run_by_two_is_refused(launched):
    seen, _ = launched
    assert seen[0]["wrong-world"] == ("this plan is for 1 process and 2 are running: launch it without torchrun, "
                                      "or plan again for 2 processes")


def test_processes_given_other_seeds_are_all_refused_in_one_line(launched):
    seen, _ = launched
    assert [rank["other-seeds"] for rank in seen] == [
        "the 2 processes were given different plan or settings (seed, lr, ...): every process must call train "
        "with the same model, data and settings"] * 2


def test_an_output_dir_another_run_holds_is_refused_on_every_process(launched):
    seen, _ = launched
    held = [rank["locked"] for rank in seen]
    assert len(set(held)) == 1 and held[0].startswith("another autofit run (process "), held
    assert held[0].endswith("is training into OUT: wait for it to finish, or pick another --output-dir")


# ---- refusals in this process -------------------------------------------------------------------------------


def test_a_plan_for_two_processes_run_by_one_is_refused():
    kind, task, _ = cases.CASES["bert-fsdp"]
    model = cases.model(kind, task)
    with pytest.raises(ExecutorInputError) as error:
        run_plan(model, cases.plan("bert-fsdp", 2, model), cases.data(task), quiet=True, max_steps=1)
    assert str(error.value) == ("this plan is for 2 processes and 1 is running: launch it with torchrun "
                                "--nproc_per_node 2 (or accelerate launch --num_processes 2)")


def test_8bit_adamw_with_fsdp_is_refused(tmp_path):
    with pytest.raises(ValueError, match="8-bit AdamW does not step FSDP's sharded"):
        Knobs(strategy="fsdp", optimizer_bits=8)
    plan = cases.plan("bert-fsdp", 2)
    document = json.loads(plan.to_json())
    document["knobs"]["optimizer_bits"] = 8
    (tmp_path / "plan.json").write_text(json.dumps(document))
    with pytest.raises(PlanFileError, match="8-bit AdamW"):
        Plan.load(tmp_path / "plan.json")


def test_fsdp_refuses_a_half_precision_base_under_lora():
    """FSDP2 gathers a unit in one dtype: the knobs refuse a bf16 base with fp32 adapters, and the executor
    refuses such a plan made around them (a file edited by hand) in one line."""
    from _tiny import make_plan

    with pytest.raises(ValueError, match="a bf16 base with fp32 adapters does not shard"):
        Knobs(strategy="fsdp", adapter="lora", base_dtype="bf16", precision="bf16")
    kind, task, _ = cases.CASES["lora-fsdp"]
    model = cases.model(kind, task)
    plan = make_plan(model, task, cases.data(task), batch_size=4, adapter="lora", base_dtype="bf16", precision="bf16")
    knobs = Knobs.model_construct(**{**plan.knobs.model_dump(), "strategy": "fsdp"})  # past the knobs' check
    plan = plan.model_copy(update={"knobs": knobs, "cluster": plan.cluster.model_copy(update={"processes": 2})})
    with pytest.raises(ExecutorInputError, match="FSDP cannot shard a bf16 base with fp32 adapters"):
        run_plan(model, plan, cases.data(task), quiet=True, max_steps=1)
