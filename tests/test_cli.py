"""The `autofit` command: plan | train | profile | explain, its exit codes (0 ok, 2 no plan fits, 1 any other
bad input) and its one-line errors."""

import json
import logging
import random
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging
from typer.testing import CliRunner

from autofit import cli, cli_errors
from autofit.budget import parse_budget
from autofit.cli import app
from autofit.plan import Plan
from autofit.profiler import profile as profile_module

from _tiny import short_model as tiny_model

WORDS = [f"w{i}" for i in range(40)]
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, code: int = 1) -> str:
    """Exit `code` through typer.Exit (not an escaped exception), one 'error:' line on stderr, no traceback
    (`note:` lines about the data may come before it: they are not part of the error)."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny BERT classifier saved with save_pretrained next to its word-level tokenizer, and a JSON-lines
    training file of {"text", "label"} rows."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "tiny-bert"
    tiny_model("bert", "classification", max_position_embeddings=128).save_pretrained(model_dir)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(model_dir)
    rng = random.Random(0)
    data = root / "train.jsonl"
    with data.open("w") as f:
        for _ in range(24):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 20))]
            f.write(json.dumps({"text": " ".join(words), "label": int("w7" in words)}) + "\n")
    return {"model": model_dir, "data": data, "root": root}


# ---- plan / explain -----------------------------------------------------------------------------------------


def test_plan_json_is_a_valid_plan():
    result = invoke("plan", "--model", "bert-base-uncased", "--vram", "16GB", "--json")
    assert result.exit_code == 0, result.output
    plan = Plan.model_validate_json(result.stdout)
    assert plan.model_id == "bert-base-uncased" and plan.model_type == "bert" and plan.num_layers == 12
    assert plan.budget_bytes == 16 * 2**30
    assert plan.predicted.peak_bytes <= plan.budget_bytes - plan.headroom_bytes
    assert plan.batch_size == 32 and plan.workload.lengths.max_length == 512
    assert json.loads(result.stdout)["knobs"]["micro_batch_size"] == plan.knobs.micro_batch_size


def test_plan_out_writes_a_file_that_explain_prints(tmp_path):
    path = tmp_path / "plan.json"
    result = invoke("plan", "--model", "bert-base-uncased", "--vram", "8GB", "--seq-len", "128",
                    "--batch-size", "16", "--out", path)
    assert result.exit_code == 0, result.output
    assert f"saved to {path}" in result.stdout.replace("\n", "")
    assert "bert-base-uncased" in result.stdout and "predicted peak" in result.stdout
    plan = Plan.load(path)
    assert plan.budget_bytes == 8 * 2**30 and plan.batch_size == 16
    assert plan.workload.lengths.max_length == 128

    shown = invoke("explain", path)
    assert shown.exit_code == 0, shown.output
    assert "bert-base-uncased" in shown.stdout and "predicted peak" in shown.stdout
    assert f"effective batch {plan.batch_size}" in shown.stdout
    assert "8.0 GB" in shown.stdout


def test_no_plan_fits_exits_2_naming_the_smallest_budget():
    # 200 MB: below even a 4-bit base with adapters (its fp32 embeddings alone weigh 0.4 GB)
    result = invoke("plan", "--model", "microsoft/deberta-v3-base", "--vram", "200MB")
    line = assert_one_line_error(result, code=2)
    found = re.search(r"smallest budget that fits is ([0-9.]+ [KMGT]B)", line)
    assert found, line
    smallest = parse_budget(found.group(1).replace(" ", ""))
    assert smallest > 200 * 2**20
    # ... and that budget does fit.
    ok = invoke("plan", "--model", "microsoft/deberta-v3-base", "--vram", found.group(1).replace(" ", ""),
                "--json")
    assert ok.exit_code == 0, ok.output
    plan = Plan.model_validate_json(ok.stdout)
    assert plan.predicted.peak_bytes <= plan.budget_bytes - plan.headroom_bytes


# ---- bad input: exit 1, one line ----------------------------------------------------------------------------

BAD_PLAN_ARGS = {
    "budget abc": ["--vram", "abc"],
    "budget 0": ["--vram", "0"],
    "budget -5GB": ["--vram", "-5GB"],
    "unknown model": ["--vram", "16GB", "--model", "no-such-org/no-such-model"],
    "unknown policy": ["--vram", "16GB", "--policy", "no-such-policy"],
    "missing data file": ["--vram", "16GB", "--data", "no-such-file.jsonl"],
    "unknown device": ["--vram", "16GB", "--device", "tpu-v9"],
    "seq-len 0": ["--vram", "16GB", "--seq-len", "0"],
    "missing --vram": [],
}


@pytest.mark.parametrize("extra", BAD_PLAN_ARGS.values(), ids=BAD_PLAN_ARGS.keys())
def test_bad_plan_input_is_one_line_and_exit_1(extra):
    args = ["plan", "--model", "bert-base-uncased", *extra]
    if "--model" in extra:
        args = ["plan", *extra]
    line = assert_one_line_error(invoke(*args))
    print(line)


def test_bad_input_messages_say_what_is_wrong():
    assert "'abc'" in assert_one_line_error(invoke("plan", "--model", "gpt2", "--vram", "abc"))
    assert "positive" in assert_one_line_error(invoke("plan", "--model", "gpt2", "--vram", "0"))
    assert "no-such-org/no-such-model" in assert_one_line_error(
        invoke("plan", "--model", "no-such-org/no-such-model", "--vram", "16GB"))
    assert "no-such-file.jsonl" in assert_one_line_error(
        invoke("plan", "--model", "gpt2", "--vram", "16GB", "--data", "no-such-file.jsonl"))
    assert "--vram" in assert_one_line_error(invoke("plan", "--model", "gpt2"))


def test_bad_plan_files_are_one_line_and_exit_1(tmp_path):
    assert "not found" in assert_one_line_error(invoke("explain", tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert "is not JSON" in assert_one_line_error(invoke("explain", broken))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model_id": "x", "knobs": {}}))
    assert "other.json is not a valid plan: model_type: Field required (+" in assert_one_line_error(
        invoke("explain", other))
    assert_one_line_error(invoke("train", "--plan", broken, "--data", broken))
    assert f"plan file {tmp_path} is a directory" in assert_one_line_error(invoke("explain", tmp_path))


def test_bad_policy_and_data_files_are_named_for_what_is_wrong(files, tmp_path):
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x00\xd4\xff\xfe")
    plan = ("plan", "--model", files["model"], "--vram", "1GB", "--device", "cpu", "--policy")
    assert "is a directory" in assert_one_line_error(invoke(*plan, folder))
    assert "is not UTF-8 text" in assert_one_line_error(invoke(*plan, binary))
    lines = tmp_path / "arrays.jsonl"
    lines.write_text('[1, 2, 3]\n"str"\n42\n')  # valid JSON lines, no objects: it said "Extra data at line 2"
    assert "must be a JSON object" in assert_one_line_error(invoke("plan", "--model", files["model"], "--vram",
                                                                   "1GB", "--data", lines))


def test_an_error_is_one_line_however_a_library_words_it():
    assert cli_errors.one_line("Validation error for field 'hidden_size':\n  expected int, got str") == \
        "Validation error for field 'hidden_size': expected int, got str"
    cut = cli_errors.one_line("PytorchStreamReader failed " * 100)
    assert cut.endswith("...") and len(cut) <= cli_errors.MAX_ERROR_CHARS


def test_train_needs_exactly_one_of_plan_and_vram(files, tmp_path):
    both = invoke("train", "--plan", tmp_path / "p.json", "--vram", "1GB", "--data", files["data"])
    assert "exactly one" in assert_one_line_error(both)
    assert "exactly one" in assert_one_line_error(invoke("train", "--data", files["data"]))
    missing = invoke("train", "--vram", "1GB", "--model", files["model"], "--data", tmp_path / "none.jsonl")
    assert "not found" in assert_one_line_error(missing)


# ---- profile ------------------------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_profile_prints_the_block_table(monkeypatch):
    # Real timing of a two-layer GPT-2 at the profiler's shapes takes a minute on two cores: time smaller ones.
    monkeypatch.setattr(profile_module, "TIME_SHAPES", ((1, 8), (2, 8), (1, 16), (2, 16)))
    monkeypatch.setattr(cli.out, "width", 160)  # a wide terminal: no cell is cut short
    # GPT-2's first loss makes transformers warn (once per process) that its loss_type is unrecognized; the CLI
    # must keep such advice off stderr, where the one-line error contract holds.
    hf_logging.warning_once.cache_clear()
    caught = _Records()
    logging.getLogger("transformers").addHandler(caught)
    try:
        result = invoke("profile", "--model", "gpt2", "--seq-len", "128")
    finally:
        logging.getLogger("transformers").removeHandler(caught)
    assert result.exit_code == 0, result.output
    assert not [r.getMessage() for r in caught.records if r.levelno >= logging.WARNING]
    text = result.stdout
    assert "gpt2: per-block profile (measured on cpu, seq 128)" in text
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in text.splitlines() if line.count("│") >= 9}
    assert {"embeddings", "layer", "head"} <= set(rows), text
    assert rows["layer"][0] == "12" and rows["embeddings"][0] == "1"  # counts
    assert rows["layer"][1] == "7.09M" and rows["embeddings"][1] == "39.38M"  # params of one layer, embeddings
    assert all(float(rows[k][-1]) > 0 and float(rows[k][-2]) > 0 for k in ("embeddings", "layer"))  # ms


# ---- train --------------------------------------------------------------------------------------------------


def test_train_with_a_saved_plan(files, tmp_path):
    plan_path = tmp_path / "plan.json"
    planned = invoke("plan", "--model", files["model"], "--vram", "1GB", "--device", "cpu", "--seq-len", "64",
                     "--batch-size", "4", "--data", files["data"], "--out", plan_path)
    assert planned.exit_code == 0, planned.output
    plan = Plan.load(plan_path)
    assert plan.workload.from_data and plan.batch_size == 4
    assert Path(plan.model_id) == files["model"].resolve()

    result = invoke("train", "--plan", plan_path, "--data", files["data"], "--model", files["model"],
                    "--max-steps", "2", "--quiet")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "2 optimizer steps, final loss" in result.stdout
    assert "measured" in result.stdout and "predicted" in result.stdout
    fast = invoke("train", "--plan", plan_path, "--data", files["data"], "--model", files["model"],
                  "--max-steps", "2", "--quiet", "--no-measure")
    assert fast.exit_code == 0, (fast.output, fast.exception)
    assert "2 optimizer steps, final loss" in fast.stdout and "peak memory" not in fast.stdout


def test_train_with_an_output_dir_leaves_a_model_to_load(files, tmp_path):
    out = tmp_path / "out"
    result = invoke("train", "--vram", "1GB", "--model", files["model"], "--data", files["data"],
                    "--batch-size", "4", "--max-steps", "1", "--quiet", "--output-dir", out, "--adapter", "none")
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"trained model saved to {out / 'model'}" in result.stdout.replace("\n", "")
    again = invoke("train", "--vram", "1GB", "--model", out / "model", "--data", files["data"],
                   "--batch-size", "4", "--max-steps", "1", "--quiet")
    assert again.exit_code == 0, (again.output, again.exception)


def test_train_with_a_budget_instead_of_a_plan(files):
    result = invoke("train", "--vram", "1GB", "--model", files["model"], "--data", files["data"],
                    "--batch-size", "4", "--max-steps", "2", "--quiet")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "2 optimizer steps, final loss" in result.stdout
    peak = re.search(r"peak memory ([0-9.]+ [KMG]?B) measured, ([0-9.]+ [KMG]?B) predicted", result.stdout)
    assert peak, result.stdout


# ---- trust: what train promises and refuses -----------------------------------------------------------------


def test_train_says_what_each_step_trained_and_the_inferred_task(files, tmp_path):
    result = invoke("train", "--vram", "1GB", "--model", files["model"], "--data", files["data"],
                    "--batch-size", "5", "--quiet")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "every step trained 5 examples (the last of an epoch 4)" in result.stdout  # 24 = 4 x 5 + 4
    assert "note: 2 classes from integer labels 0-1" in result.stderr
    assert "warning:" not in result.stderr


def test_notes_come_from_process_zero_alone(files, monkeypatch):
    """Under torchrun every process infers the same: one says it (RANK is the launchers' variable)."""
    monkeypatch.setenv("RANK", "1")
    result = invoke("plan", "--model", files["model"], "--vram", "1GB", "--device", "cpu", "--seq-len", "8",
                    "--data", files["data"])
    assert result.exit_code == 0 and "note:" not in result.stderr
    monkeypatch.setenv("RANK", "0")
    result = invoke("plan", "--model", files["model"], "--vram", "1GB", "--device", "cpu", "--seq-len", "8",
                    "--data", files["data"])
    assert result.exit_code == 0 and "note: " in result.stderr and "planned cut at 8" in result.stderr


def test_seq_len_beyond_the_models_positions_is_refused():
    line = assert_one_line_error(invoke("plan", "--model", "bert-base-uncased", "--vram", "16GB",
                                        "--seq-len", "4096"))
    assert "4096" in line and "512 positions" in line
    assert invoke("plan", "--model", "bert-base-uncased", "--vram", "16GB", "--json").exit_code == 0


def test_output_dir_that_is_a_file_fails_before_training(files, tmp_path):
    path = tmp_path / "out"
    path.write_text("not a directory")
    line = assert_one_line_error(invoke("train", "--vram", "1GB", "--model", files["model"], "--data",
                                        files["data"], "--output-dir", path, "--quiet"))
    assert "is a file, not a directory" in line


def test_an_output_dir_another_run_is_training_into_is_refused(files, tmp_path):
    from autofit.executor.output_dir import claim_output_dir

    out = tmp_path / "run"
    with claim_output_dir(out):  # as a run in another terminal holds it
        line = assert_one_line_error(invoke("train", "--vram", "1GB", "--model", files["model"], "--data",
                                            files["data"], "--output-dir", out, "--quiet", "--max-steps", "1"))
    assert line.startswith("error: another autofit run (process ") and "--output-dir" in line, line


def test_resume_on_a_first_run_starts_and_a_resume_on_other_data_is_refused(files, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--vram", "1GB", "--model", files["model"], "--batch-size", "4", "--quiet",
            "--output-dir", out, "--resume"]
    first = invoke(*args, "--data", files["data"], "--max-steps", "2")
    assert first.exit_code == 0, (first.output, first.exception)
    assert "no checkpoint in" in first.stderr and "starting from the first step" in first.stderr
    other = tmp_path / "other.jsonl"
    other.write_text("".join(line + "\n" for line in files["data"].read_text().splitlines()[:12]))
    line = assert_one_line_error(invoke(*args, "--data", other))
    assert "trained on other data" in line
    fresh = assert_one_line_error(invoke(*args[:-1], "--data", files["data"], "--max-steps", "1"))
    assert "holds an earlier run's checkpoints (checkpoint-00000002)" in fresh and "--resume" in fresh, fresh


def test_an_empty_model_directory_is_named_as_such(files, tmp_path):
    (tmp_path / "empty").mkdir()
    line = assert_one_line_error(invoke("train", "--vram", "1GB", "--model", tmp_path / "empty", "--data",
                                        files["data"]))
    assert "has no config.json" in line


@pytest.mark.parametrize("command", [["autofit"], ["python", "-m", "autofit"]])
def test_ctrl_c_while_the_command_starts_is_no_traceback(command):
    """The command imports torch for seconds before its own error handling runs: Ctrl-C then still exits
    130 with one line."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    exe = [sys.executable] + command[1:] if command[0] == "python" else [shutil.which("autofit") or
                                                                         str(Path(sys.executable).parent / "autofit")]
    started = subprocess.Popen(exe + ["--help"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # autofit's handler is in place before torch's import starts, which takes seconds: interrupt once torch's
    # library is loading (a fixed sleep came too early on a loaded machine)
    deadline = time.monotonic() + 30
    while started.poll() is None and time.monotonic() < deadline and not _loads_torch(started.pid):
        time.sleep(0.02)
    started.send_signal(signal.SIGINT)
    err = started.communicate(timeout=60)[1]
    assert started.returncode == 130 and err.splitlines() == ["stopped: interrupted"], err


def _loads_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:  # it exited
        return False


def test_version_names_autofit_torch_and_transformers():
    import torch
    import transformers

    import autofit

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == (f"autofit {autofit.__version__} (torch {torch.__version__}, transformers "
                                     f"{transformers.__version__})")


def test_the_same_plan_command_names_the_same_plan_whatever_the_hash_seed(files, tmp_path):
    """Ties in the search were broken by a set's order, which follows PYTHONHASHSEED: the same command named
    other knobs from one run to the next."""
    import os
    import subprocess
    import sys

    policy = tmp_path / "tight.yaml"  # a headroom leaving nothing: the no-fit path, full of ties on the peak
    policy.write_text("name: tight\nheadroom:\n  fraction: 0.99\nprecisions: [bf16, fp16, fp32]\n"
                      "bucketing:\n  counts: [0, 4, 8]\n  token_budget: true\n")
    args = ["plan", "--model", str(files["model"]), "--vram", "20MB", "--device", "cpu", "--seq-len", "128",
            "--batch-size", "8", "--data", str(files["data"]), "--policy", str(policy)]
    first = runner.invoke(app, args)  # profiles into the shared cache: the runs below time nothing anew
    assert first.exit_code == 2, first.output
    lines = set()
    for seed in ("1", "2", "3"):
        done = subprocess.run([sys.executable, "-m", "autofit", *args], capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}, timeout=300)
        assert done.returncode == 2, done.stderr
        lines.add(done.stderr.strip().splitlines()[-1])
    assert len(lines) == 1, lines
