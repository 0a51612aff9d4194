"""autofit.plots: every picture's numbers are its source's numbers (the memory model's peak, the search's
candidates, the profile's fits, the run's records), and each picture is written; `--plot`/`--pareto` on the CLI;
one-line errors for a path no picture can be written to, or no matplotlib."""

import dataclasses
import sys

import pytest
from typer.testing import CliRunner

import autofit
from autofit import plots
from autofit.api import plan_from_search
from autofit.cli import app
from autofit.devices import get_device
from autofit.knobs import Knobs, Precision
from autofit.memory import predict_peak, step_timeline
from autofit.plan import Plan
from autofit.profiler import Profile
from autofit.profiler import profile as profile_module
from autofit.search import search

from _profiles import make_profile, skewed_workload
from test_api import BERT, make_rows, make_tokenizer, tiny_model
from test_cli import assert_one_line_error

runner = CliRunner()
PNG = b"\x89PNG"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 0 and path.read_bytes()[:4] == PNG


@pytest.fixture(scope="module")
def profile():
    """BERT-base-shaped, built by hand: no model to profile. Its optimizer step has temporaries."""
    return make_profile().model_copy(update={"optimizer_transient_per_param": {"32": 4.0, "8": 1.0}})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny BERT of test_api saved with its tokenizer, for the CLI."""
    root = tmp_path_factory.mktemp("plots") / "tiny-bert"
    tiny_model("bert", "classification", **BERT).save_pretrained(root)
    make_tokenizer().save_pretrained(root)
    return root


# ---- 1. memory over one step ------------------------------------------------------------------------------

KNOB_SETS = [
    dict(),
    dict(checkpoint_layers=tuple(range(12)), micro_batch_size=4),
    dict(freeze_embeddings=True, freeze_layers=4, checkpoint_layers=(5, 7), precision=Precision.bf16),
    dict(optimizer_bits=8, micro_batch_size=2, bucket_boundaries=(64, 128, 512), tokens_per_micro_batch=512),
    dict(freeze_embeddings=True, freeze_layers=11, micro_batch_size=1),  # the optimizer step is the peak
]


@pytest.mark.parametrize("knobs", KNOB_SETS)
@pytest.mark.parametrize("device", ["a10g", "cpu"])
def test_the_timelines_largest_moment_is_the_predicted_peak(profile, knobs, device):
    knobs, spec, workload = Knobs(**knobs), get_device(device), skewed_workload()
    predicted = predict_peak(profile, knobs, workload, spec)
    moments = step_timeline(profile, knobs, workload, spec)
    totals = [m.peak_bytes for _, m in moments]
    peak = totals.index(max(totals))
    assert max(totals) == predicted.peak_bytes  # to the byte
    assert moments[peak][1] == predicted  # the same breakdown, phase and shape
    labels = [label for label, _ in moments]
    assert labels[:3] == ["start", "forward embeddings", "forward layer 0"]
    assert labels[14] == "forward head" and labels[-1] == "optimizer step"
    assert all(m.peak_phase == label.split()[0] for label, m in moments[1:-1])


def test_an_optimizer_step_peak_is_the_timelines_last_moment(profile):
    knobs = Knobs(**KNOB_SETS[-1])
    heavy = profile.model_copy(update={"optimizer_transient_per_param": {"32": 400.0}})
    predicted = predict_peak(heavy, knobs, skewed_workload(), get_device("cpu"))
    assert predicted.peak_phase == "optimizer"
    moments = step_timeline(heavy, knobs, skewed_workload(), get_device("cpu"))
    assert max(m.peak_bytes for _, m in moments) == moments[-1][1].peak_bytes == predicted.peak_bytes


@pytest.mark.parametrize("budget_gb,policy", [(4, "balanced"), (16, "balanced"), (6, "minimal-memory")])
def test_memory_picture_of_a_searched_plan(profile, tmp_path, budget_gb, policy):
    device, workload = get_device("a10g"), skewed_workload()
    found = search(profile, workload, device, budget_gb * 2**30, policy)
    plan = plan_from_search(profile, workload, budget_gb * 2**30, device, found)
    t = plots.memory_timeline(plan, profile)
    assert max(t.totals) == t.totals[t.peak] == plan.predicted.peak_bytes
    assert t.phases[t.peak] == plan.predicted.peak_phase and t.shape == plan.predicted.peak_shape
    assert all(sum(t.parts[p][i] for p in plots.PARTS) == total for i, total in enumerate(t.totals))
    assert t.budget_bytes == plan.budget_bytes and t.limit_bytes == plan.budget_bytes - plan.headroom_bytes
    path = plots.save_memory(plan, profile, tmp_path / "memory.png")
    assert is_png(path)


def test_memory_picture_of_a_plan_for_several_gpus_is_one_process_peak(profile):
    """Each process's share of the step and of the model: the picture showed a whole replica's step."""
    from autofit.cluster import make_cluster

    device, workload, cluster = get_device("a10g"), skewed_workload(), make_cluster(4)
    found = search(profile, workload, device, 2 * 2**30, "balanced", cluster=cluster)
    plan = plan_from_search(profile, workload, 2 * 2**30, device, found, cluster)
    t = plots.memory_timeline(plan, profile)
    assert max(t.totals) == plan.predicted.peak_bytes and t.shape == plan.predicted.peak_shape


def test_a_budget_far_above_the_peak_does_not_flatten_the_memory_picture(profile):
    device, workload = get_device("a10g"), skewed_workload()
    found = search(profile, workload, device, 80 * 2**30, "balanced")
    t = plots.memory_timeline(plan_from_search(profile, workload, 80 * 2**30, device, found), profile)
    assert t.budget_bytes > 3 * max(t.totals)
    ax = plots.draw_memory(t).axes[0]
    assert "budget 80.0 GB (off the scale)" in ax.get_title()
    assert not [line for line in ax.lines if "budget" in line.get_label()]  # no line far above the bars


# ---- 2. the search's candidates ---------------------------------------------------------------------------


def test_pareto_points_are_the_searchs_candidates(profile, tmp_path):
    device, workload = get_device("a10g"), skewed_workload()
    found = search(profile, workload, device, 6 * 2**30, "balanced")
    plan = plan_from_search(profile, workload, 6 * 2**30, device, found)
    p = plots.pareto_points(plan, found)
    assert len({c.knobs for c in found.evaluated}) == len(found.evaluated) == len(p.peaks)  # each once
    assert p.peaks == [c.peak_bytes for c in found.evaluated]
    assert p.epoch_seconds == [c.epoch_seconds for c in found.evaluated]
    assert {c.knobs for c in [found.best, *found.ranked]} <= {c.knobs for c in found.evaluated}
    assert not all(p.fits) and p.fits == [peak <= 6 * 2**30 - plan.headroom_bytes for peak in p.peaks]
    assert p.chosen == (plan.predicted.peak_bytes, plan.time.epoch_seconds)
    assert p.chosen in zip(p.peaks, p.epoch_seconds)
    assert p.alternatives == [(a.peak_bytes, a.epoch_seconds) for a in plan.alternatives]
    # what the figure holds: every candidate once (fits and not), the alternatives, the chosen plan
    fig = plots.draw_pareto(p)
    scattered = [len(c.get_offsets()) for c in fig.axes[0].collections]
    assert scattered == [sum(p.fits), len(p.fits) - sum(p.fits), len(p.alternatives), 1]
    assert is_png(plots.save_pareto(plan, found, tmp_path / "pareto.png"))


def test_plan_cli_draws_both_pictures_and_keeps_the_json(model_dir, tmp_path):
    memory, pareto = tmp_path / "memory.png", tmp_path / "pareto.png"
    result = invoke("plan", "--model", model_dir, "--vram", "2GB", "--json", "--plot", memory, "--pareto", pareto)
    assert result.exit_code == 0, result.output
    Plan.model_validate_json(result.stdout)  # stdout is still only the plan
    assert is_png(memory) and is_png(pareto)


# ---- 3. a profile -----------------------------------------------------------------------------------------


def test_profile_picture_shows_the_profiles_numbers(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(profile_module, "TIME_SHAPES", ((1, 8), (2, 8), (1, 16), (2, 16)))  # time small shapes
    path = tmp_path / "layers.png"
    result = invoke("profile", "--model", model_dir, "--seq-len", "64", "--json", "--plot", path)
    assert result.exit_code == 0, result.output
    assert is_png(path)
    profile = Profile.model_validate_json(result.stdout)  # what the picture was drawn from, timed
    bars = plots.layer_bars(profile, seq=64)
    embeddings, layer, head = profile.blocks
    assert bars.names == ["embeddings", "layer 0", "layer 1", "layer 2", "head"]
    assert bars.weights == [embeddings.param_bytes] + [layer.param_bytes] * 3 + [head.param_bytes]
    assert bars.optimizer_state == [8 * b.numel for b in (embeddings, layer, layer, layer, head)]
    assert bars.activations[1] == layer.activations["fp32"].at(1).saved(1, 64)
    assert bars.forward_seconds[2] == layer.time["fp32"].forward(1, 64) > 0
    assert bars.backward_seconds[0] == embeddings.time["fp32"].backward(1, 64)
    untimed = profile.model_copy(update={"blocks": [b.model_copy(update={"time": {}}) for b in profile.blocks]})
    assert plots.layer_bars(untimed, 64).forward_seconds is None


# ---- 4. a training run ------------------------------------------------------------------------------------


def test_training_curves_are_the_runs_records(tmp_path, monkeypatch):
    monkeypatch.setattr(profile_module, "TIME_SHAPES", ((1, 8), (2, 8), (1, 16), (2, 16)))
    tok, rows = make_tokenizer(), make_rows(24, max_words=12)
    result = autofit.train(tiny_model("bert", "classification", **BERT), rows, budget="1GB", tokenizer=tok,
                           epochs=2, batch_size=8, eval_data=make_rows(8, seed=1), quiet=True)
    c = plots.training_curves(result)
    assert c.steps == [r.step for r in result.history] == list(range(1, 7))
    assert c.losses == [r.loss for r in result.history]
    assert c.eval_steps == [e.step for e in result.eval] == [3, 6]
    assert c.eval_losses == [e.loss for e in result.eval]
    assert c.measured_peak_bytes == result.measured_peak_bytes > 0
    assert c.predicted_allocated_bytes == result.predicted_allocated_bytes
    assert c.budget_bytes == result.budget_bytes == 2**30
    fig = plots.draw_training(c)
    assert list(fig.axes[0].lines[0].get_ydata()) == c.losses
    short = plots.draw_training(dataclasses.replace(c, steps=[1, 2], losses=c.losses[:2], eval_steps=[],
                                                    eval_losses=[]))
    short.canvas.draw()
    assert all(float(t).is_integer() for t in short.axes[0].get_xticks())  # no step 1.2: steps are whole
    assert is_png(result.plot(tmp_path / "curves.png"))


def test_train_cli_draws_the_curves(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(profile_module, "TIME_SHAPES", ((1, 8), (2, 8), (1, 16), (2, 16)))
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(f'{{"text": "{r["text"]}", "label": {r["label"]}}}' for r in make_rows(16)))
    path = tmp_path / "curves.png"
    result = invoke("train", "--vram", "1GB", "--model", model_dir, "--data", data, "--batch-size", "4",
                    "--max-steps", "2", "--quiet", "--plot", path)
    assert result.exit_code == 0, (result.output, result.exception)
    assert is_png(path) and f"saved to {path}" in result.stdout.replace("\n", "")


# ---- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["plan", "pareto", "profile", "train"])
@pytest.mark.parametrize("where,says", [("missing/x.png", "does not exist"), ("x.txt", "a picture's name ends"),
                                        (".", "it is a folder")])
def test_a_picture_that_cannot_be_written_is_one_line_before_any_work(command, where, says, model_dir, tmp_path,
                                                                      monkeypatch):
    path = tmp_path / where
    args = {"plan": ["plan", "--model", model_dir, "--vram", "2GB", "--plot", path],
            "pareto": ["plan", "--model", model_dir, "--vram", "2GB", "--pareto", path],
            "profile": ["profile", "--model", model_dir, "--plot", path],
            "train": ["train", "--vram", "1GB", "--model", model_dir, "--data", tmp_path / "none.jsonl",
                      "--plot", path]}[command]
    monkeypatch.setattr(autofit.api, "cached_profile", None)  # any work would fail otherwise
    monkeypatch.setattr(autofit.profiler, "profile_model", None)
    line = assert_one_line_error(invoke(*args))
    assert f"cannot draw to {path}" in line and says in line


def test_without_matplotlib_a_picture_is_one_line_naming_the_extra(model_dir, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    line = assert_one_line_error(invoke("plan", "--model", model_dir, "--vram", "2GB", "--plot", tmp_path / "m.png"))
    assert line == "error: pictures need matplotlib, which is not installed: pip install 'autofit[plot]'"
    with pytest.raises(ImportError, match="autofit\\[plot\\]"):
        plots.draw_pareto(plots.ParetoPoints([1], [1.0], [True], (1, 1.0), [], 2, 2))
    # without a picture asked for, nothing needs it
    assert invoke("plan", "--model", model_dir, "--vram", "2GB", "--json").exit_code == 0
