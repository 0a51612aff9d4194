"""The `autofit` command's options that name columns, fix a plan's choices or name files to write: each works,
or fails in one line before any slow work (a search, a profile, training)."""

import json

import pytest

import autofit.api
import autofit.profiler
from autofit.plan import Plan

import test_cli
from test_cli import assert_one_line_error, invoke

files = test_cli.files  # the tiny model, tokenizer and data files the CLI tests share (a module fixture)


@pytest.fixture(scope="module")
def target_data(files):
    """The training file with its label column renamed `target`."""
    path = files["root"] / "target.jsonl"
    rows = [json.loads(line) for line in files["data"].read_text().splitlines()]
    path.write_text("".join(json.dumps({"text": r["text"], "target": r["label"]}) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def plan_file(files):
    path = files["root"] / "options-plan.json"
    planned = invoke("plan", "--model", files["model"], "--vram", "1GB", "--device", "cpu", "--seq-len", "64",
                     "--batch-size", "4", "--data", files["data"], "--out", path)
    assert planned.exit_code == 0, planned.output
    return path


def _never(*args, **kwargs):
    raise AssertionError("the slow step ran before the bad option was refused")


# ---- --label-column, --task ----------------------------------------------------------------------------------


def test_label_column_names_the_labels_to_plan_and_train_with(files, target_data):
    unnamed = assert_one_line_error(invoke("train", "--vram", "1GB", "--model", files["model"], "--data",
                                           target_data, "--quiet"))
    assert "no label column" in unnamed and "--label-column" in unnamed
    trained = invoke("train", "--vram", "1GB", "--model", files["model"], "--data", target_data, "--label-column",
                     "target", "--batch-size", "4", "--max-steps", "1", "--quiet")
    assert trained.exit_code == 0, (trained.output, trained.exception)
    assert "1 optimizer step, final loss" in trained.stdout
    assert "2 classes from integer labels 0-1" in trained.stderr
    planned = invoke("plan", "--model", files["model"], "--vram", "1GB", "--device", "cpu", "--seq-len", "64",
                     "--data", target_data, "--label-column", "target", "--json")
    assert planned.exit_code == 0, planned.output
    assert Plan.model_validate_json(planned.stdout).workload.from_data


def test_a_label_column_the_data_lacks_is_named(files, target_data, monkeypatch):
    monkeypatch.setattr(autofit.api, "_search_lazily", _never)
    line = assert_one_line_error(invoke("plan", "--model", files["model"], "--vram", "1GB", "--device", "cpu",
                                        "--data", target_data, "--label-column", "label"))
    assert "label column 'label' not found; the data has columns ['target', 'text']" in line


def test_text_column_names_a_pair_as_a_comma_separated_list(files):
    """A pair the column finder does not know (question, passage) is named on the command line as "a,b"."""
    path = files["root"] / "qp.jsonl"
    rows = [json.loads(line) for line in files["data"].read_text().splitlines()]
    path.write_text("".join(json.dumps({"question": r["text"], "passage": r["text"][::-1], "label": r["label"]})
                            + "\n" for r in rows))
    unnamed = assert_one_line_error(invoke("plan", "--model", files["model"], "--vram", "1GB", "--device", "cpu",
                                           "--data", path))
    assert "cannot tell which column holds the text" in unnamed
    planned = invoke("plan", "--model", files["model"], "--vram", "1GB", "--device", "cpu", "--data", path,
                     "--text-column", "question,passage", "--json")
    assert planned.exit_code == 0, (planned.output, planned.exception)
    single = invoke("plan", "--model", files["model"], "--vram", "1GB", "--device", "cpu", "--data", path,
                    "--text-column", "question", "--json")
    pair_lengths = Plan.model_validate_json(planned.stdout).workload.lengths
    assert pair_lengths.num_tokens > Plan.model_validate_json(single.stdout).workload.lengths.num_tokens


def test_task_reaches_train(files, plan_file):
    line = assert_one_line_error(invoke("train", "--vram", "1GB", "--model", files["model"], "--data",
                                        files["data"], "--task", "causal-lm", "--quiet"))
    assert "bert is an encoder (a masked language model), not a causal LM" in line
    line = assert_one_line_error(invoke("train", "--plan", plan_file, "--data", files["data"], "--task",
                                        "causal-lm", "--quiet"))
    assert "the plan fixes task (--task) at classification, not causal-lm" in line


# ---- what a plan fixes ---------------------------------------------------------------------------------------


def test_train_with_a_plan_refuses_another_batch_size_or_policy(files, plan_file):
    args = ("train", "--plan", plan_file, "--data", files["data"], "--quiet")
    line = assert_one_line_error(invoke(*args, "--batch-size", "8"))
    assert "the plan fixes batch_size (--batch-size) at 4, not 8" in line
    line = assert_one_line_error(invoke(*args, "--policy", "fastest"))
    assert "the plan fixes policy (--policy) at balanced, not fastest" in line
    same = invoke(*args, "--batch-size", "4", "--policy", "balanced", "--max-steps", "1")  # what it chose: fine
    assert same.exit_code == 0, (same.output, same.exception)


@pytest.mark.parametrize("flag", ["--text-column", "--label-column"])
def test_plan_column_options_need_data(files, flag):
    line = assert_one_line_error(invoke("plan", "--model", files["model"], "--vram", "1GB", flag, "text"))
    assert f"{flag} names a column of the data: give --data too" in line


def test_plan_tokenizer_needs_data(files):
    line = assert_one_line_error(invoke("plan", "--model", files["model"], "--vram", "1GB", "--tokenizer",
                                        files["model"]))
    assert "--tokenizer tokenizes the data: give --data too" in line


def test_an_empty_output_dir_is_refused_not_taken_for_this_folder(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = assert_one_line_error(invoke("train", "--vram", "1GB", "--model", files["model"], "--data",
                                        files["data"], "--output-dir", "", "--max-steps", "1", "--quiet"))
    assert "--output-dir" in line and "''" in line
    assert list(tmp_path.iterdir()) == []  # no checkpoint landed in the working folder


# ---- files to write, --seq-len: before the slow step ---------------------------------------------------------


@pytest.mark.parametrize("flag", ["--out", "--accelerate-config"])
def test_a_file_to_write_is_checked_before_the_search(files, tmp_path, monkeypatch, flag):
    monkeypatch.setattr(autofit.api, "plan_and_search", _never)
    args = ("plan", "--model", files["model"], "--vram", "1GB", "--device", "cpu", flag)
    folder = assert_one_line_error(invoke(*args, tmp_path))
    assert folder == f"error: {flag} {tmp_path}: it is a folder"
    missing = tmp_path / "no" / "plan.json"
    line = assert_one_line_error(invoke(*args, missing))
    assert line == f"error: {flag} {missing}: the folder {missing.parent} does not exist"


def test_profile_refuses_a_seq_len_the_model_cannot_take_before_profiling(files, monkeypatch):
    with monkeypatch.context() as patched:
        patched.setattr(autofit.profiler, "profile_model", _never)
        line = assert_one_line_error(invoke("profile", "--model", files["model"], "--seq-len", "4096"))
    assert "--seq-len 4096 is longer than" in line and "(128 positions)" in line
    shown = invoke("profile", "--model", files["model"])  # the default, 512, is cut to the model's 128
    assert shown.exit_code == 0, shown.output
    assert "seq 128)" in shown.stdout


def test_plan_names_seq_len_as_typed():
    line = assert_one_line_error(invoke("plan", "--model", "bert-base-uncased", "--vram", "16GB",
                                        "--seq-len", "4096"))
    assert line.startswith("error: --seq-len 4096 is longer than") and "512 positions" in line


def test_a_model_folder_without_weights_is_one_warning_line(files, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(files["model"], bare, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    result = invoke("train", "--vram", "1GB", "--model", bare, "--data", files["data"], "--quiet", "--max-steps", "1")
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if "RANDOM" in line]
    assert warned == [f"warning: {bare.resolve()} has a config.json but no weights file (model.safetensors, "
                      "pytorch_model.bin): its weights are RANDOM"], result.stderr
    assert "warnings.warn" not in result.stderr


def test_a_resumed_full_fine_tune_of_a_model_without_weights_does_not_warn_again(files, tmp_path):
    """Its weights come from the checkpoint, not from a random init."""
    import shutil

    bare, out = tmp_path / "bare", tmp_path / "out"
    shutil.copytree(files["model"], bare, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    args = ("train", "--vram", "1GB", "--model", bare, "--data", files["data"], "--quiet", "--output-dir", out,
            "--adapter", "none")
    first = invoke(*args, "--max-steps", "1")
    assert first.exit_code == 0, first.output
    assert "RANDOM" in first.stderr
    resumed = invoke(*args, "--max-steps", "2", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "RANDOM" not in resumed.stderr and "checkpoint-00000001" in resumed.stderr, resumed.stderr


def test_eval_data_folder_gives_its_validation_split_and_eval_errors_say_so(files, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in files["data"].read_text().splitlines()]
    split = lambda part: datasets.Dataset.from_list(part)  # noqa: E731
    datasets.DatasetDict({"train": split(rows), "validation": split(rows[:5])}).save_to_disk(str(tmp_path / "dd"))
    args = ("train", "--vram", "1GB", "--model", files["model"], "--data", files["data"], "--quiet",
            "--max-steps", "1")
    result = invoke(*args, "--eval-data", tmp_path / "dd")
    assert result.exit_code == 0, result.output
    assert f"note: evaluating on the 'validation' split of {tmp_path / 'dd'}" in result.stderr
    assert "eval of 5 examples after step 1" in result.stdout, result.stdout
    (tmp_path / "unlabelled.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    line = assert_one_line_error(invoke(*args, "--eval-data", tmp_path / "unlabelled.jsonl"))
    assert line.startswith("error: eval_data (--eval-data): no label column ('label' or 'labels')"), line


def test_an_output_file_is_never_an_input_file(files, tmp_path):
    """`--out data.jsonl` overwrote the data with the plan."""
    data = tmp_path / "data.jsonl"
    data.write_bytes(files["data"].read_bytes())
    line = assert_one_line_error(invoke("plan", "--model", files["model"], "--vram", "1GB", "--data", data,
                                        "--out", data))
    assert line == f"error: --out {data} is the file --data names: write to another file"
    assert data.read_bytes() == files["data"].read_bytes()
    line = assert_one_line_error(invoke("plan", "--model", files["model"], "--vram", "1GB", "--out",
                                        tmp_path / "p.json", "--accelerate-config", tmp_path / "p.json"))
    assert line.endswith("is the file --out names: write to another file")


def test_a_note_is_said_once_though_train_and_eval_data_both_infer_it(files, tmp_path):
    rows = [json.loads(line) for line in files["data"].read_text().splitlines()]
    for name in ("body.jsonl", "eval.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps({"body": r["text"], "label": r["label"]}) + "\n"
                                             for r in rows))
    result = invoke("train", "--vram", "1GB", "--model", files["model"], "--data", tmp_path / "body.jsonl",
                    "--eval-data", tmp_path / "eval.jsonl", "--batch-size", "4", "--max-steps", "1", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("the text is column 'body'") == 1, result.stderr


def test_the_saved_tokenizer_pads_as_training_padded(tmp_path):
    """A GPT-2 tokenizer has no pad token; training pads with the end token's id (the config's pad_token_id).
    The tokenizer saved beside the trained model pads with it, so the model's inputs can be batched."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from autofit.cli import _pad_like_training

    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(["good bad movie film plot"], trainers.WordLevelTrainer(special_tokens=["<eos>",
                                                                                                      "<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>", unk_token="<unk>")
    assert tok.pad_token is None
    _pad_like_training(tok, 0).save_pretrained(tmp_path)
    batch = AutoTokenizer.from_pretrained(tmp_path)(["good movie", "bad film plot"], padding=True)
    assert batch["input_ids"][0][-1] == 0 and batch["attention_mask"][0] == [1, 1, 0]


def test_planning_on_data_without_labels_warns_that_training_needs_them(files):
    path = files["root"] / "unlabelled.jsonl"
    rows = [json.loads(line) for line in files["data"].read_text().splitlines()]
    path.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    planned = invoke("plan", "--model", files["model"], "--vram", "1GB", "--device", "cpu", "--data", path, "--json")
    assert planned.exit_code == 0, planned.output
    assert "warning: the data has no label column ('label' or 'labels'): training a classifier on it needs one" \
        in planned.stderr
    typo = invoke("plan", "--model", files["model"], "--vram", "1GB", "--device", "cpu", "--data", path,
                  "--label-column", "sentiment", "--json")
    assert "no label column ('sentiment')" in typo.stderr or "label column 'sentiment' not found" in typo.stderr
