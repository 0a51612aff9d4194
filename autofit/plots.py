"""Pictures of a plan's step, its search, a profile and a training run (matplotlib: `pip install 'autofit[plot]'`).

Each picture has a pure "gather" function returning the numbers it shows, taken from the plan, search, profile or
result as they are, and a "draw" function that turns them into a matplotlib Figure; `save_*` does both and
writes the file. matplotlib is imported only to draw, on its Agg canvas: no window opens, and the caller's
pyplot backend is left as it was."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from autofit.budget import format_bytes
from autofit.memory import step_timeline
from autofit.paths import unwritable_reason
from autofit.techniques.optimizer import state_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from autofit.api import Planned
    from autofit.executor.result import TrainResult
    from autofit.plan import Plan
    from autofit.profiler.schema import Profile
    from autofit.search import SearchResult

INSTALL = "pip install 'autofit[plot]'"
PARTS = ("weights", "gradients", "optimizer_state", "activations", "temporaries", "workspace", "overhead")
"""What holds memory, bottom to top of a stack (MemoryBreakdown's fields)."""
COLORS = dict(weights="#4c72b0", gradients="#dd8452", optimizer_state="#55a868", activations="#c44e52",
              temporaries="#8172b3", workspace="#da8bc3", overhead="#937860")
DPI = 90  # small files: the README's pictures are committed


class PlotsUnavailableError(ImportError, ValueError):
    """matplotlib is not installed: an ImportError to Python callers, bad input (one line, exit 1) to the CLI."""


def _figure(width: float, height: float, columns: int = 1) -> tuple[Figure, list]:
    """A Figure on the Agg canvas, and its axes side by side."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotsUnavailableError(f"pictures need matplotlib, which is not installed: {INSTALL}") from None
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, columns, squeeze=False)[0])


def check_paths(*paths: str | os.PathLike | None) -> None:
    """A one-line error unless a picture can be written at each path given (None: no picture asked for).
    The CLI checks before any work is done: a training run should not end in a missing folder."""
    for path in (Path(p) for p in paths if p is not None):
        formats = _figure(1, 1)[0].canvas.get_supported_filetypes()  # matplotlib is there
        reason = unwritable_reason(path)
        if reason is not None:
            raise ValueError(f"cannot draw to {path}: {reason}")
        if path.suffix.lstrip(".").lower() not in formats:
            raise ValueError(f"cannot draw to {path}: a picture's name ends in .{', .'.join(sorted(formats))}")


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    check_paths(path)
    fig.savefig(path)
    return Path(path)


def _stack(ax, labels: list[str], parts: dict[str, list[float]], size: float) -> None:
    """Stacked bars, one per label, of each part (in PARTS order) that is not all zero, in units of `size`."""
    bottom = [0.0] * len(labels)
    for part in (p for p in PARTS if any(parts.get(p, ()))):
        values = [v / size for v in parts[part]]
        ax.bar(range(len(labels)), values, bottom=bottom, width=0.85, color=COLORS[part], label=part.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)


def _unit(largest: float) -> tuple[float, str]:
    """The unit format_bytes would print `largest` in: (bytes per unit, name)."""
    return next(((size, unit) for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10))
                 if largest >= size), (1, "B"))


@dataclass
class MemoryTimeline:
    """Predicted bytes live over one training step of the plan's peak micro-batch, moment by moment."""

    labels: list[str]
    """"start", "forward embeddings", "forward layer 0", ..., "backward layer 0", "optimizer step"."""
    phases: list[str]
    """Each moment's phase: forward, backward or optimizer."""
    parts: dict[str, list[int]]
    """Bytes by what holds them (PARTS), one value per moment."""
    totals: list[int]
    """Every part together, per moment: the largest is the plan's predicted peak."""
    peak: int
    """Index of the peak moment (the first of equal totals)."""
    shape: tuple[int, int]
    """(micro-batch, padded length) of the micro-batch replayed."""
    budget_bytes: int
    limit_bytes: int
    """budget - headroom: what the search made the peak fit under."""


def memory_timeline(plan: Plan, profile: Profile) -> MemoryTimeline:
    """The memory model's moments (autofit.memory.step_timeline) for `plan`'s knobs, workload, device and
    processes (each one's share of the step and of the model)."""
    moments = step_timeline(profile, plan.knobs, plan.workload, plan.device, plan.cluster)
    totals = [m.peak_bytes for _, m in moments]
    return MemoryTimeline(
        labels=[label for label, _ in moments], phases=[m.peak_phase for _, m in moments],
        parts={part: [getattr(m, part) for _, m in moments] for part in PARTS}, totals=totals,
        peak=totals.index(max(totals)), shape=moments[0][1].peak_shape, budget_bytes=plan.budget_bytes,
        limit_bytes=plan.budget_bytes - plan.headroom_bytes)


def draw_memory(t: MemoryTimeline) -> Figure:
    """Stacked bars, one per moment, with the budget, the headroom line and the peak marked."""
    fig, (ax,) = _figure(10, 4.8)
    peak = t.totals[t.peak]
    budget_shown = t.budget_bytes <= 3 * peak  # a far larger budget would flatten the bars
    size, unit = _unit(max(t.budget_bytes if budget_shown else 0, *t.totals))
    _stack(ax, t.labels, t.parts, size)
    title = f"predicted memory over one training step (micro-batch {t.shape[0]} x {t.shape[1]} tokens)"
    if budget_shown:
        ax.axhline(t.budget_bytes / size, color="black", lw=1.2, label=f"budget {format_bytes(t.budget_bytes)}")
        ax.axhline(t.limit_bytes / size, color="black", lw=1, ls="--",
                   label=f"budget - headroom {format_bytes(t.limit_bytes)}")
    else:
        title += f"\nbudget {format_bytes(t.budget_bytes)} (off the scale)"
    ax.annotate(f"peak {format_bytes(peak)}\n{t.labels[t.peak]}", (t.peak, peak / size),
                xytext=(0, 18), textcoords="offset points", ha="center", fontsize=8,
                arrowprops=dict(arrowstyle="->"))
    ax.set_xlim(-0.6, len(t.labels) - 0.4)
    ax.set_ylim(0, max(t.budget_bytes if budget_shown else 0, peak) / size * 1.18)
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", ncols=2)
    return fig


def save_memory(plan: Plan, profile: Profile, path: str | os.PathLike) -> Path:
    return _save(draw_memory(memory_timeline(plan, profile)), path)


@dataclass
class ParetoPoints:
    """Predicted (peak bytes, epoch seconds) of every configuration a search evaluated."""

    peaks: list[int]
    epoch_seconds: list[float]
    fits: list[bool]
    """Whether each fits under budget - headroom."""
    chosen: tuple[int, float]
    """The plan's own (peak, epoch seconds)."""
    alternatives: list[tuple[int, float]]
    """The plan's alternatives, as `autofit plan` lists them."""
    budget_bytes: int
    limit_bytes: int


def pareto_points(plan: Plan, search: SearchResult) -> ParetoPoints:
    points = search.evaluated
    limit = plan.budget_bytes - plan.headroom_bytes
    return ParetoPoints(
        peaks=[c.peak_bytes for c in points], epoch_seconds=[c.epoch_seconds for c in points],
        fits=[c.peak_bytes <= limit for c in points],
        chosen=(plan.predicted.peak_bytes, plan.time.epoch_seconds),
        alternatives=[(a.peak_bytes, a.epoch_seconds) for a in plan.alternatives],
        budget_bytes=plan.budget_bytes, limit_bytes=limit)


def draw_pareto(p: ParetoPoints) -> Figure:
    """Epoch time against peak memory; the budget lines, the chosen plan and its alternatives marked."""
    fig, (ax,) = _figure(7, 4.8)
    size, unit = _unit(max(p.budget_bytes, *p.peaks))
    for fits, color, label in ((True, "#4c72b0", "fits"), (False, "#b0b0b0", "does not fit")):
        xs = [peak / size for peak, ok in zip(p.peaks, p.fits) if ok == fits]
        ys = [s for s, ok in zip(p.epoch_seconds, p.fits) if ok == fits]
        ax.scatter(xs, ys, s=12, color=color, label=f"{label} ({len(xs)})", zorder=2)
    if p.alternatives:
        ax.scatter([a / size for a, _ in p.alternatives], [s for _, s in p.alternatives], s=70,
                   marker="D", facecolors="none", edgecolors="#dd8452", lw=1.5, label="alternatives", zorder=3)
    ax.scatter([p.chosen[0] / size], [p.chosen[1]], s=220, marker="*", color="#c44e52", label="chosen plan",
               zorder=4)
    ax.axvline(p.budget_bytes / size, color="black", lw=1.2, label=f"budget {format_bytes(p.budget_bytes)}")
    ax.axvline(p.limit_bytes / size, color="black", lw=1, ls="--", label="budget - headroom")
    ax.set_yscale("log")  # the slowest configurations are many times the fastest
    ax.set_xlabel(f"predicted peak ({unit})")
    ax.set_ylabel("predicted epoch time (s)")
    ax.set_title(f"{len(p.peaks)} configurations the search evaluated")
    ax.legend(fontsize=7)
    return fig


def save_pareto(plan: Plan, search: SearchResult, path: str | os.PathLike) -> Path:
    return _save(draw_pareto(pareto_points(plan, search)), path)


@dataclass
class LayerBars:
    """A profile's numbers for each block the model runs (layers repeated), at one micro-batch shape."""

    names: list[str]
    weights: list[int]
    optimizer_state: list[int]
    """32-bit AdamW state of the block's parameters."""
    activations: list[float]
    """Bytes the block saves for backward when everything trains (Profile's `saved` fit)."""
    forward_seconds: list[float] | None
    backward_seconds: list[float] | None
    """Measured times; None when the profile was not timed at `precision`."""
    batch: int
    seq: int
    precision: str


def layer_bars(profile: Profile, seq: int, batch: int = 1, precision: str = "fp32") -> LayerBars:
    blocks = [(b, f"{b.name} {i}" if b.count > 1 else b.name) for b in profile.blocks for i in range(b.count)]
    timed = all(precision in b.time for b, _ in blocks)
    return LayerBars(
        names=[name for _, name in blocks], weights=[b.param_bytes for b, _ in blocks],
        optimizer_state=[state_bytes(b.param_numels, b.embedding_numels, 32) for b, _ in blocks],
        activations=[b.activations[precision].at(batch).saved(batch, seq) for b, _ in blocks],
        forward_seconds=[b.time[precision].forward(batch, seq) for b, _ in blocks] if timed else None,
        backward_seconds=[b.time[precision].backward(batch, seq) for b, _ in blocks] if timed else None,
        batch=batch, seq=seq, precision=precision)


def draw_layers(bars: LayerBars) -> Figure:
    """Bytes per block (stacked) beside forward and backward time per block."""
    fig, (left, right) = _figure(11, 4.2, columns=2)
    stacks = dict(weights=bars.weights, optimizer_state=bars.optimizer_state, activations=bars.activations)
    size, unit = _unit(max(map(sum, zip(*stacks.values()))))
    _stack(left, bars.names, stacks, size)
    left.set_ylabel(unit)
    left.set_title(f"bytes per block ({bars.precision} activations at {bars.batch} x {bars.seq} tokens)", fontsize=9)
    left.legend(fontsize=7)
    if bars.forward_seconds is not None and bars.backward_seconds is not None:
        forward, backward = [s * 1e3 for s in bars.forward_seconds], [s * 1e3 for s in bars.backward_seconds]
        right.bar(range(len(forward)), forward, color="#4c72b0", label="forward")
        right.bar(range(len(forward)), backward, bottom=forward, color="#dd8452", label="backward")
        right.set_ylim(0, 1.2 * max(f + b for f, b in zip(forward, backward)))  # room for the legend
        right.legend(fontsize=7, ncols=2, loc="upper left")
    else:
        right.text(0.5, 0.5, "not timed", ha="center", va="center", transform=right.transAxes)
    right.set_ylabel("ms")
    right.set_title(f"measured time per block ({bars.precision}, {bars.batch} x {bars.seq} tokens)", fontsize=9)
    right.set_xticks(range(len(bars.names)), bars.names, rotation=90, fontsize=7)
    return fig


def save_layers(profile: Profile, path: str | os.PathLike, seq: int, batch: int = 1) -> Path:
    return _save(draw_layers(layer_bars(profile, seq, batch)), path)


@dataclass
class TrainingCurves:
    """A run's losses and its measured peak beside the predicted one."""

    steps: list[int]
    losses: list[float]
    """Training loss of each optimizer step (TrainResult.history)."""
    eval_steps: list[int]
    eval_losses: list[float]
    """Evaluation loss at the end of each epoch (TrainResult.eval), if any."""
    measured_peak_bytes: int | None
    predicted_allocated_bytes: int
    """The plan's prediction (its bound over any step) to compare with the measured peak: without the device
    overhead, as measured."""
    budget_bytes: int
    run_predicted_allocated_bytes: int | None = None
    """The prediction for this run's own micro-batches, when there is one."""


def training_curves(result: TrainResult) -> TrainingCurves:
    return TrainingCurves(
        steps=[r.step for r in result.history], losses=[r.loss for r in result.history],
        eval_steps=[e.step for e in result.eval], eval_losses=[e.loss for e in result.eval],
        measured_peak_bytes=result.measured_peak_bytes, predicted_allocated_bytes=result.predicted_allocated_bytes,
        run_predicted_allocated_bytes=result.run_predicted_allocated_bytes, budget_bytes=result.budget_bytes)


def draw_training(c: TrainingCurves) -> Figure:
    """Loss per step (and eval loss) beside the predicted and measured peaks under the budget."""
    fig, (left, right) = _figure(10, 4, columns=2)
    left.plot(c.steps, c.losses, color="#4c72b0", lw=1.2, label="training loss")
    if c.eval_steps:
        left.plot(c.eval_steps, c.eval_losses, "o--", color="#c44e52", label="eval loss")
    left.set_xlabel("optimizer step")
    from matplotlib.ticker import MaxNLocator  # _figure has checked matplotlib is there

    left.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 1.2, 1.4 on a short run
    left.set_ylabel("loss")
    left.legend(fontsize=8)
    bars = {"predicted": c.predicted_allocated_bytes}
    if c.run_predicted_allocated_bytes is not None:
        bars = {"any step": c.predicted_allocated_bytes, "this run": c.run_predicted_allocated_bytes}
    if c.measured_peak_bytes is not None:
        bars["measured"] = c.measured_peak_bytes
    budget_shown = c.budget_bytes <= 3 * max(bars.values())  # a far larger budget would flatten the bars
    size, unit = _unit(max(c.budget_bytes if budget_shown else 0, *bars.values()))
    colors = ["#8172b3", "#b3a6d9", "#55a868"][-len(bars):] if "measured" in bars else ["#8172b3", "#b3a6d9"]
    right.bar(list(bars), [v / size for v in bars.values()], color=colors[:len(bars)], width=0.5)
    for i, value in enumerate(bars.values()):
        right.text(i, value / size, format_bytes(value), ha="center", va="bottom", fontsize=8)
    title = "peak memory (allocated)"
    if budget_shown:
        right.axhline(c.budget_bytes / size, color="black", lw=1.2, label=f"budget {format_bytes(c.budget_bytes)}")
        right.legend(fontsize=8)
    else:
        title += f", budget {format_bytes(c.budget_bytes)} (off the scale)"
    right.set_ylabel(unit)
    right.set_title(title, fontsize=9)
    return fig


def save_training(result: TrainResult, path: str | os.PathLike) -> Path:
    return _save(draw_training(training_curves(result)), path)


def save_plan_pictures(found: Planned, plot: Path | None, pareto: Path | None) -> list[Path]:
    """`autofit plan --plot/--pareto`: the pictures asked for, drawn."""
    drawn = [save_memory(found.plan, found.profile, plot)] if plot is not None else []
    return drawn + ([save_pareto(found.plan, found.search, pareto)] if pareto is not None else [])
