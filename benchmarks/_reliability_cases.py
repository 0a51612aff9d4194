"""The bad inputs of `python -m benchmarks.reliability`: fixtures (a tiny local model, data, a valid plan) and
the case list, one `Case` per input.

A case is data: the `autofit` command line (placeholders in braces are filled per run), the files it needs,
optional setup commands, and what the contract says must happen:

    REFUSE   exit 1 or 2 with a one-line "error:" (the Python API: an exception with a one-line message)
    NO_FIT   as REFUSE; exit 2 naming the smallest budget that fits is the precise answer
    WARN     refused, or accepted with a "warning:" line (e.g. float labels for a classifier)
    EITHER   accepted or cleanly refused: the input is odd but legal; only a traceback or a hang is wrong
    OK       a valid control: must succeed

Placeholders: {model} (tiny BERT, 2 layers, 512 positions, with its tokenizer), {model3} (the same with 3
layers), {data} (16 rows), {data64} (64 rows), {val} (8 rows), {plan} (a valid plan saved by
`autofit plan --out`), {tmp} (a fresh folder per case and channel; a case's `files` are written there).

The plan-file family is generated: every field of the valid plan, recursively, gets each mutation its kind
calls for (wrong type, null, missing, negative, zero, huge, NaN, infinity, and kind-specific values), plus
whole-file damage. Every mutation runs through the Python API (Plan.load, then train); the ones marked
`cli` also through `autofit train --plan` (a CLI process costs ~5 s of CPU, so not all ~500).
"""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REFUSE, NO_FIT, WARN, EITHER, OK = "refuse", "no_fit", "warn", "either", "ok"
EXPECTATIONS = (REFUSE, NO_FIT, WARN, EITHER, OK)

WORDS = [f"w{i}" for i in range(40)]
MISSING = object()  # a mutation that deletes the field
HUGE_MICRO_BATCH = 10**9
"""The "huge" micro-batch of plan-file mutations: above autofit.knobs.MAX_MICRO_BATCH (2**20), so a plan holding
it must be refused; a plain int (unlike the 10**30 of other integer fields) so only the range check catches it."""


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    argv: tuple[str, ...] | None
    """Arguments after `autofit`, with {placeholders}; None for a Python-API-only case."""
    expect: str = REFUSE
    files: dict[str, str | bytes] = field(default_factory=dict)
    """Relative path under {tmp} -> content (a path ending in "/" is created as an empty folder)."""
    setup: tuple[tuple[str, ...], ...] = ()
    """CLI commands run first, each must exit 0 (e.g. a training run to resume from)."""
    after_setup: dict[str, str | bytes] = field(default_factory=dict)
    """Files written after the setup commands (e.g. to damage the checkpoint they wrote)."""
    api: dict[str, Any] | None | bool = True
    """True: the API call is derived from argv; a dict {"fn": ..., "kwargs": ...}: this call; False: none."""
    cli: bool = True
    """Run argv through the CLI (plan mutations outside the CLI subset run through the API only)."""
    quick: bool = False
    """In the --quick subset."""
    note: str = ""

    def __post_init__(self) -> None:
        assert self.expect in EXPECTATIONS, self.expect


# ---- command lines ------------------------------------------------------------------------------------------

def cli(command: str, **options: Any) -> tuple[str, ...]:
    """`command --opt value ...`; None or False leaves an option out, True is a bare flag."""
    argv = [command]
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return tuple(argv)


PLAN = dict(model="{model}", vram="1GB", device="cpu", seq_len=64, batch_size=8)
TRAIN = dict(plan="{plan}", data="{data}", quiet=True)


def plan_argv(**options: Any) -> tuple[str, ...]:
    return cli("plan", **{**PLAN, **options})


def train_argv(**options: Any) -> tuple[str, ...]:
    return cli("train", **{**TRAIN, **options})


RESUMABLE = ("train", "--plan", "{plan}", "--data", "{data}", "--quiet", "--output-dir", "{tmp}/out",
             "--checkpoint-every", "1", "--max-steps", "2")


# ---- fixtures -----------------------------------------------------------------------------------------------

def make_rows(n: int, seed: int, *, max_words: int = 120) -> list[dict]:
    """{"text", "label"} rows with skewed lengths (Pareto: most short, a few long); the label says whether
    w7 occurs."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        count = max(1, min(max_words, int(rng.paretovariate(1.2) * 4)))
        words = [rng.choice(WORDS) for _ in range(count)]
        rows.append({"text": " ".join(words), "label": int("w7" in words)})
    return rows


def jsonl(rows: list) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def build_models(root: Path) -> dict[str, Path]:
    """Two tiny BERT classifiers (2 and 3 layers, hidden 32, 4 heads, 512 positions) saved with
    save_pretrained beside a word-level tokenizer trained with `tokenizers`; the data files."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")),
                                                 ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")
    paths: dict[str, Path] = {}
    for name, layers in (("model", 2), ("model3", 3)):
        torch.manual_seed(0)
        config = BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=512, pad_token_id=fast.pad_token_id)
        path = root / name
        BertForSequenceClassification(config).save_pretrained(path)
        fast.save_pretrained(path)
        paths[name] = path
    for name, n, seed in (("data", 16, 1), ("data64", 64, 2), ("val", 8, 3)):
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text(jsonl(make_rows(n, seed)))
    return paths


def valid_plan_argv() -> tuple[str, ...]:
    """The one valid plan every plan-file case starts from (real lengths from {data64})."""
    return cli("plan", model="{model}", vram="1GB", device="cpu", seq_len=128, batch_size=8, data="{data64}",
               out="{root}/plan.json")


# ---- static cases -------------------------------------------------------------------------------------------

BUDGETS: list[tuple[str, str, str, bool, bool]] = [  # (name, --vram, expectation, CLI, quick): the rest
    # goes through the API only (one parser behind both)
    ("negative", "-1GB", REFUSE, True, True),
    ("negative-bytes", "-17179869184", REFUSE, False, False),
    ("zero", "0", REFUSE, True, False),
    ("zero-gb", "0GB", REFUSE, False, False),
    ("zero-float", "0.0GB", REFUSE, False, False),
    ("minus-zero", "-0", REFUSE, False, False),
    ("one-byte", "1", NO_FIT, True, False),
    ("one-kb", "1KB", NO_FIT, True, False),
    ("100-kb", "100KB", NO_FIT, False, False),
    ("fraction-of-byte", "0.25", REFUSE, True, False),
    ("tiny-exponent", "1e-9GB", REFUSE, False, False),
    ("1e400", "1e400", REFUSE, True, False),
    ("1e309-gb", "1e309GB", REFUSE, False, False),
    ("1e30", "1e30", REFUSE, True, True),
    ("1e30-gb", "1e30GB", REFUSE, True, False),
    ("27-digits", "123456789012345678901234567", REFUSE, True, False),
    ("27-digits-gb", "999999999999999999999999999GB", REFUSE, False, False),
    ("1024-tb", "1024TB", EITHER, True, False),
    ("unknown-unit", "16XB", REFUSE, True, True),
    ("empty", "", REFUSE, True, False),
    ("blank", "   ", REFUSE, True, False),
    ("nan", "nan", REFUSE, True, True),
    ("nan-gb", "NaNGB", REFUSE, False, False),
    ("inf", "inf", REFUSE, True, False),
    ("inf-gb", "infGB", REFUSE, False, False),
    ("minus-inf", "-inf", REFUSE, True, False),
    ("unit-only", "GB", REFUSE, False, False),
    ("double-unit", "16GBGB", REFUSE, False, False),
    ("trailing-junk", "16GB16", REFUSE, False, False),
    ("hex", "0x10", REFUSE, False, False),
    ("underscore-digits", "1_073_741_824", EITHER, False, False),
    ("two-dots", "1.5.2GB", REFUSE, False, False),
    ("comma-decimal", "15,5GB", REFUSE, False, False),
    ("fullwidth-digits", "\uff11\uff16GB", EITHER, True, False),
    ("arabic-indic-digits", "\u0661\u0666GB", EITHER, False, False),
    ("newline", "16GB\n1", REFUSE, True, False),
    ("auto-without-cuda", "auto", REFUSE, True, False),
    ("lowercase", "16gb", EITHER, True, False),
    ("plus-sign", "+16GB", EITHER, False, False),
]


def budget_cases() -> list[Case]:
    cases = [Case(f"budget/{name}", "budget", plan_argv(vram=value), expect, cli=cli_too, quick=quick)
             for name, value, expect, cli_too, quick in BUDGETS]
    # Through `train --vram` too (plans, then trains: the budget check must come before any training).
    cases += [Case(f"budget/train-{name}", "budget", train_argv(plan=None, vram=value, model="{model}"), expect,
                   quick=quick)
              for name, value, expect, quick in (("1e30", "1e30", REFUSE, False), ("negative", "-1GB", REFUSE, False),
                                                 ("nan", "nan", REFUSE, False))]
    # Python values the CLI cannot produce.
    for name, value in (("int-negative", -1), ("int-zero", 0), ("float-nan", math.nan), ("float-inf", math.inf),
                        ("int-huge", 10**30), ("float-huge", 1e30), ("bool-true", True), ("none", None),
                        ("list", [16]), ("bytes-string", "b'16GB'")):
        cases.append(Case(f"budget/api-{name}", "budget", None, REFUSE, api={
            "fn": "plan", "kwargs": {"model": "{model}", "budget": value, "device": "cpu", "seq_len": 64,
                                     "batch_size": 8}}))
    return cases


BERT_CONFIG = {"model_type": "bert", "vocab_size": 44, "hidden_size": 32, "num_hidden_layers": 2,
               "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 512}


TOKENIZER_COPY = {"m/tokenizer.json": "@copy:{model}/tokenizer.json",
                  "m/tokenizer_config.json": "@copy:{model}/tokenizer_config.json"}


def _config(**changes: Any) -> str:
    return json.dumps({**BERT_CONFIG, **changes})


def model_cases() -> list[Case]:
    m = "{tmp}/m"
    plan_m = plan_argv(model=m)
    cases = [
        Case("model/missing-dir", "model", plan_argv(model="{tmp}/no-such-dir"), quick=True),
        Case("model/empty-dir", "model", plan_m, files={"m/": ""}),
        Case("model/config-not-json", "model", plan_m, files={"m/config.json": "{ this is not json"}, quick=True),
        Case("model/config-empty-file", "model", plan_m, files={"m/config.json": ""}),
        Case("model/config-is-list", "model", plan_m, files={"m/config.json": "[1, 2, 3]"}),
        Case("model/config-no-model-type", "model", plan_m, files={"m/config.json": "{}"}),
        Case("model/config-unknown-model-type", "model", plan_m,
             files={"m/config.json": _config(model_type="no-such-architecture")}),
        Case("model/config-negative-hidden", "model", plan_m, files={"m/config.json": _config(hidden_size=-32)}),
        Case("model/config-zero-layers", "model", plan_m, EITHER,
             files={"m/config.json": _config(num_hidden_layers=0)}),
        Case("model/config-heads-do-not-divide", "model", plan_m, files={"m/config.json": _config(hidden_size=33)}),
        Case("model/config-zero-vocab", "model", plan_m, files={"m/config.json": _config(vocab_size=0)}),
        Case("model/config-huge-layers", "model", plan_m, EITHER,
             files={"m/config.json": _config(num_hidden_layers=10**6)}, note="must not hang: a 10^6-layer config"),
        Case("model/config-not-utf8", "model", plan_m, files={"m/config.json": b"\xff\xfe{\x00\x80"}),
        Case("model/path-is-a-file", "model", plan_argv(model="{data}")),
        Case("model/unknown-id", "model", plan_argv(model="no-such-org/no-such-model"), quick=True),
        Case("model/empty-id", "model", plan_argv(model="")),
        Case("model/id-with-traversal", "model", plan_argv(model="../../../../etc")),
        Case("model/unknown-task", "model", plan_argv(task="summarization")),
        Case("model/causal-lm-task-on-bert", "model", plan_argv(task="causal-lm")),
        Case("model/unknown-device", "model", plan_argv(device="tpu")),
        Case("model/empty-device", "model", plan_argv(device="")),
        # train: the model must be loadable and match the plan.
        Case("model/train-weights-missing", "model", train_argv(model=m), WARN,
             files={"m/config.json": _config(), **TOKENIZER_COPY},
             note="a config without weights would train random weights"),
        Case("model/train-weights-corrupt", "model", train_argv(model=m),
             files={"m/config.json": _config(), "m/model.safetensors": b"\x00" * 64, **TOKENIZER_COPY}),
        Case("model/train-no-tokenizer", "model", train_argv(model=m), files={"m/config.json": _config()}),
        Case("model/train-tokenizer-broken", "model", train_argv(tokenizer="{tmp}/t"),
             files={"t/tokenizer.json": "{ broken"}),
        Case("model/train-tokenizer-missing", "model", train_argv(tokenizer="{tmp}/no-such-tokenizer")),
        Case("model/train-other-depth-than-plan", "model", train_argv(model="{model3}"), quick=True,
             note="the plan was made for 2 layers"),
        Case("model/train-catalog-id-with-local-plan", "model", train_argv(model="bert-base-uncased")),
        Case("model/profile-missing-dir", "model", cli("profile", model="{tmp}/no-such-dir")),
        Case("model/profile-config-not-json", "model", cli("profile", model=m),
             files={"m/config.json": "{ this is not json"}),
    ]
    return cases


def _bad_utf8_jsonl() -> bytes:
    return b'{"text": "w1 w2", "label": 0}\n{"text": "w3 \xff\xfe\xc3\x28", "label": 1}\n'


def data_cases() -> list[Case]:
    good = make_rows(16, 1)
    t = lambda name: train_argv(data=f"{{tmp}}/{name}")  # noqa: E731
    rows = lambda f: [f(i, r) for i, r in enumerate(good)]  # noqa: E731
    huge = "w1 " * 2_000_000
    cases = [
        Case("data/empty-file", "data", t("d.jsonl"), files={"d.jsonl": ""}, quick=True),
        Case("data/blank-lines", "data", t("d.jsonl"), files={"d.jsonl": "\n \n\t\n"}),
        Case("data/non-utf8", "data", t("d.jsonl"), files={"d.jsonl": _bad_utf8_jsonl()}, quick=True),
        Case("data/non-utf8-csv", "data", t("d.csv"), files={"d.csv": b"text,label\n\xff\xfe,1\n"}),
        Case("data/utf16", "data", t("d.jsonl"), EITHER, files={"d.jsonl": jsonl(good).encode("utf-16")}),
        Case("data/utf8-bom", "data", t("d.jsonl"), EITHER, files={"d.jsonl": "\ufeff" + jsonl(good)}),
        Case("data/broken-line", "data", t("d.jsonl"),
             files={"d.jsonl": jsonl(good[:5]) + '{"text": "w1 w2", "label": \n' + jsonl(good[5:])}, quick=True),
        Case("data/truncated-json-array", "data", t("d.json"), files={"d.json": json.dumps(good)[:200]}),
        Case("data/json-object-not-rows", "data", t("d.json"), EITHER,
             files={"d.json": json.dumps({"text": [r["text"] for r in good], "label": [r["label"] for r in good]})}),
        Case("data/rows-are-lists", "data", t("d.jsonl"), files={"d.jsonl": "[1, 2, 3]\n[4, 5]\n"}),
        Case("data/rows-are-numbers", "data", t("d.jsonl"), files={"d.jsonl": "1\n2\n3\n"}),
        Case("data/json-null", "data", t("d.json"), files={"d.json": "null"}),
        Case("data/missing-text-column", "data", t("d.jsonl"), WARN,
             files={"d.jsonl": jsonl([{"body": r["text"], "label": r["label"]} for r in good])}, quick=True,
             note="no text/sentence/content column: refuse, or say which column was taken"),
        Case("data/missing-labels", "data", t("d.jsonl"), files={"d.jsonl": jsonl([{"text": r["text"]} for r in good])},
             quick=True),
        Case("data/some-labels-missing", "data", t("d.jsonl"),
             files={"d.jsonl": jsonl(rows(lambda i, r: r if i % 2 else {"text": r["text"]}))}),
        Case("data/label-null", "data", t("d.jsonl"),
             files={"d.jsonl": jsonl(rows(lambda i, r: {**r, "label": None}))}),
        Case("data/text-null", "data", t("d.jsonl"), files={"d.jsonl": jsonl(rows(lambda i, r: {**r, "text": None}))}),
        Case("data/text-number", "data", t("d.jsonl"), EITHER,
             files={"d.jsonl": jsonl(rows(lambda i, r: {**r, "text": i * 1.5}))}),
        Case("data/text-empty-strings", "data", t("d.jsonl"), WARN,
             files={"d.jsonl": jsonl(rows(lambda i, r: {**r, "text": ""}))}),
        Case("data/all-labels-zero", "data", t("d.jsonl"), WARN,
             files={"d.jsonl": jsonl(rows(lambda i, r: {**r, "label": 0}))}, quick=True,
             note="one class only: nothing to learn"),
        Case("data/label-1e6", "data", t("d.jsonl"),
             files={"d.jsonl": jsonl(rows(lambda i, r: {**r, "label": 10**6 if i == 3 else r["label"]}))},
             quick=True, note="the model has 2 labels"),
        Case("data/label-negative", "data", t("d.jsonl"),
             files={"d.jsonl": jsonl(rows(lambda i, r: {**r, "label": -1 if i == 3 else r["label"]}))}),
        Case("data/label-float", "data", t("d.jsonl"), WARN,
             files={"d.jsonl": jsonl(rows(lambda i, r: {**r, "label": 0.5 + 0.1 * (i % 3)}))}, quick=True),
        Case("data/label-float-integral", "data", t("d.jsonl"), EITHER,
             files={"d.jsonl": jsonl(rows(lambda i, r: {**r, "label": float(r["label"])}))}),
        Case("data/label-strings", "data", t("d.jsonl"), EITHER,
             files={"d.jsonl": jsonl(rows(lambda i, r: {**r, "label": ["neg", "pos"][r["label"]]}))}),
        Case("data/label-bool", "data", t("d.jsonl"), EITHER,
             files={"d.jsonl": jsonl(rows(lambda i, r: {**r, "label": bool(r["label"])}))}),
        Case("data/label-list", "data", t("d.jsonl"),
             files={"d.jsonl": jsonl(rows(lambda i, r: {**r, "label": [1, 0]}))}),
        Case("data/label-nan", "data", t("d.jsonl"),
             files={"d.jsonl": "".join('{"text": "%s", "label": NaN}\n' % r["text"] for r in good)}),
        Case("data/label-infinity", "data", t("d.jsonl"),
             files={"d.jsonl": "".join('{"text": "%s", "label": Infinity}\n' % r["text"] for r in good)}),
        Case("data/three-classes-for-two-label-model", "data", t("d.jsonl"), WARN,
             files={"d.jsonl": jsonl(rows(lambda i, r: {**r, "label": i % 3}))}),
        Case("data/huge-single-text", "data", t("d.jsonl"), EITHER,
             files={"d.jsonl": jsonl([{"text": huge, "label": 1}] + good)},
             note="a 6 MB text: truncated, must not hang"),
        Case("data/single-row", "data", t("d.jsonl"), EITHER, files={"d.jsonl": jsonl(good[:1])}),
        Case("data/csv-wrong-header", "data", t("d.csv"),
             files={"d.csv": "foo,bar\n" + "".join(f"{r['text']},{r['label']}\n" for r in good)}, quick=True),
        Case("data/csv-header-only", "data", t("d.csv"), files={"d.csv": "text,label\n"}),
        Case("data/csv-ragged", "data", t("d.csv"),
             files={"d.csv": "text,label\n" + "".join(f"{r['text']}\n" for r in good)}),
        Case("data/csv-label-words", "data", t("d.csv"), EITHER,
             files={"d.csv": "text,label\n" + "".join(f"{r['text']},{['neg', 'pos'][r['label']]}\n" for r in good)}),
        Case("data/directory-empty", "data", t("dir"), files={"dir/": ""}),
        Case("data/directory-with-files", "data", t("dir"), files={"dir/a.jsonl": jsonl(good)}),
        Case("data/unknown-extension", "data", t("d.txt"), files={"d.txt": "w1 w2 w3\n"}),
        Case("data/fake-parquet", "data", t("d.parquet"), files={"d.parquet": b"PAR1\x00\x00"}),
        Case("data/missing-file", "data", t("no-such-file.jsonl")),
        Case("data/dev-null", "data", train_argv(data="/dev/null")),
        Case("data/text-column-missing", "data", train_argv(text_column="no_such_column")),
        Case("data/text-column-is-labels", "data", train_argv(text_column="label"), EITHER),
        Case("data/eval-broken", "data", train_argv(eval_data="{tmp}/v.jsonl"), files={"v.jsonl": "{ not json\n"}),
        Case("data/eval-unknown-label", "data", train_argv(eval_data="{tmp}/v.jsonl"),
             files={"v.jsonl": jsonl([{"text": "w1 w2", "label": 5}] * 4)},
             note="a class the training data does not have"),
        Case("data/eval-missing-labels", "data", train_argv(eval_data="{tmp}/v.jsonl"),
             files={"v.jsonl": jsonl([{"text": "w1 w2"}] * 4)}),
        Case("data/plan-empty-file", "data", plan_argv(data="{tmp}/d.jsonl"), files={"d.jsonl": ""}),
        Case("data/plan-missing-text-column", "data", plan_argv(data="{tmp}/d.jsonl"), WARN,
             files={"d.jsonl": jsonl([{"body": "w1"}] * 4)}, note="the only column of strings: used, and said"),
        Case("data/plan-no-tokenizer", "data", plan_argv(data="{data}", tokenizer="{tmp}/empty"),
             files={"empty/": ""}),
    ]
    return cases


def option_cases() -> list[Case]:
    out_then = lambda **o: train_argv(output_dir="{tmp}/out", **o)  # noqa: E731
    cases = [
        Case("options/seq-len-0", "options", plan_argv(seq_len=0), quick=True),
        Case("options/seq-len-negative", "options", plan_argv(seq_len=-1)),
        Case("options/seq-len-not-a-number", "options", plan_argv(seq_len="abc")),
        Case("options/seq-len-4096-on-512-positions", "options", plan_argv(seq_len=4096, vram="16GB"), quick=True,
             note="a budget where it would fit: only the length is wrong"),
        Case("options/seq-len-huge", "options", plan_argv(seq_len=10**30)),
        Case("options/batch-size-0", "options", plan_argv(batch_size=0)),
        Case("options/batch-size-negative", "options", plan_argv(batch_size=-8)),
        Case("options/batch-size-huge", "options", plan_argv(batch_size=10**12), EITHER),
        Case("options/trials-0", "options", plan_argv(trials=0)),
        Case("options/storage-bogus-url", "options", plan_argv(storage="bogus://nowhere")),
        Case("options/storage-missing-folder", "options", plan_argv(storage="sqlite:///{tmp}/no/such/dir/s.db")),
        Case("options/out-is-a-directory", "options", plan_argv(out="{tmp}/dir"), files={"dir/": ""}),
        Case("options/out-in-missing-folder", "options", plan_argv(out="{tmp}/no/such/plan.json")),
        Case("options/unknown-option", "options", plan_argv(frobnicate="1")),
        Case("options/unknown-command", "options", ("fly", "--model", "{model}")),
        Case("options/plan-without-vram", "options", plan_argv(vram=None)),
        Case("options/explain-missing-file", "options", ("explain", "{tmp}/no-such-plan.json")),
        Case("options/explain-directory", "options", ("explain", "{tmp}")),
        Case("options/profile-seq-len-0", "options", cli("profile", model="{model}", seq_len=0)),
        Case("options/profile-unknown-task", "options", cli("profile", model="{model}", task="bogus")),
        Case("options/epochs-0", "options", train_argv(epochs=0), quick=True),
        Case("options/epochs-negative", "options", train_argv(epochs=-1)),
        Case("options/max-steps-0", "options", train_argv(max_steps=0)),
        Case("options/max-steps-negative", "options", train_argv(max_steps=-1)),
        Case("options/lr-nan", "options", train_argv(lr="nan")),
        Case("options/lr-inf", "options", train_argv(lr="inf")),
        Case("options/lr-negative", "options", train_argv(lr=-1)),
        Case("options/lr-zero", "options", train_argv(lr=0), WARN),
        Case("options/lr-1e308", "options", train_argv(lr=1e308), quick=True,
             note="diverges to a nan loss: must not end in success"),
        Case("options/lr-not-a-number", "options", train_argv(lr="fast")),
        Case("options/batch-size-0-with-vram", "options", train_argv(plan=None, vram="1GB", model="{model}",
                                                                      batch_size=0)),
        Case("options/max-length-0", "options", train_argv(max_length=0)),
        Case("options/max-length-huge", "options", train_argv(max_length=10**6), EITHER),
        Case("options/checkpoint-every-0", "options", out_then(checkpoint_every=0)),
        Case("options/checkpoint-every-without-output-dir", "options", train_argv(checkpoint_every=1), WARN),
        Case("options/output-dir-is-a-file", "options", train_argv(output_dir="{data}"), quick=True,
             note="must be refused before training, not after"),
        Case("options/output-dir-unwritable", "options", train_argv(output_dir="/proc/autofit-out")),
        Case("options/resume-no-checkpoint", "options", out_then(resume=True), WARN, quick=True,
             note="resume-if-present: starts from the first step, and says so"),
        Case("options/resume-without-output-dir", "options", train_argv(resume=True)),
        Case("options/resume-only-tmp-checkpoint", "options", out_then(resume=True), WARN,
             files={"out/.tmp-checkpoint-00000001-1/model.safetensors": b"\x00"}),
        Case("options/resume-with-different-data", "options", out_then(resume=True, data="{data64}",
                                                                        checkpoint_every=1, max_steps=3),
             setup=(RESUMABLE,), quick=True, note="the checkpoint's data position belongs to other data"),
        Case("options/resume-with-other-model", "options", out_then(resume=True, model="{model3}",
                                                                     checkpoint_every=1, max_steps=3),
             setup=(RESUMABLE,)),
        Case("options/fresh-run-over-earlier-checkpoints", "options", out_then(max_steps=3), setup=(RESUMABLE,),
             note="its saves would mingle with the earlier run's: refused, pointing to --resume"),
        Case("options/resume-trainer-state-truncated", "options", out_then(resume=True, checkpoint_every=1,
                                                                            max_steps=3),
             setup=(RESUMABLE,), after_setup={"out/checkpoint-00000002/trainer_state.json": '{"step": 2, "hist'}),
        Case("options/resume-weights-corrupt", "options", out_then(resume=True, checkpoint_every=1, max_steps=3),
             setup=(RESUMABLE,), after_setup={"out/checkpoint-00000002/model.safetensors": b"\x00" * 16}),
        Case("options/plan-and-vram", "options", train_argv(vram="1GB")),
        Case("options/neither-plan-nor-vram", "options", train_argv(plan=None)),
        Case("options/train-unknown-policy-name", "options", train_argv(plan=None, vram="1GB", model="{model}",
                                                                         policy="no-such-policy")),
    ]
    return cases


# The policy files the CLI reads too (the API reads them all; one loader behind both).
POLICY_CLI = {"empty-file", "not-a-mapping", "invalid-yaml", "not-utf8", "risk-price-inf", "risk-price-nan",
              "unknown-field", "headroom-fraction-1.5", "headroom-bytes-huge", "precisions-empty", "deep-nesting"}


def policy_cases() -> list[Case]:
    p = plan_argv(policy="{tmp}/p.yaml")
    base = "name: custom\nprecisions: [fp32]\n"
    c = lambda name, text, expect=REFUSE, quick=False: Case(f"policy/{name}", "policy", p, expect,  # noqa: E731
                                                            files={"p.yaml": text}, quick=quick,
                                                            cli=name in POLICY_CLI)
    return [
        Case("policy/missing-file", "policy", plan_argv(policy="{tmp}/no-such.yaml")),
        Case("policy/unknown-name", "policy", plan_argv(policy="no-such-policy")),
        Case("policy/empty-name", "policy", plan_argv(policy="")),
        Case("policy/a-directory", "policy", plan_argv(policy="{tmp}/pdir.yaml"), files={"pdir.yaml/": ""}),
        c("empty-file", ""),
        c("not-a-mapping", "- fp32\n- bf16\n", quick=True),
        c("scalar", "hello\n"),
        c("invalid-yaml", "name: [unclosed\n"),
        c("not-utf8", b"name: \xff\xfe\n"),
        c("risk-price-inf", base + "risk_price: .inf\n", quick=True),
        c("risk-price-nan", base + "risk_price: .nan\n"),
        c("risk-price-negative", base + "risk_price: -1\n"),
        c("unknown-field", base + "riskprice: 1.0\n", quick=True),
        c("headroom-fraction-1.5", base + "headroom:\n  fraction: 1.5\n"),
        c("headroom-fraction-negative", base + "headroom:\n  fraction: -0.1\n"),
        c("headroom-bytes-huge", base + "headroom:\n  bytes: 1e30\n"),
        c("headroom-bytes-negative", base + "headroom:\n  bytes: -5\n"),
        c("freeze-max-fraction-2", base + "freeze:\n  embeddings: true\n  max_fraction: 2\n"),
        c("precision-fp8", "name: custom\nprecisions: [fp8]\n"),
        c("precisions-empty", "name: custom\nprecisions: []\n"),
        c("optimizer-bits-4", base + "optimizer_bits: [4]\n"),
        c("bucket-counts-negative", base + "bucketing:\n  counts: [-1]\n"),
        c("tie-tolerance-nan", base + "tie_tolerance: .nan\n"),
        c("max-micro-batch-0", base + "max_micro_batch: 0\n"),
        c("objective-unknown", base + "objective: happiness\n"),
        c("name-missing", "precisions: [fp32]\n", EITHER),
        c("name-not-a-string", "name: [1, 2]\nprecisions: [fp32]\n"),
        c("risk-weight-inf", base + "risk_weights:\n  fp16: .inf\n"),
        c("fallback-not-mapping", base + "fallback: 3\n"),
        c("deep-nesting", "name: custom\nfreeze: " + "[" * 5000 + "]" * 5000 + "\n"),
        Case("policy/train-risk-price-inf", "policy", train_argv(plan=None, vram="1GB", model="{model}",
                                                                  policy="{tmp}/p.yaml"),
             files={"p.yaml": base + "risk_price: .inf\n"}),
    ]


def control_cases() -> list[Case]:
    """Valid inputs: the instrument's own check (each must succeed)."""
    return [
        Case("control/plan", "control", plan_argv(), OK, quick=True),
        Case("control/plan-with-data", "control", plan_argv(data="{data}"), OK),
        Case("control/explain", "control", ("explain", "{plan}"), OK),
        Case("control/train-with-plan", "control", train_argv(), OK, quick=True),
        Case("control/train-with-plan-and-eval", "control", train_argv(eval_data="{val}", max_steps=2), OK),
        Case("control/train-resume", "control", train_argv(output_dir="{tmp}/out", resume=True, checkpoint_every=1,
                                                           max_steps=3), OK, setup=(RESUMABLE,)),
        Case("control/plan-policy-file", "control", plan_argv(policy="{tmp}/p.yaml"), OK,
             files={"p.yaml": "name: custom\nprecisions: [fp32, bf16]\nrisk_price: 0.5\n"}),
    ]


# ---- plan-file mutations ------------------------------------------------------------------------------------

# Which fields the run depends on (vs. reports): missing, they must be refused.
REQUIRED = {"model_id", "model_type", "num_layers", "num_params", "task", "budget_bytes", "device", "policy",
            "headroom_bytes", "knobs", "predicted", "time", "workload", "device.name", "device.kind",
            "device.tflops_fp32", "device.tflops_half", "device.memory_bandwidth_gbs", "workload.lengths",
            "workload.lengths.lengths", "workload.lengths.counts", "predicted.weights", "predicted.gradients",
            "predicted.optimizer_state", "predicted.activations", "predicted.temporaries", "predicted.overhead",
            "predicted.peak_phase", "time.step_seconds", "time.epoch_seconds", "time.samples_per_second"}
OPTIONAL = {"device.memory_bytes", "knobs.tokens_per_micro_batch", "knobs.pad_to_multiple_of", "search",
            "search.space_size", "search.storage", "adapter", "cluster", "cluster.host_memory_bytes",
            "offloaded_bytes", "predicted.gathered", "device.hardware", "device.calibration",
            "device.allocator_reserve_bytes", "device.workspace_bytes", "predicted.context", "predicted.workspace",
            "profile_device_name", "workload.max_length", "search.risk", "alternatives.0.risk"}

# kind -> {mutation: expectation} for the mutations beyond the common ones (type/null/missing/negative/NaN/inf,
# refused for every numeric field: no count, size, time or rate is negative or NaN).
KIND_RULES: dict[str, dict[str, str]] = {
    "budget": {"zero": REFUSE, "one": REFUSE, "huge": REFUSE},
    "params": {"zero": REFUSE, "huge": REFUSE, "off_by_one": EITHER},  # within the head-size tolerance
    "layers": {"zero": REFUSE, "huge": REFUSE, "off_by_one": REFUSE},
    "headroom": {"zero": EITHER, "huge": REFUSE},
    "pred_bytes": {"zero": EITHER, "huge": WARN},  # a predicted peak over the budget
    "dev_bytes": {"zero": EITHER, "huge": WARN},
    "card_bytes": {"zero": EITHER, "huge": EITHER},
    "seconds": {"zero": EITHER, "huge": EITHER},
    "rate": {"zero": EITHER, "huge": EITHER},
    "fraction": {"zero": EITHER, "huge": REFUSE},
    "micro_batch": {"zero": REFUSE, "huge": REFUSE},
    "pred_total": {"off_by_one": REFUSE},  # the JSON's totals must be the sum of the breakdown
    "token_budget": {"zero": REFUSE, "huge": EITHER},
    "pad_multiple": {"zero": REFUSE, "huge": REFUSE, "minus_eight": REFUSE},
    "freeze_layers": {"zero": EITHER, "huge": REFUSE},
    "optimizer_bits": {"zero": REFUSE, "huge": REFUSE, "sixteen": REFUSE},
    "workload_batch": {"zero": REFUSE, "huge": REFUSE},
    "max_length": {"zero": REFUSE, "huge": EITHER},  # a cut past the model's positions is refused by train
    "count_info": {"zero": EITHER, "huge": EITHER},
    "shape_dim": {"zero": EITHER, "huge": EITHER},
    "processes": {"zero": REFUSE, "huge": REFUSE},
    "context": {"zero": EITHER, "huge": REFUSE},  # the context is part of the overhead
}
STRING_RULES: dict[str, dict[str, tuple[Any, str]]] = {  # kind -> {mutation: (value, expectation)}
    "model_id": {"empty": ("", REFUSE), "bogus": ("no-such-org/no-such-model", REFUSE)},
    "model_type": {"empty": ("", REFUSE), "other": ("gpt2", REFUSE)},
    "task": {"empty": ("", REFUSE), "bogus": ("summarization", REFUSE), "causal_lm": ("causal-lm", REFUSE)},
    "device_kind": {"empty": ("", REFUSE), "tpu": ("tpu", REFUSE), "cuda": ("cuda", WARN)},
    "precision": {"empty": ("", REFUSE), "fp8": ("fp8", REFUSE), "bf16": ("bf16", EITHER)},
    "phase": {"bogus": ("sideways", REFUSE)},
    "choice": {"empty": ("", REFUSE), "bogus": ("sideways", REFUSE)},
    "info": {"empty": ("", EITHER), "bogus": ("x" * 10_000, EITHER)},
}
LIST_RULES: dict[str, dict[str, tuple[Any, str]]] = {
    "checkpoint_layers": {"out_of_range": ([5], REFUSE), "negative": ([-1], REFUSE), "unsorted": ([1, 0], REFUSE),
                          "duplicate": ([0, 0], REFUSE), "all": ([0, 1], EITHER), "float": ([0.5], REFUSE)},
    "bucket_boundaries": {"negative_zero": ([-5, 0], REFUSE), "zero": ([0], REFUSE), "empty": ([], EITHER),
                          "unsorted": ([16, 8], REFUSE), "huge": ([10**30], EITHER), "strings": (["a"], REFUSE),
                          "float": ([8.5], REFUSE)},
    "hist": {"empty": ([], REFUSE), "negative": ([-5], REFUSE), "huge": ([10**30], REFUSE), "strings": (["a"], REFUSE)},
    "peak_shape": {"negative": ([-1, -1], REFUSE), "zero": ([0, 0], EITHER), "short": ([1], REFUSE),
                   "long": ([1, 2, 3], REFUSE)},
    "alternatives": {"empty": ([], EITHER), "empty_object": ([{}], REFUSE)},
}

FIELD_KINDS: dict[str, str] = {
    "model_id": "model_id", "model_type": "model_type", "num_layers": "layers", "num_params": "params",
    "task": "task", "budget_bytes": "budget", "policy": "info", "headroom_bytes": "headroom",
    "profile_device": "info", "created": "info",
    "device.name": "info", "device.kind": "device_kind", "device.memory_bytes": "card_bytes",
    "device.supports_bf16": "bool", "device.tflops_fp32": "rate", "device.tflops_half": "rate",
    "device.memory_bandwidth_gbs": "rate", "device.context_bytes": "dev_bytes",
    "device.allocator_reserve_fraction": "fraction", "device.matmul_efficiency": "fraction",
    "knobs.freeze_embeddings": "bool", "knobs.freeze_layers": "freeze_layers",
    "knobs.checkpoint_layers": "checkpoint_layers", "knobs.precision": "precision",
    "knobs.optimizer_bits": "optimizer_bits", "knobs.micro_batch_size": "micro_batch",
    "knobs.tokens_per_micro_batch": "token_budget", "predicted.peak_bytes": "pred_total", "predicted.allocated_bytes": "pred_total",
    "knobs.bucket_boundaries": "bucket_boundaries", "knobs.pad_to_multiple_of": "pad_multiple",
    "predicted.weights": "pred_bytes", "predicted.gradients": "pred_bytes", "predicted.optimizer_state": "pred_bytes",
    "predicted.activations": "pred_bytes", "predicted.temporaries": "pred_bytes", "predicted.overhead": "pred_bytes",
    "predicted.peak_phase": "phase", "predicted.peak_shape": "peak_shape",
    "time.step_seconds": "seconds", "time.epoch_seconds": "seconds", "time.samples_per_second": "rate",
    "time.padding_efficiency": "fraction", "time.measured": "bool",
    "workload.task": "task", "workload.lengths.lengths": "hist", "workload.lengths.counts": "hist",
    "workload.batch_size": "workload_batch", "workload.from_data": "bool", "workload.max_length": "max_length",
    "search.risk": "rate", "alternatives.0.risk": "rate",
    "search.trials": "count_info", "search.seconds": "seconds", "search.space_size": "count_info",
    "search.storage": "info",
    "alternatives": "alternatives", "alternatives.0.peak_bytes": "pred_bytes",
    "alternatives.0.epoch_seconds": "seconds",
    "alternatives.0.changed": "info",
    # adapters and several processes
    "knobs.adapter": "choice", "knobs.base_dtype": "choice", "knobs.lora_targets": "choice",
    "knobs.double_quant": "bool", "knobs.lora_rank": "micro_batch", "knobs.strategy": "choice",
    "knobs.reshard_after_forward": "bool", "knobs.cpu_offload": "bool", "knobs.fsdp_unit_layers": "micro_batch",
    "adapter": "info", "predicted.gathered": "pred_bytes", "offloaded_bytes": "card_bytes",
    "cluster": "info", "cluster.processes": "processes", "cluster.machines": "processes",
    "cluster.interconnect": "choice", "cluster.network": "choice", "cluster.host_memory_bytes": "card_bytes",
    # calibrated GPUs: overhead terms measured on the card, and the card the times were measured on
    "device.hardware": "info", "device.calibration": "info", "device.allocator_reserve_bytes": "dev_bytes",
    "device.workspace_bytes": "dev_bytes", "predicted.context": "context", "predicted.workspace": "pred_bytes",
    "predicted.reserved_bytes": "pred_total", "profile_device_name": "info",
}
# Sections the run is driven by: their fields get the CLI too (the others, reports, through the API only,
# except the NaN/negative mutations, which the CLI checks everywhere).
IN_FORCE = ("model_id", "model_type", "num_layers", "num_params", "task", "budget_bytes", "headroom_bytes",
            "device", "device.kind", "device.context_bytes", "knobs", "knobs.", "workload", "workload.")
QUICK_PLAN_CASES = {"plan/budget_bytes=negative", "plan/budget_bytes=one", "plan/device.kind=tpu",
                    "plan/knobs.bucket_boundaries=negative_zero", "plan/knobs.pad_to_multiple_of=zero",
                    "plan/time.step_seconds=nan", "plan/knobs.micro_batch_size=huge", "plan/task=causal_lm",
                    "plan/file=truncated", "plan/file=not-json", "plan/knobs=extra"}
# Reported (not in-force) fields the CLI checks too: NaN in the times and device rates.
CLI_REPORT_CASES = {"plan/time.step_seconds=nan", "plan/time.padding_efficiency=nan", "plan/device.tflops_fp32=nan",
                    "plan/device.matmul_efficiency=nan", "plan/search.seconds=nan", "plan/time=extra"}
# Mutations one schema check answers for every field alike: the API tries them all, the CLI none.
API_ONLY_MUTATIONS = {"type", "null", "missing", "nan", "inf", "fractional", "int-2", "empty", "strings", "float",
                      "duplicate"}


DERIVED = "step"
"""The plan's step layout: written for readers, derived again from the knobs and workload on load, so any
change to it is ignored (accepting it is right, refusing it is fine too)."""


def _in_force(path: str) -> bool:
    return any(path.startswith(p) if p.endswith(".") else path == p for p in IN_FORCE)


def _kind(path: str) -> str:
    if path in FIELD_KINDS:
        return FIELD_KINDS[path]
    if path.startswith("alternatives.0.knobs."):  # the alternatives' knobs: reports, the same kinds
        return FIELD_KINDS.get("knobs." + path[len("alternatives.0.knobs."):], "info")
    if path.startswith("versions."):
        return "info"
    raise KeyError(f"no kind for plan field {path!r}: add it to FIELD_KINDS")


def _leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """(dotted path, value) of every field, depth first; the first alternative stands for all of them."""
    found: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for key, child in value.items():
            sub = f"{path}.{key}" if path else key
            found.append((sub, child))
            if isinstance(child, dict) or (key == "alternatives" and child):
                found += _leaves(child, sub)
    elif isinstance(value, list) and path == "alternatives":
        found.append(("alternatives.0", value[0]))
        found += _leaves(value[0], "alternatives.0")
    return found


def _set(document: dict, path: str, value: Any) -> dict:
    doc = copy.deepcopy(document)
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    target = doc
    for key in keys[:-1]:
        target = target[key]
    if value is MISSING:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return doc


def _mutations(path: str, value: Any, has_cuda: bool = False) -> list[tuple[str, Any, str]]:
    """(mutation name, new value, expectation) for one field. A plan for a CUDA card trained where there is
    none must at least warn; where there is one it is a plan like any other."""
    in_alternative = path.startswith("alternatives.0")
    optional = path in OPTIONAL or path.replace("alternatives.0.", "", 1) in OPTIONAL or value is None
    out: list[tuple[str, Any, str]] = []
    if path == DERIVED or path.startswith(DERIVED + "."):
        return [("type", "abc", EITHER), ("negative", -1, EITHER), ("null", None, EITHER),
                ("missing", MISSING, EITHER)]
    if isinstance(value, dict):
        out += [("extra", {**value, "unexpected_field": 1}, WARN if _in_force(path) else EITHER),
                ("type", [1, 2], REFUSE),
                ("null", None, EITHER if optional else REFUSE),
                ("missing", MISSING, REFUSE if path in REQUIRED else EITHER)]
        return out
    kind = _kind(path)
    missing = ("missing", MISSING, REFUSE if path in REQUIRED else EITHER)
    null = ("null", None, EITHER if optional else REFUSE)
    if kind == "bool":
        return [("type", "maybe", REFUSE), ("int-2", 2, REFUSE), null, missing]
    if kind in LIST_RULES or isinstance(value, list):
        rules = LIST_RULES.get(kind, {})
        out += [(name, v, EITHER if in_alternative and e == REFUSE and name in ("out_of_range",) else e)
                for name, (v, e) in rules.items()]
        return out + [("type", "abc", REFUSE), null, missing]
    if kind in STRING_RULES:
        rules = STRING_RULES[kind]
        out += [(name, v, EITHER if in_alternative or (name == "cuda" and has_cuda) else e)
                for name, (v, e) in rules.items()]
        return out + [("type", 12345, REFUSE), null, missing]
    # numbers
    rules = KIND_RULES[kind]
    is_int = isinstance(value, int) or kind not in ("seconds", "rate", "fraction")
    huge = 10**30 if is_int else 1e308
    if kind == "micro_batch":
        huge = HUGE_MICRO_BATCH
    special = {"zero": 0, "huge": huge, "one": 1, "minus_eight": -8, "sixteen": 16,
               "off_by_one": (value or 0) + 1}
    for name, expect in rules.items():
        if in_alternative and expect in (REFUSE, WARN) and name in ("huge", "off_by_one", "one"):
            expect = EITHER  # a runner-up's knobs are a report, not what runs
        if in_alternative and name == "zero" and kind in ("micro_batch", "token_budget",
                                                          "pad_multiple", "optimizer_bits"):
            expect = REFUSE  # invalid knobs wherever they are
        out.append((name, special[name], expect))
    out += [("negative", -1 if is_int else -1.5, REFUSE), ("nan", math.nan, REFUSE), ("inf", math.inf, REFUSE),
            ("type", "abc", REFUSE), null, missing]
    if is_int and not optional:
        out.append(("fractional", 1.5, REFUSE))
    return out


def _cli_worthy(path: str, mutation: str, name: str) -> bool:
    """The CLI subset of the plan mutations: the semantic ones (zero, huge, negative where zero is legal, a
    bogus value ...) of the fields the run is driven by, a few reported fields, and the whole-dict extras."""
    if name in QUICK_PLAN_CASES or name in CLI_REPORT_CASES:
        return True
    if not _in_force(path) or mutation in API_ONLY_MUTATIONS:
        return False
    if mutation == "extra":
        return path in ("device", "knobs", "workload")
    if mutation == "negative":  # the zero case checks the same lower bound where zero must be refused
        return KIND_RULES.get(_kind(path), {}).get("zero") != REFUSE
    return True


def plan_cases(valid_plan: dict, has_cuda: bool = False) -> list[Case]:
    """Every field of the valid plan, mutated; then whole-file damage."""
    argv = train_argv(plan="{tmp}/plan.json", max_steps=2)
    cases: list[Case] = []
    for path, value in _leaves(valid_plan):
        for mutation, new, expect in _mutations(path, value, has_cuda):
            name = f"plan/{path}={mutation}"
            text = json.dumps(_set(valid_plan, path, new), indent=1)
            cases.append(Case(name, "plan", argv, expect, files={"plan.json": text},
                              cli=_cli_worthy(path, mutation, name), quick=name in QUICK_PLAN_CASES))
    good = json.dumps(valid_plan, indent=1)
    whole = [
        ("truncated", good[: len(good) // 2], REFUSE),
        ("not-json", "this is not a plan\n", REFUSE),
        ("empty", "", REFUSE),
        ("json-array", "[]", REFUSE),
        ("json-null", "null", REFUSE),
        ("binary", bytes(range(256)), REFUSE),
        ("utf8-bom", "\ufeff" + good, EITHER),
        ("deeply-nested", "[" * 100_000 + "]" * 100_000, REFUSE),
        ("top-level-extra", json.dumps({**valid_plan, "unexpected_field": 1}, indent=1), WARN),
        ("duplicate-key-last-negative", good.replace('"budget_bytes": ', '"budget_bytes": 1024, "budget_bytes": -',
                                                     1), REFUSE),
    ]
    for name, text, expect in whole:
        cases.append(Case(f"plan/file={name}", "plan", argv, expect, files={"plan.json": text},
                          quick=f"plan/file={name}" in QUICK_PLAN_CASES))
    cases.append(Case("plan/file=is-a-directory", "plan", train_argv(plan="{tmp}/plan.json"), files={"plan.json/": ""}))
    cases.append(Case("plan/file=missing", "plan", train_argv(plan="{tmp}/no-such-plan.json")))
    cases.append(Case("plan/explain-truncated", "plan", ("explain", "{tmp}/plan.json"),
                      files={"plan.json": good[: len(good) // 3]}))
    cases.append(Case("plan/explain-negative-budget", "plan", ("explain", "{tmp}/plan.json"),
                      files={"plan.json": json.dumps(_set(valid_plan, "budget_bytes", -1))}))
    return cases


def all_cases(valid_plan: dict, has_cuda: bool = False) -> list[Case]:
    cases = (control_cases() + budget_cases() + model_cases() + data_cases() + option_cases() + policy_cases()
             + plan_cases(valid_plan, has_cuda))
    names = [c.name for c in cases]
    duplicates = {n for n in names if names.count(n) > 1}
    assert not duplicates, duplicates
    return cases
