"""Checkpoints and resume: a run stopped after k steps and resumed ends exactly where an uninterrupted
run ends (fp32 on the CPU: bit-identical weights and losses), and a bad resume is refused up front."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from autofit.executor import ExecutorInputError, TrainingInterruptedError, latest_checkpoint, run_plan
from autofit.executor import checkpoint as ckpt
from autofit.executor.checkpoint import FILES, list_checkpoints
from autofit.knobs import Precision

LR = 3e-3
N, EPOCHS = 12, 2  # steps of 4 examples in micro-batches of 2: 3 steps per epoch, 6 steps in all


class Killed(Exception):
    """Stands in for the process dying in the middle of a step."""


def setup(tiny, data, plan_for, *, seed=0, precision=Precision.fp32):
    # Dropout on: a resumed run must also restore the random generators to match.
    model = tiny(seed=seed, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    train = data(N)
    plan = plan_for(model, data=train, batch_size=4, micro_batch_size=2, precision=precision)
    return model, plan, train


def run(model, plan, train, **kwargs):
    kwargs = {"epochs": EPOCHS, "lr": LR, "quiet": True, "measure_memory": False, **kwargs}
    return run_plan(model, plan, train, **kwargs)


def assert_same_run(model, result, ref_model, ref):
    assert result.optimizer_steps == ref.optimizer_steps == N // 4 * EPOCHS
    assert [r.step for r in result.history] == list(range(1, ref.optimizer_steps + 1))
    assert [(r.epoch, r.loss, r.samples) for r in result.history] == [(r.epoch, r.loss, r.samples) for r in ref.history]
    assert result.epochs_completed == EPOCHS
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("stop_after", [1, 3, 4])  # inside epoch 0, at the epoch boundary, inside epoch 1
def test_stopped_and_resumed_run_equals_an_uninterrupted_one(tiny, data, plan_for, tmp_path, stop_after, caplog):
    ref_model, plan, train = setup(tiny, data, plan_for)
    ref = run(ref_model, plan, train)

    model, plan, train = setup(tiny, data, plan_for)
    first = run(model, plan, train, max_steps=stop_after, output_dir=str(tmp_path), checkpoint_every=2)
    assert first.optimizer_steps == stop_after
    assert Path(first.output_dir) == latest_checkpoint(tmp_path) == tmp_path / f"checkpoint-{stop_after:08d}"

    # A fresh process: another model object with other initial weights, loaded from the checkpoint.
    resumed_model, plan, train = setup(tiny, data, plan_for, seed=1)
    with caplog.at_level("INFO", logger="autofit"):
        result = run(resumed_model, plan, train, output_dir=str(tmp_path), checkpoint_every=2, resume=True)
    assert_same_run(resumed_model, result, ref_model, ref)
    epoch, position = divmod(stop_after, 3)
    where = f"{position} of its steps done" if position else "at its start"
    steps = f"{stop_after} optimizer step{'s' * (stop_after != 1)}"
    assert (f"resuming from {tmp_path / f'checkpoint-{stop_after:08d}'}: {steps} done; "
            f"epoch {epoch + 1} goes on {where}") in caplog.text
    assert Path(result.output_dir) == tmp_path / "checkpoint-00000006"


@pytest.mark.parametrize("every", [2, 3])  # 3: the checkpoint ends epoch 0 but precedes its evaluation
def test_killed_mid_step_resumes_from_the_last_periodic_checkpoint(tiny, data, plan_for, tmp_path, every, caplog):
    ref_model, plan, train = setup(tiny, data, plan_for)
    ref = run(ref_model, plan, train, eval=train)

    model, plan, train = setup(tiny, data, plan_for)
    forward, calls = model.forward, []

    def dies_in_step_6(*args, **kwargs):
        calls.append(model.training)  # evaluation calls forward too
        if calls.count(True) == 11:  # the first micro-batch of the 6th step
            raise Killed
        return forward(*args, **kwargs)

    model.forward = dies_in_step_6
    with pytest.raises(Killed):
        run(model, plan, train, eval=train, output_dir=str(tmp_path), checkpoint_every=every)
    last = 5 // every * every
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"checkpoint-{last:08d}"]  # older ones removed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written checkpoint
    saved = json.loads((tmp_path / f"checkpoint-{last:08d}" / "trainer_state.json").read_text())
    assert len(saved["eval"]) == (1 if every == 2 else 0)

    resumed_model, plan, train = setup(tiny, data, plan_for, seed=1)
    with caplog.at_level("INFO", logger="autofit"):
        result = run(resumed_model, plan, train, eval=train, output_dir=str(tmp_path), checkpoint_every=every,
                     resume=True)
    assert_same_run(resumed_model, result, ref_model, ref)
    assert [e.model_dump() for e in result.eval] == [e.model_dump() for e in ref.eval]
    # 3 steps an epoch: checkpoint 3 closes epoch 1 (its evaluation still to run), checkpoint 4 is inside epoch 2
    assert f"{last} optimizer steps done; epoch 2 goes on {'at its start' if every == 3 else '1 of its steps done'}" \
        in caplog.text
    assert [e.epoch for e in result.eval] == [0, 1]


def test_fp16_resume_restores_the_grad_scaler(tiny, data, plan_for, tmp_path):
    ref_model, plan, train = setup(tiny, data, plan_for, precision=Precision.fp16)
    ref = run(ref_model, plan, train, output_dir=str(tmp_path / "ref"))
    model, plan, train = setup(tiny, data, plan_for, precision=Precision.fp16)
    run(model, plan, train, max_steps=2, output_dir=str(tmp_path / "run"))
    resumed_model, plan, train = setup(tiny, data, plan_for, seed=1, precision=Precision.fp16)
    result = run(resumed_model, plan, train, output_dir=str(tmp_path / "run"), resume=True)
    assert_same_run(resumed_model, result, ref_model, ref)
    assert [r.skipped for r in result.history] == [r.skipped for r in ref.history]
    # The scaler's state goes on too (its growth counter, not only its scale).
    ref_scaler, scaler = (torch.load(latest_checkpoint(tmp_path / name) / "scaler.pt", weights_only=True)
                          for name in ("ref", "run"))
    assert ref_scaler["scale"] > 1 and ref_scaler["_growth_tracker"] == sum(not r.skipped for r in ref.history) > 0
    assert scaler == ref_scaler


def test_resume_keeps_the_fallback_plan(tiny, data, plan_for, tmp_path):
    """OOM in step 2 halves the micro-batch; the checkpoint carries that plan, so the resumed run goes on
    with it (and the examples of each step stay those of the original steps)."""

    def with_oom(model):
        forward, calls = model.forward, []

        def forward_oom_once(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3 and len(kwargs["input_ids"]) == 2:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return forward(*args, **kwargs)

        model.forward = forward_oom_once
        return model

    ref_model, plan, train = setup(tiny, data, plan_for)
    ref = run(with_oom(ref_model), plan, train)
    assert len(ref.fallbacks) == 1 and ref.plan.knobs.micro_batch_size == 1

    model, plan, train = setup(tiny, data, plan_for)
    run(with_oom(model), plan, train, max_steps=3, output_dir=str(tmp_path))
    saved = json.loads((latest_checkpoint(tmp_path) / "plan.json").read_text())
    assert saved["knobs"]["micro_batch_size"] == 1

    resumed_model, plan, train = setup(tiny, data, plan_for, seed=1)
    sizes = []
    forward = resumed_model.forward
    resumed_model.forward = lambda *a, **k: sizes.append(len(k["input_ids"])) or forward(*a, **k)
    result = run(resumed_model, plan, train, output_dir=str(tmp_path), resume=True)
    assert set(sizes) == {1} and len(sizes) == 3 * 4
    assert result.plan.knobs == ref.plan.knobs
    assert [f.model_dump() for f in result.fallbacks] == [f.model_dump() for f in ref.fallbacks]
    assert_same_run(resumed_model, result, ref_model, ref)


def test_checkpoint_every_keeps_only_the_newest_complete_checkpoint(tiny, data, plan_for, tmp_path, monkeypatch):
    model, plan, train = setup(tiny, data, plan_for)
    saved, real = [], ckpt.save_checkpoint

    def spy(output_dir, **kwargs):
        saved.append(kwargs["state"].step)
        return real(output_dir, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", spy)
    result = run(model, plan, train, output_dir=str(tmp_path), checkpoint_every=4)
    assert saved == [4, 6]  # every 4 steps, and at the end
    newest, = list_checkpoints(tmp_path)
    assert newest.name == "checkpoint-00000006" and Path(result.output_dir) == newest
    assert all((newest / name).is_file() for name in FILES)
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["step"] == 6 and len(state["history"]) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000006"]


def test_resuming_a_finished_run_trains_nothing_more(tiny, data, plan_for, tmp_path):
    model, plan, train = setup(tiny, data, plan_for)
    done = run(model, plan, train, output_dir=str(tmp_path))
    again_model, plan, train = setup(tiny, data, plan_for, seed=1)
    again = run(again_model, plan, train, output_dir=str(tmp_path), resume=True)
    assert again.optimizer_steps == done.optimizer_steps == 6 and len(again.history) == 6
    for p, q in zip(again_model.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_resume_without_a_checkpoint_starts_fresh(tiny, data, plan_for, tmp_path):
    """Resume-if-present, as the HF Trainer's and Lightning's users expect: a first run with resume works."""
    ref_model, plan, train = setup(tiny, data, plan_for)
    ref = run(ref_model, plan, train)
    model, plan, train = setup(tiny, data, plan_for)
    result = run(model, plan, train, output_dir=str(tmp_path / "new"), resume=True)
    assert_same_run(model, result, ref_model, ref)
    # Saves land whole, so a newest checkpoint missing a file was damaged since: refused, naming what it
    # lacks (it quietly started over); once removed, the run starts over.
    newest = latest_checkpoint(tmp_path / "new")
    (newest / "optimizer.pt").unlink()
    again, plan, train = setup(tiny, data, plan_for)
    with pytest.raises(ckpt.CheckpointError, match=r"incomplete \(it lacks optimizer.pt\): remove it to start "
                                                    "from the first step"):
        run(again, plan, train, output_dir=str(tmp_path / "new"), resume=True)
    shutil.rmtree(newest)
    assert_same_run(again, run(again, plan, train, output_dir=str(tmp_path / "new"), resume=True), ref_model, ref)


def test_a_damaged_trainer_state_is_named_damaged_not_other_data(tiny, data, plan_for, tmp_path):
    model, plan, train = setup(tiny, data, plan_for)
    run(model, plan, train, max_steps=2, output_dir=str(tmp_path))
    (latest_checkpoint(tmp_path) / "trainer_state.json").write_text('{"global_step": "x", "epoch": -3}')
    again, plan, train = setup(tiny, data, plan_for)
    with pytest.raises(ckpt.CheckpointError, match="is damaged: its trainer_state.json does not read"):
        run(again, plan, train, output_dir=str(tmp_path), resume=True)


def test_a_killed_save_is_cleaned_up_at_the_next_start(tiny, data, plan_for, tmp_path):
    model, plan, train = setup(tiny, data, plan_for)
    run(model, plan, train, max_steps=2, output_dir=str(tmp_path))
    half = tmp_path / ".tmp-checkpoint-00000003-999"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 1000)
    # killed between moving a same-step checkpoint aside and putting its replacement in place
    (tmp_path / "checkpoint-00000002").rename(tmp_path / ".old-checkpoint-00000002-999")
    assert latest_checkpoint(tmp_path) is None
    resumed, plan, train = setup(tiny, data, plan_for, seed=1)
    result = run(resumed, plan, train, output_dir=str(tmp_path), resume=True)
    assert result.history[0].step == 1 and len(result.history) == 6  # it went on from step 2's checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000006"]


def test_output_dir_that_is_a_file_is_refused_before_training(tiny, data, plan_for, tmp_path):
    model, plan, train = setup(tiny, data, plan_for)
    path = tmp_path / "a-file"
    path.write_text("x")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ckpt.CheckpointError, match="is a file, not a directory"):
        run(model, plan, train, output_dir=str(path))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("change, match", [
    (dict(data_seed=1), "trained on other data"),
    (dict(micro_batch_size=4), r"knobs.micro_batch_size 2 -> 4"),
    (dict(seed=5), "seed 0 -> 5"),
    (dict(lr=1e-4), r"lr 0.003 -> 0.0001"),
    (dict(batch_size=6), "batch_size 4 -> 6"),
])
def test_resume_with_other_data_plan_or_settings_is_refused(tiny, data, plan_for, tmp_path, change, match):
    model, plan, train = setup(tiny, data, plan_for)
    run(model, plan, train, max_steps=1, output_dir=str(tmp_path))
    other = tiny(seed=1, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    train = data(N, seed=change.get("data_seed", 0))
    plan = plan_for(other, data=train, batch_size=change.get("batch_size", 4),
                    micro_batch_size=change.get("micro_batch_size", 2))
    before = [p.detach().clone() for p in other.parameters()]
    kwargs = {k: v for k, v in change.items() if k in ("seed", "lr")}
    with pytest.raises(ExecutorInputError, match=match) as info:
        run(other, plan, train, output_dir=str(tmp_path), resume=True, **kwargs)
    assert "\n" not in str(info.value)
    assert all(torch.equal(a, p) for a, p in zip(before, other.parameters()))


def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(tiny, data, plan_for, tmp_path):
    ref_model, plan, train = setup(tiny, data, plan_for)
    ref = run(ref_model, plan, train)
    model, plan, train = setup(tiny, data, plan_for)
    forward, calls = model.forward, []

    def ctrl_c_in_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the first of step 2's two micro-batches
            os.kill(os.getpid(), signal.SIGINT)
        return forward(*args, **kwargs)

    model.forward = ctrl_c_in_step_2
    handler = signal.getsignal(signal.SIGINT)  # default, or ignored when the suite runs in the background
    with pytest.raises(TrainingInterruptedError, match="interrupted after step 2; the checkpoint is .*checkpoint-00000002"):
        run(model, plan, train, output_dir=str(tmp_path))
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is given back
    resumed, plan, train = setup(tiny, data, plan_for, seed=1)
    assert_same_run(resumed, run(resumed, plan, train, output_dir=str(tmp_path), resume=True), ref_model, ref)


def test_resuming_a_finished_run_says_there_is_nothing_left(tiny, data, plan_for, tmp_path, caplog):
    model, plan, train = setup(tiny, data, plan_for)
    first = run(model, plan, train, output_dir=str(tmp_path))
    again, plan, train = setup(tiny, data, plan_for)
    with caplog.at_level("INFO", logger="autofit"):
        second = run(again, plan, train, output_dir=str(tmp_path), resume=True)
    assert f"already finished ({first.optimizer_steps} optimizer steps): nothing left to train" in caplog.text
    assert second.optimizer_steps == first.optimizer_steps


@pytest.mark.parametrize("keep", [1, 2])
def test_a_save_never_removes_itself_even_below_a_higher_numbered_checkpoint(tiny, data, plan_for, tmp_path, keep):
    """Tidying keeps the newest `keep` by step number, but the checkpoint just written is always one of them:
    a save that deleted itself printed a path that did not exist."""
    model, plan, train = setup(tiny, data, plan_for)
    optimizer, scaler = torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu", enabled=False)
    kwargs = {"model": model, "optimizer": optimizer, "scaler": scaler, "plan": plan, "keep": keep}
    for step in (9, 3):
        state = ckpt.TrainerState(step=step, data_fingerprint="d")
        written = ckpt.save_checkpoint(tmp_path, state=state, **kwargs)
    assert written.name == "checkpoint-00000003" and ckpt.complete(written)
    assert [p.name for p in list_checkpoints(tmp_path)] == (
        ["checkpoint-00000003"] if keep == 1 else ["checkpoint-00000003", "checkpoint-00000009"])
