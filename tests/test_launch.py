"""What a user types for several processes, end to end on the CPU: `autofit plan --gpus 2 --accelerate-config`,
then `accelerate launch --config_file ... -m autofit train --plan ...` (2 gloo processes)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from _dist import free_port
from _tiny import short_model
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import autofit
from autofit.knobs import Knobs
from autofit.plan import Plan

WORDS = [f"w{i}" for i in range(40)]
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny BERT with a word-level tokenizer, and 40 examples of skewed lengths (most short, a long tail)."""
    root = tmp_path_factory.mktemp("launch")
    short_model("bert", "classification", max_position_embeddings=128).save_pretrained(root / "model")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(root / "model")
    rng = random.Random(0)
    with (root / "train.jsonl").open("w") as f:
        for _ in range(40):
            words = [rng.choice(WORDS) for _ in range(min(100, 3 + int(rng.expovariate(1 / 12))))]
            f.write(json.dumps({"text": " ".join(words), "label": int("w7" in words)}) + "\n")
    return root


def _autofit(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(autofit.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))}
    return subprocess.run([*args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_plan_for_two_processes_trains_under_accelerate_launch(files, strategy):
    planned = _autofit(sys.executable, "-m", "autofit", "plan", "--model", "model", "--vram", "64MB", "--device",
                       "cpu", "--gpus", "2", "--data", "train.jsonl", "--batch-size", "8", "--out", "plan.json",
                       cwd=files)
    assert planned.returncode == 0, planned.stderr
    plan = Plan.load(files / "plan.json")
    knobs = Knobs(**{**plan.knobs.model_dump(), "strategy": strategy, "optimizer_bits": 32})
    plan = plan.model_copy(update={"knobs": knobs})
    plan.save(files / f"{strategy}.json")
    plan.to_accelerate_config(files / f"{strategy}.yaml")
    done = _autofit(sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"{strategy}.yaml",
                    "--main_process_port", str(free_port()), "-m", "autofit", "train", "--plan",
                    f"{strategy}.json", "--data", "train.jsonl", "--output-dir", f"out-{strategy}", "--quiet",
                    cwd=files)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "5 optimizer steps" in done.stdout and "every step trained 8 examples" in done.stdout
    assert "by the busiest of 2 processes" in done.stdout
    assert done.stdout.count("optimizer steps") == 1  # process 0 reports, the other is quiet
    assert (files / f"out-{strategy}" / "checkpoint-00000005").is_dir()


def test_no_plan_fits_under_a_launcher_exits_2_on_every_process_with_one_line(files):
    """Under torchrun the main process plans and the others hear of its failure: every process exits as it
    does (2: no plan fits), and only it says the error."""
    wide = short_model("bert", "classification", max_position_embeddings=128, hidden_size=128, intermediate_size=512,
                       num_hidden_layers=4)
    wide.save_pretrained(files / "wide")  # 3.3 MB of weights: 1.6 MB shards, over a 1 MB budget
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (files / "model" / name).exists():
            (files / "wide" / name).write_bytes((files / "model" / name).read_bytes())
    done = _autofit(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    str(free_port()), "-m", "autofit", "train", "--model", "wide",
                    "--vram", "1MB", "--data", "train.jsonl", "--batch-size", "8", cwd=files)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: no plan fits in 1.0 MB per process"), \
        (done.returncode, done.stdout[-2000:], done.stderr[-3000:])
    assert "exitcode  : 2" in done.stderr and "exitcode  : 1" not in done.stderr, done.stderr[-3000:]
