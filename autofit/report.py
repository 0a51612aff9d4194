"""Format plans and profiles for people (rich tables). Gathering numbers happens elsewhere; this only prints."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Group
from rich.table import Table
from rich.text import Text

from autofit.budget import format_bytes
from autofit.calibration import Calibration
from autofit.knobs import Knobs
from autofit.plan import AdapterWeights, Alternative, Plan, Technique
from autofit.profiler.schema import Profile
from autofit.techniques.accumulation import process_batch_size

if TYPE_CHECKING:
    from autofit.executor.result import TrainResult


def _seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.1f} s"


def _span(ids: tuple[int, ...]) -> str:
    """e.g. "0-3", "1,4", "2"."""
    if len(ids) > 1 and list(ids) == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))


def describe_adapter(k: Knobs) -> str:
    """e.g. "LoRA rank 16 on all linear layers, 4-bit NF4 base (double quantization)", or "full fine-tuning"."""
    if k.adapter == "none":
        return "full fine-tuning"
    targets = "all linear layers" if k.lora_targets == "all-linear" else "the attention projections"
    base = f"{k.base_dtype} base"
    if k.quantized:
        base = "4-bit NF4 base" + (" (double quantization)" if k.double_quant else "")
    return f"LoRA rank {k.lora_rank} on {targets}, {base}"


def describe_sharding(k: Knobs, processes: int = 1) -> str:
    """e.g. "FSDP: shards over 4 processes, 1 layer per unit, CPU offload", or "DDP replicas"."""
    if k.strategy == "ddp":
        return "one process" if processes == 1 else f"DDP: a full replica on each of {processes} processes"
    unit = f"{k.fsdp_unit_layers} layer{'s' if k.fsdp_unit_layers > 1 else ''} per unit"
    extras = [unit] + (["units kept gathered from forward to backward"] if not k.reshard_after_forward else []) \
        + (["shards offloaded to CPU RAM"] if k.cpu_offload else [])
    return f"FSDP2: weights, gradients and AdamW state sharded over {processes} processes, " + ", ".join(extras)


def describe_knobs(k: Knobs, num_layers: int, processes: int = 1, share: int | None = None) -> dict[Technique, str]:
    """Each technique's setting in words, keyed by technique: the one place a plan's knobs are phrased
    (micro-batches up to `share`, the most examples a process trains in a step, when given)."""
    freezing = "base frozen (adapters train)" if k.adapter == "lora" else "no freezing"
    if k.freeze_embeddings:
        freezing = "freeze embeddings" + (f" + bottom {k.freeze_layers}/{num_layers} layers" if k.freeze_layers
                                          else "")
    checkpointing = "no checkpointing"
    if k.checkpoint_layers:
        checkpointing = f"checkpoint {len(k.checkpoint_layers)}/{num_layers} layers ({_span(k.checkpoint_layers)})"
    padding = "dynamic padding"
    if k.bucket_boundaries:
        padding = f"{len(k.bucket_boundaries)} length buckets ({', '.join(map(str, k.bucket_boundaries))})"
        padding += f", {k.tokens_per_micro_batch}-token budget" if k.tokens_per_micro_batch else ""
    return {
        "adapter": describe_adapter(k),
        "freezing": freezing,
        "checkpointing": checkpointing,
        "precision": k.precision.value + (" + grad scaler" if k.precision.value == "fp16" else ""),
        "optimizer": "8-bit AdamW (bitsandbytes)" if k.optimizer_bits == 8 else "32-bit AdamW" + (
            " (bitsandbytes' 8-bit AdamW does not step FSDP's sharded parameters)" if k.strategy == "fsdp" else ""),
        "micro-batch": f"micro-batches of up to {min(k.micro_batch_size, share or k.micro_batch_size)}",
        "padding": padding,
        "sharding": describe_sharding(k, processes),
    }


def knobs_line(k: Knobs, num_layers: int, processes: int = 1, share: int | None = None) -> str:
    """All knobs on one line, e.g. "freeze embeddings, checkpoint 6/6 layers (0-5), bf16, 8-bit AdamW ...";
    an adapter plan starts with its adapter (and leaves out the frozen base it implies), a plan for several
    processes ends with how they share the model (micro-batches up to `share`, a process's most examples of a
    step, when given)."""
    words = describe_knobs(k, num_layers, processes, share)
    silent = ("adapter" if k.adapter == "none" else "freezing",) + (("sharding",) if processes == 1 else ())
    return ", ".join(v for t, v in words.items() if t not in silent)


def describe_weights(weights: AdapterWeights, precision: str) -> str:
    """An adapter plan's weights by what holds them, e.g. "6.5 B base linears at 4 bits (3.5 GB incl. 0.2 GB of
    scales), 0.5 GB other frozen weights, 40 MB adapters"."""
    w = weights
    if w.quantization_constant_bytes:
        linears = (f"{_count(w.base_linear_params)} base linears at 4 bits ({format_bytes(w.base_linear_bytes)} "
                   f"incl. {format_bytes(w.quantization_constant_bytes)} of scales)")
    else:
        linears = f"{_count(w.base_linear_params)} base linears in {precision} ({format_bytes(w.base_linear_bytes)})"
    return (f"{linears}, {format_bytes(w.other_frozen_bytes)} other frozen weights, "
            f"{format_bytes(w.trainable_bytes)} adapters")


def _count(n: int) -> str:
    """e.g. 6.5 B, 124 M, 33 K."""
    for unit, name in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= unit:
            return f"{n / unit:.3g} {name}"
    return str(n)


def _speed(ratio: float) -> str:
    if abs(ratio - 1.0) < 0.005:
        return "same speed"
    return f"{ratio:.2f}x slower" if ratio > 1 else f"{1 / ratio:.2f}x faster"


def describe_alternative(alternative: Alternative, plan: Plan) -> str:
    """One line weighing a runner-up against the chosen plan, e.g. "with 8-bit AdamW: 1.20x slower, 14.1 GB"."""
    words = describe_knobs(alternative.knobs, plan.num_layers, plan.cluster.processes,
                           process_batch_size(plan.batch_size, plan.cluster.processes))
    changes = " and ".join(words[t] for t in alternative.changed)
    speed = _speed(alternative.epoch_seconds / plan.time.epoch_seconds) if plan.time.epoch_seconds else "?"
    line = f"with {changes}: {speed}, {format_bytes(alternative.peak_bytes)}"
    chosen_risk = plan.search.risk if plan.search is not None else None
    if alternative.epoch_seconds < plan.time.epoch_seconds and None not in (alternative.risk, chosen_risk):
        # a faster runner-up lost on the policy's price of its quality risk (or, within the tie tolerance, on
        # risk alone)
        line += f" (not chosen: quality risk {alternative.risk:.2f} against {chosen_risk:.2f})"
    return line


def describe_step(plan: Plan) -> str:
    """e.g. "effective batch 32: micro-batches of up to 32 sequences / 512 tokens, 2-9 per step by the step's
    lengths (3.4 on average)"."""
    k, layout = plan.knobs, plan.step
    largest = max(b.micro_batch_size for b in layout.buckets)
    caps = f"up to {largest} sequence{'s' if largest > 1 else ''}"
    if k.tokens_per_micro_batch:
        caps += f" / {k.tokens_per_micro_batch} tokens"
    fewest, most = layout.micro_batches_per_step
    if most == 1:
        count = "1 per step (no accumulation)"
    elif fewest == most:
        count = f"{most} per step"
    else:
        count = f"{fewest}-{most} per step by the step's lengths ({layout.mean_micro_batches_per_step:.1f} on average)"
    if layout.processes == 1:
        return f"effective batch {layout.batch_size}: micro-batches of {caps}, {count}"
    return (f"effective batch {layout.batch_size} = {layout.processes} processes x up to {layout.process_batch_size} "
            f"examples each: micro-batches of {caps}, {count} on each process")


def plan_report(plan: Plan) -> Group:
    """The plan as a person reads it: knobs, peak breakdown, time, alternatives."""
    m, t = plan.predicted, plan.time
    where = plan.device.name if not plan.cluster.distributed else f"{plan.cluster.describe()}, {plan.device.name} each"
    each = (" per GPU" if plan.device.kind == "cuda" else " per process") if plan.cluster.distributed else ""
    title = (f"[bold]{plan.model_id}[/] ({_count(plan.num_params)} params) on {where}, "
             f"budget {format_bytes(plan.budget_bytes)}{each}, policy {plan.policy}")
    knobs = Table(title="knobs", show_header=False, box=None, padding=(0, 2))
    words = describe_knobs(plan.knobs, plan.num_layers, plan.cluster.processes)
    for technique, value in words.items():
        if technique == "sharding" and not (plan.cluster.distributed or plan.knobs.strategy == "fsdp"):
            continue
        if technique == "micro-batch":
            knobs.add_row("step", describe_step(plan))
        elif technique == "adapter" and plan.adapter is not None:
            share = plan.adapter.trainable_params / plan.num_params
            knobs.add_row(technique, f"{value}: {_count(plan.adapter.trainable_params)} trainable parameters "
                                     f"({share:.2%} of the model's)")
        else:
            knobs.add_row(technique, value)
    rank = " per process" if plan.cluster.distributed else ""
    mem = Table(title=f"predicted peak{rank} ({m.peak_phase}, micro-batch {m.peak_shape[0]}x{m.peak_shape[1]})",
                show_header=False, box=None, padding=(0, 2))
    detail = {"weights": f": {describe_weights(plan.adapter, plan.knobs.base_dtype)}"} if plan.adapter else {}
    if plan.knobs.strategy == "fsdp":
        detail = {name: f" (1/{plan.cluster.processes} shard)" for name in ("weights", "gradients", "optimizer_state")}
        if plan.knobs.cpu_offload:
            detail = {name: " (in CPU RAM)" for name in detail}
        elif plan.device.kind == "cpu":  # memory.py: the caller's whole model waits in the same memory
            detail["weights"] = f" (1/{plan.cluster.processes} shard, and the whole model waiting to be trained)"
    names = ["weights", "gradients", "optimizer_state", "activations", "temporaries"]
    names += ["workspace"] * bool(m.workspace) + ["overhead"]
    if m.context:
        detail["overhead"] = (f" (CUDA context {format_bytes(m.context)}, allocator reserve "
                              f"{format_bytes(m.overhead - m.context)})")
    for name in names[:3] + (["gathered"] if plan.knobs.strategy == "fsdp" else []) + names[3:]:
        label = "gathered units" if name == "gathered" else name.replace("_", " ")
        mem.add_row(label, format_bytes(getattr(m, name)) + detail.get(name, ""))
    mem.add_row("[bold]peak[/]", f"[bold]{format_bytes(m.peak_bytes)}[/]")
    mem.add_row("headroom left", f"{format_bytes(plan.headroom_left_bytes)} of {format_bytes(plan.budget_bytes)}")
    if plan.offloaded_bytes:
        mem.add_row("CPU RAM", f"{format_bytes(plan.offloaded_bytes)} per machine for the offloaded shards")
    kind = f"measured on {plan.timed_on}" if t.measured else "estimated from FLOPs"
    speed = Table(title=f"predicted time ({kind})", show_header=False, box=None, padding=(0, 2))
    speed.add_row("per optimizer step", _seconds(t.step_seconds))
    w = plan.workload
    cut = f", cut at {w.max_length} tokens" if w.max_length and w.from_data else ""
    samples = f"{w.lengths.num_samples} samples" + (f" of {w.max_length} tokens" if not w.from_data else cut)
    speed.add_row("per epoch", f"{_seconds(t.epoch_seconds)} ({samples})")
    speed.add_row("padding efficiency", f"{t.padding_efficiency:.0%}")
    parts = [Text.from_markup(title), knobs, mem, speed]
    if m.peak_bytes > plan.budget_bytes - plan.headroom_bytes:  # a file edited by hand: train refuses it
        parts.insert(1, Text(f"warning: the predicted peak {format_bytes(m.peak_bytes)} is over the budget less "
                             f"its {format_bytes(plan.headroom_bytes)} headroom: this plan does not fit (train "
                             "refuses it)", style="red"))
    if plan.alternatives:
        alt = Table(title="alternatives", show_header=False, box=None, padding=(0, 2))
        for a in plan.alternatives:
            alt.add_row("•", describe_alternative(a, plan))
        parts.append(alt)
    if plan.search:
        parts.append(Text(f"searched {plan.search.trials} trials in {plan.search.seconds:.1f} s", style="dim"))
    return Group(*parts)


def profile_table(profile: Profile, seq: int = 512) -> Table:
    """Per-block table: params, grads, optimizer state, activation bytes per token, forward/backward time."""
    where = profile.device_name or profile.device
    table = Table(title=f"{profile.model_id}: per-block profile (measured on {where}, seq {seq})")
    for col in ("block", "count", "params", "grads", "adam state", "act/token fp32", "act/token bf16",
                "fwd ms (b1)", "bwd ms (b1)"):
        table.add_column(col, justify="right" if col != "block" else "left")
    for b in profile.blocks:
        per_token = {p: a.saved(1, seq) / seq for p, a in b.activations.items()}
        times = b.time.get("fp32")
        fwd = f"{times.forward(1, seq) * 1e3:.1f}" if times else "-"
        bwd = f"{times.backward(1, seq) * 1e3:.1f}" if times else "-"
        table.add_row(
            b.name, str(b.count), f"{b.numel / 1e6:.2f}M", format_bytes(b.param_bytes),
            format_bytes(8 * b.numel),
            format_bytes(per_token.get("fp32", 0)), format_bytes(per_token.get("bf16", 0)), fwd, bwd,
        )
    return table


def calibration_table(calibration: Calibration) -> Group:
    """A card's measured overhead terms, and the allocator samples they were fitted to."""
    c = calibration
    terms = Table(title=f"calibration of {c.hardware} (torch {c.torch_version}, CUDA {c.cuda_version or '-'})",
                  show_header=False, box=None, padding=(0, 2))
    terms.add_row("CUDA context", f"{format_bytes(c.context_bytes)} ({c.context_source or 'none'})")
    terms.add_row("cuBLAS workspace", format_bytes(c.workspace_bytes))
    terms.add_row("allocator reserve", f"{c.reserve_fraction:.1%} of allocated + {format_bytes(c.reserve_bytes)}")
    if c.allocator_config:
        terms.add_row("allocator config", c.allocator_config)
    samples = Table(title="steps measured", box=None, padding=(0, 2))
    for column in ("run", "allocated", "reserved", "slack"):
        samples.add_column(column, justify="left" if column == "run" else "right")
    for x in c.samples:
        samples.add_row(x.label, format_bytes(x.allocated), format_bytes(x.reserved),
                        f"{(x.reserved - x.allocated) / max(x.allocated, 1):.1%}")
    parts = [terms, samples]
    if c.saved:
        fixes = Table(title="saved-bytes corrections (one layer, batch 4 x 256)", box=None, padding=(0, 2))
        for column in ("architecture", "precision", "real - twin"):
            fixes.add_column(column)
        for key, by_precision in sorted(c.saved.items()):
            for precision, fix in by_precision.items():
                fixes.add_row(key, precision, format_bytes(fix(4, 256)))
        parts.append(fixes)
    return Group(*parts)


def _step_time_line(result: TrainResult) -> str:
    """The measured step time (the median: an epoch's short last step and the first step's set-up aside)
    beside the plan's prediction for a full step of this data."""
    seconds = sorted(r.seconds for r in result.history)
    median = seconds[len(seconds) // 2]
    slowed = " (measuring memory on the CPU slows steps: --no-measure)" \
        if result.plan.device.kind == "cpu" and result.measured_peak_bytes is not None else ""
    return (f"step time {median:.3g} s measured (median of {len(seconds)}), {result.plan.time.step_seconds:.3g} s "
            f"predicted{slowed}")


def train_summary(result: TrainResult) -> str:
    """What `autofit train` prints at the end: steps, loss, the measured peaks beside the predicted ones, speed."""
    steps = f"{result.optimizer_steps} optimizer step{'' if result.optimizer_steps == 1 else 's'}"
    plan = result.plan
    share = process_batch_size(plan.batch_size, plan.cluster.processes)
    lines = [f"plan: {knobs_line(plan.knobs, plan.num_layers, plan.cluster.processes, share)}",
             f"{steps}, final loss {result.final_loss:.4f}" if result.final_loss is not None else steps]
    if result.history:
        samples = [r.samples for r in result.history]
        short = f" (all the data: fewer examples than the batch of {result.plan.batch_size})" \
            if max(samples) < result.plan.batch_size else ""
        lines.append(f"every step trained {max(samples)} example{'' if max(samples) == 1 else 's'}{short}" + (
            f" (the last of an epoch {min(samples)})" if min(samples) < max(samples) else ""))
    if result.measured_peak_bytes is not None:
        each = ""
        if result.processes > 1:  # the worst process's peak, each one's after it
            peaks = ", ".join(map(format_bytes, result.rank_peak_bytes))
            each = f" by the busiest of {result.processes} processes ({peaks})"
        run = result.run_predicted_allocated_bytes
        bound = format_bytes(result.predicted_allocated_bytes)
        predicted = f"{bound} predicted per process" if run is None else \
            f"{format_bytes(run)} predicted for this run's micro-batches ({bound} for any step of this data)"
        lines.append(f"peak memory {format_bytes(result.measured_peak_bytes)} measured{each}, {predicted}, "
                     f"budget {format_bytes(result.budget_bytes)}")
    if result.measured_reserved_bytes is not None and result.predicted_reserved_bytes is not None:
        lines.append(f"allocator reserved {format_bytes(result.measured_reserved_bytes)} measured, "
                     f"{format_bytes(result.predicted_reserved_bytes)} predicted")
    lines.append(f"{result.tokens_per_second:,.0f} tokens/s, padding efficiency {result.padding_efficiency:.0%}")
    if result.history:
        lines.append(_step_time_line(result))
    lines += [f"eval of {e.samples} examples after step {e.step} (epoch {e.epoch + 1}): loss {e.loss:.4f}"
              + (f", accuracy {e.accuracy:.1%}" if e.accuracy is not None else "") for e in result.eval]
    lines += [f"fallback at step {f.step}: {f.summary}" for f in result.fallbacks]
    if result.output_dir:
        lines.append(f"checkpoint: {result.output_dir}")
    if result.adapter_dir:
        lines.append(f"adapter: {result.adapter_dir} (autofit.techniques.lora.load_adapter(this folder) reloads "
                     "the trained model)")
    return "\n".join(lines)
