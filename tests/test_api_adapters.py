"""Asking for adapters: `adapter=` in autofit.plan / plan_and_search / train and `--adapter` on the CLI's plan
and train (auto: the policy decides; none: full fine-tuning only; lora: adapter plans only), their one-line
errors, and the issue's done-when plans for Llama-2-7B."""

import json

import pytest
from typer.testing import CliRunner

import autofit
from autofit import api
from autofit.cli import app
from autofit.plan import Plan
from autofit.policy import PolicyError
from autofit.policy import load_policy
from autofit.search import NoPlanFitsError, search
from autofit.techniques import adapter
from autofit.training import replan_for_data
from autofit.profiler import profile_model

from _tiny import make_plan, short_model, token_data

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code=1) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def bert():
    return short_model("bert", "classification")


@pytest.fixture(scope="module")
def profile(bert):
    return profile_model(bert, task="classification")


@pytest.fixture(scope="module")
def with_fits(bert):
    """The profile with LoRA fits, as the profiler measures them."""
    return profile_model(bert, task="classification", adapters=True)


# ---- the API ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["plan", "plan_and_search"])
def test_a_bad_adapter_is_one_line_before_any_work(bert, call, monkeypatch):
    monkeypatch.setattr(api, "cached_profile", lambda *a, **k: pytest.fail("profiled before checking"))
    with pytest.raises(ValueError, match="^adapter must be one of auto, none, lora, not 'qlora'$"):
        getattr(api, call)(bert, "1GB", seq_len=32, batch_size=8, device="cpu", adapter="qlora")


def test_adapter_lora_gives_an_adapter_plan_that_round_trips(bert, with_fits, tmp_path):
    plan = autofit.plan(bert, "2GB", seq_len=32, batch_size=8, device="cpu", profile=with_fits, adapter="lora")
    assert plan.knobs.adapter == "lora" and not plan.knobs.freeze_embeddings
    assert plan.adapter is not None and plan.adapter.trainable_params > 0
    assert plan.adapter.base_linear_params == sum(x.numel for x in with_fits.block("layer").linears) * 2
    assert Plan.load(plan.save(tmp_path / "plan.json")) == plan
    assert all(a.knobs.adapter == "lora" for a in plan.alternatives)


def test_adapter_none_searches_full_fine_tuning_only(bert, with_fits):
    planned = api.plan_and_search(bert, "2GB", seq_len=32, batch_size=8, device="cpu", profile=with_fits,
                                      adapter="none", policy="adapters")
    assert all(c.knobs.adapter == "none" for c in planned.search.evaluated)
    assert planned.plan.adapter is None


def test_adapter_auto_lets_the_policy_decide(bert, with_fits):
    evaluated = api.plan_and_search(bert, "2GB", seq_len=32, batch_size=8, device="cpu", profile=with_fits,
                                        policy="balanced").search.evaluated
    assert {c.knobs.adapter for c in evaluated} == {"none", "lora"}  # balanced: both compete
    planned = api.plan_and_search(bert, "2GB", seq_len=32, batch_size=8, device="cpu", profile=with_fits,
                                      policy="quality-first")
    assert {c.knobs.adapter for c in planned.search.evaluated} == {"none"}  # full fine-tuning fits: no adapters


def test_adapter_lora_on_a_profile_without_fits_is_one_line(bert, profile):
    with pytest.raises(PolicyError, match="no LoRA fits") as info:
        autofit.plan(bert, "2GB", seq_len=32, batch_size=8, device="cpu", profile=profile, adapter="lora")
    assert "\n" not in str(info.value)


def test_lora_fits_are_measured_only_when_adapters_could_win(bert, profile, with_fits, monkeypatch):
    """Measuring the adapters' fits is most of a cold profile: full fine-tuning is searched on a plain profile
    first, and the fits are measured only for adapter-only choices, when nothing fits, or when the time
    model says an adapter plan could score better (search/adapter_bound.py)."""
    asked = []

    def spy(model, **kwargs):
        asked.append(kwargs["adapters"])
        return with_fits if kwargs["adapters"] else profile

    monkeypatch.setattr(api, "cached_profile", spy)

    def ask(budget, policy, adapter):
        asked.clear()
        plan = autofit.plan(bert, budget, seq_len=32, batch_size=8, device="cpu", policy=policy, adapter=adapter)
        return asked, plan.knobs.adapter

    assert ask("1GB", "balanced", "none") == ([False], "none")
    assert ask("1GB", "quality-first", "auto") == ([False], "none")  # full fine-tuning fits: no adapters
    assert ask("1GB", "quality-first", "lora") == ([True], "lora")
    # below the smallest full fine-tuning plan quality-first allows (under the 1 MB floor of a user's budget)
    policy, workload, cpu = load_policy("quality-first"), api.make_workload(
        "classification", seq_len=32, batch_size=8, lengths=None), api.target_device("cpu")
    with pytest.raises(NoPlanFitsError) as info:
        search(profile, workload, cpu, 2**16, policy.with_adapter("none"))
    asked.clear()
    fitted, found = api._search_lazily(bert, profile, workload, cpu, info.value.peak_bytes, policy,
                                       measure=True)
    assert asked == [True] and fitted is with_fits and found.best.knobs.adapter == "lora"
    calls, chosen = ask("1GB", "balanced", "auto")
    assert calls[0] is False and len(calls) <= 2 and (chosen == "none" or calls == [False, True])


def test_a_plan_file_edited_to_another_rank_reports_the_adapters_it_trains(bert, with_fits):
    """Training predicts an edited plan's peak again from its knobs; its adapter summary (what `explain` and
    the run's summary print) follows them too, not the file's figures for the rank it was made with."""
    plan = autofit.plan(bert, "2GB", seq_len=32, batch_size=8, device="cpu", profile=with_fits, adapter="lora")
    rank = 4 if plan.knobs.lora_rank != 4 else 8
    edited = plan.model_copy(update={"knobs": plan.knobs.model_copy(update={"lora_rank": rank})})
    replanned = replan_for_data(edited, with_fits, [32] * 16, 32)
    model = short_model("bert", "classification")
    adapter.prepare(model, edited.knobs, "classification", precision_dtype=None)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert replanned.adapter.trainable_params == trained != plan.adapter.trainable_params


def test_train_refuses_an_adapter_choice_its_plan_did_not_make(bert):
    plan = make_plan(bert)
    with pytest.raises(ValueError, match="made with adapter=none, not lora"):
        autofit.train(bert, token_data(), plan=plan, adapter="lora")
    with pytest.raises(ValueError, match="adapter must be one of"):
        autofit.train(bert, token_data(), budget="1GB", adapter="yes")


def test_a_lora_run_says_the_model_it_was_given_now_holds_adapters(caplog):
    """peft wraps the model it is given in place: saving that object with save_pretrained writes peft's keys,
    which transformers then loads as missing weights. The run says so, and how to save instead."""
    model = short_model("bert", "classification")
    with caplog.at_level("INFO", logger="autofit"):
        result = autofit.train(model, token_data(), budget="1GB", adapter="lora", max_steps=1, quiet=True,
                               device="cpu")
    assert result.plan.knobs.adapter == "lora"
    assert "BertForSequenceClassification you passed now holds peft's LoRA layers" in caplog.text
    assert "not with model.save_pretrained" in caplog.text


# ---- the CLI ------------------------------------------------------------------------------------------------


def test_cli_adapter_flag_errors_are_one_line(tmp_path):
    line = one_line_error(invoke("plan", "--model", "bert-base-uncased", "--vram", "16GB", "--adapter", "qlora"))
    assert "adapter must be one of auto, none, lora, not 'qlora'" in line
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"text": "a b", "label": 1}) + "\n")
    line = one_line_error(invoke("train", "--model", "bert-base-uncased", "--vram", "16GB", "--data", data,
                                 "--adapter", "LoRA"))
    assert "not 'LoRA'" in line


def test_cli_adapter_none_plans_full_fine_tuning():
    result = invoke("plan", "--model", "bert-base-uncased", "--vram", "16GB", "--adapter", "none", "--json")
    assert result.exit_code == 0, result.output
    plan = Plan.model_validate_json(result.stdout)
    assert plan.knobs.adapter == "none" and plan.adapter is None


def test_cli_adapter_lora_plans_adapters():
    result = invoke("plan", "--model", "bert-base-uncased", "--vram", "16GB", "--adapter", "lora", "--json")
    assert result.exit_code == 0, result.output
    plan = Plan.model_validate_json(result.stdout)
    assert plan.knobs.adapter == "lora" and plan.adapter is not None


# ---- done when (issue 9) --------------------------------------------------------------------------------------

LLAMA = "meta-llama/Llama-2-7b-hf"


@pytest.mark.parametrize("vram", ["16GB", "8GB"])
def test_llama_2_7b_fits_a_small_card_with_an_adapter_plan(vram):
    result = invoke("plan", "--model", LLAMA, "--vram", vram, "--json")
    assert result.exit_code == 0, result.output
    plan = Plan.model_validate_json(result.stdout)
    assert plan.knobs.adapter == "lora"
    assert plan.predicted.peak_bytes <= plan.budget_bytes - plan.headroom_bytes
    shown = invoke("plan", "--model", LLAMA, "--vram", vram)
    assert "at 4 bits" in shown.stdout or plan.knobs.base_dtype != "nf4"


def test_llama_2_7b_on_80_gb_prefers_full_fine_tuning_under_quality_first():
    """quality-first trains adapters only when no full fine-tuning plan fits. (balanced weighs speed against
    risk: on 80 GB a 7B model's full fine-tuning needs 8-bit states and checkpointing, and LoRA may win.)"""
    result = invoke("plan", "--model", LLAMA, "--vram", "80GB", "--policy", "quality-first", "--json")
    assert result.exit_code == 0, result.output
    assert Plan.model_validate_json(result.stdout).knobs.adapter == "none"
