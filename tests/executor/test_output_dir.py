"""The output directory: checked, held by one run at a time (a second run is refused before it touches the
first one's files), released however the holder ends, tidied after a killed save."""

from __future__ import annotations

import subprocess
import sys

import pytest
from _tiny import make_plan, tiny_model, token_data

from autofit.executor import run_plan
from autofit.executor.checkpoint import CheckpointError, list_checkpoints
from autofit.executor.output_dir import LOCK_NAME, check_output_dir, claim_output_dir

pytest.importorskip("fcntl")


def test_a_held_output_dir_is_refused_to_a_second_claim_until_released(tmp_path):
    first = claim_output_dir(tmp_path)
    with pytest.raises(CheckpointError) as error:
        claim_output_dir(tmp_path)
    message = str(error.value)
    assert message.startswith("another autofit run (process ") and str(tmp_path) in message
    assert "\n" not in message
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()  # a run that ends leaves no lock file behind
    claim_output_dir(tmp_path).release()


def test_a_second_run_leaves_the_first_runs_half_written_save_alone(tmp_path):
    """Tidying removes `.tmp-*` folders: only safe when no other run is writing one right now."""
    held = claim_output_dir(tmp_path)
    saving = tmp_path / ".tmp-checkpoint-00000004-123"
    saving.mkdir()
    model, data = tiny_model(), token_data(8)
    with pytest.raises(ValueError, match="another autofit run"):
        run_plan(model, make_plan(model, data=data, batch_size=4), data, output_dir=str(tmp_path), max_steps=1,
                 quiet=True)
    assert saving.is_dir()
    held.release()


def test_a_killed_holder_leaves_the_directory_free(tmp_path):
    code = (f"from autofit.executor.output_dir import claim_output_dir; import os; "
            f"claim_output_dir({str(tmp_path)!r}); os.kill(os.getpid(), 9)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == -9
    assert "process " in (tmp_path / LOCK_NAME).read_text()  # the dead holder's name stays, its lock does not
    claim_output_dir(tmp_path).release()


def test_tidying_removes_a_killed_saves_leftovers_and_restores_a_replaced_checkpoint(tmp_path):
    (tmp_path / ".tmp-checkpoint-00000002-77").mkdir()
    (tmp_path / ".old-checkpoint-00000002-77").mkdir()
    with claim_output_dir(tmp_path, resume=True) as claim:
        assert claim.notes == ["restored checkpoint-00000002, whose replacement an interrupted save never finished",
                               "removed .tmp-checkpoint-00000002-77, left by an interrupted save"]
    assert (tmp_path / "checkpoint-00000002").is_dir() and not (tmp_path / ".tmp-checkpoint-00000002-77").exists()


def test_an_output_dir_that_is_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(CheckpointError, match=r"^--output-dir .*out is a file, not a directory$"):
        check_output_dir(tmp_path / "out")


def test_a_fresh_run_into_an_earlier_runs_checkpoints_is_refused_and_they_stay(tmp_path, caplog):
    """Its saves would mingle with the earlier run's: a lower-numbered one of its own was tidied away as the
    older, and a resume picked up the other run's higher step."""
    model, data = tiny_model(), token_data(8)
    plan = make_plan(model, data=data, batch_size=4)
    run_plan(model, plan, data, output_dir=str(tmp_path), quiet=True, measure_memory=False)  # 2 steps
    earlier = list_checkpoints(tmp_path)
    assert [p.name for p in earlier] == ["checkpoint-00000002"]
    with pytest.raises(CheckpointError) as error:
        run_plan(tiny_model(), plan, data, output_dir=str(tmp_path), max_steps=1, quiet=True)
    message = str(error.value)
    assert "holds an earlier run's checkpoints (checkpoint-00000002)" in message and "--resume" in message
    assert "\n" not in message and list_checkpoints(tmp_path) == earlier
    with caplog.at_level("INFO", logger="autofit"):
        resumed = run_plan(tiny_model(), plan, data, output_dir=str(tmp_path), resume=True, quiet=True,
                           measure_memory=False, max_steps=1)
    assert "already finished (2 optimizer steps)" in caplog.text
    assert resumed.optimizer_steps == 2 and list_checkpoints(tmp_path) == earlier
