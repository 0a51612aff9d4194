"""The `autofit` command: plan | train | profile | calibrate | explain. Formatting only; the work happens in
autofit.api.

Exit codes: 0 success; 2 no plan fits the budget (the message names the smallest budget that would);
1 any other bad input, with a one-line reason and no traceback (AUTOFIT_DEBUG=1 shows it).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

import autofit
from autofit import plots  # light: matplotlib is imported only to draw
from autofit.cli_errors import Commands, err, escape, friendly_errors
from autofit.cli_options import (check_needs_data, check_out_file, check_outputs_apart, checked_seq_len, load_data,
                                 read_plan, text_columns)

out = Console()

app = typer.Typer(cls=Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Plan and run memory-efficient fine-tuning of Hugging Face transformers on a small GPU.")


def _show_version(asked: bool) -> None:
    if asked:
        import torch
        import transformers

        out.print(f"autofit {autofit.__version__} (torch {torch.__version__}, transformers {transformers.__version__})",
                  highlight=False)
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                          help="Show the versions of autofit, torch and transformers.")) -> None:
    """Plan and run memory-efficient fine-tuning of Hugging Face transformers on a small GPU."""


ADAPTER_HELP = ("auto: the policy decides; none: full fine-tuning only; lora: LoRA/QLoRA adapter plans only "
                "(with the policy's ranks, targets and bases).")
VRAM_HELP = ("GPU memory budget: 16GB, 15.5GiB, 16000MB or bytes. GB and GiB both mean 2**30 bytes, as "
             "nvidia-smi reports memory and as '16 GB' cards are sized; 'auto' reads the current CUDA device.")
LABEL_HELP = "The column of --data holding the labels (default: label or labels)."


@app.command()
@friendly_errors
def plan(
    model: str = typer.Option(..., "--model", "-m", help="HF model id (resolved offline), local directory."),
    vram: str = typer.Option(..., "--vram", help=VRAM_HELP),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=1, help="Sequence length (a cap, with --data); "
                                          "default: the model's limit, at most 512."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Effective batch size, kept by every plan."),
    data: Optional[Path] = typer.Option(None, "--data", help="CSV, JSON lines or saved dataset: real lengths."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer directory for --data."),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="The text column, or a pair: a,b."),
    label_column: Optional[str] = typer.Option(None, "--label-column", help=LABEL_HELP),
    policy: str = typer.Option("balanced", "--policy", help="balanced, quality-first, fastest, minimal-memory, "
                                                            "or a policy YAML file."),
    adapter: str = typer.Option("auto", "--adapter", help=ADAPTER_HELP),
    task: Optional[str] = typer.Option(None, "--task", help="classification | causal-lm | token-classification "
                                       "(default: by model)."),
    device: Optional[str] = typer.Option(None, "--device", help="Target card: h100, a100, a10g, l4, t4, "
                                                                "rtx4090, rtx3090, v100, cuda, cpu."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="GPUs in all (one process each); --vram is each one's."),
    machines: int = typer.Option(1, "--machines", min=1, help="Machines the GPUs are spread over, evenly."),
    interconnect: Optional[str] = typer.Option(None, "--interconnect", help="Between a machine's GPUs: nvlink or "
                                               "pcie (default)."),
    network: str = typer.Option("ethernet", "--network", help="Between machines: infiniband or ethernet."),
    host_memory: Optional[str] = typer.Option(None, "--host-memory", help="CPU RAM of each machine (e.g. 512GB): "
                                              "CPU offload must fit in it."),
    accelerate_config: Optional[Path] = typer.Option(None, "--accelerate-config", help="Write accelerate's config "
                                                     "for the plan here (for `accelerate launch`)."),
    trials: Optional[int] = typer.Option(None, "--trials", min=1, help="Optuna trials for large spaces."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage, e.g. sqlite:///study.db."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Save the plan as JSON here."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw the predicted memory over a step (.png)."),
    pareto: Optional[Path] = typer.Option(None, "--pareto", help="Draw every configuration searched (.png)."),
) -> None:
    """Find the fastest mix of memory-saving techniques that fits the budget."""
    from autofit.api import plan_and_search
    from autofit.models import load_tokenizer
    from autofit.policy import check_adapter_choice
    from autofit.report import plan_report
    from autofit.search.space import PAD_MULTIPLE

    plots.check_paths(plot, pareto)  # before any work: a bad picture path or no matplotlib fails now
    check_out_file("--out", out_path)
    check_out_file("--accelerate-config", accelerate_config)
    check_outputs_apart({"--out": out_path, "--accelerate-config": accelerate_config, "--plot": plot,
                         "--pareto": pareto}, {"--data": data, "--policy": policy})
    check_adapter_choice(adapter)
    check_needs_data(data, {"--text-column": text_column, "--label-column": label_column, "--tokenizer": tokenizer})
    if seq_len is not None:  # (plan() checks it too, naming seq_len)
        checked_seq_len(model, seq_len, PAD_MULTIPLE)
    rows = load_data(data)
    tok = load_tokenizer(tokenizer) if tokenizer else None
    if tokenizer and tok is None:
        raise ValueError(f"no tokenizer files in {tokenizer!r}")
    if rows is not None and tok is None:
        tok = load_tokenizer(model)
        if tok is None:
            raise ValueError(f"--data needs a tokenizer and none for {model!r} is on this machine: pass --tokenizer")
    found = plan_and_search(model, vram, seq_len=seq_len, batch_size=batch_size, data=rows, policy=policy,
                            task=task, device=device, tokenizer=tok, text_column=text_columns(text_column),
                            label_column=label_column, n_trials=trials,
                            storage=storage, adapter=adapter, gpus=gpus, machines=machines,
                            interconnect=interconnect, network=network, host_memory=host_memory)
    result = found.plan
    if out_path is not None:
        result.save(out_path)
    if accelerate_config is not None:
        result.to_accelerate_config(accelerate_config)
    drawn = plots.save_plan_pictures(found, plot, pareto)
    if as_json:
        print(result.to_json())
    else:
        out.print(plan_report(result))
        written = [p for p in (out_path, accelerate_config) if p is not None]
        for path in written + drawn:
            out.print(f"saved to {path}", style="dim")


@app.command()
@friendly_errors
def train(
    data: Path = typer.Option(..., "--data", help="Training data: CSV, JSON lines or saved dataset."),
    plan_path: Optional[Path] = typer.Option(None, "--plan", help="A plan saved by `autofit plan --out`."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model directory or id (default: the plan's)."),
    vram: Optional[str] = typer.Option(None, "--vram", help="Plan and train in one go. " + VRAM_HELP),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer directory (default: the model's)."),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="The text column, or a pair: a,b."),
    label_column: Optional[str] = typer.Option(None, "--label-column", help=LABEL_HELP),
    task: Optional[str] = typer.Option(None, "--task", help="classification | causal-lm | token-classification "
                                       "(default: the plan's, "
                                       "else by model and data)."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", help="Checkpoints go here."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", min=1),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --output-dir "
                                                        "if there is one (else start from the first step)."),
    epochs: int = typer.Option(1, "--epochs", min=1),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1,
                                            help="Optimizer steps to run, instead of --epochs."),
    lr: float = typer.Option(None, "--lr", help="learning rate (default 2e-5; 2e-4 for a LoRA plan)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Effective batch size, with --vram "
                                             "(default 32; a plan fixes it)."),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=1),
    policy: Optional[str] = typer.Option(None, "--policy", help="With --vram (default balanced; a plan fixes it)."),
    adapter: str = typer.Option("auto", "--adapter", help="With --vram: " + ADAPTER_HELP),
    seed: int = typer.Option(0, "--seed", help="Seeds the new head's weights, the step order and dropout."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    measure: bool = typer.Option(True, "--measure/--no-measure",
                                 help="Measure the peak memory (on the CPU it tracks every tensor: 2-7x slower)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw the losses and the peak memory (.png)."),
) -> None:
    """Train with a plan (or plan first with --vram), measuring the real peak memory."""
    import autofit
    from autofit.models import load_tokenizer, padding_id, resolve_config
    from autofit.policy import check_adapter_choice
    from autofit.report import train_summary

    plots.check_paths(plot)
    check_outputs_apart({"--plot": plot}, {"--data": data, "--eval-data": eval_data, "--plan": plan_path,
                                          "--policy": policy})
    check_adapter_choice(adapter)
    if (plan_path is None) == (vram is None):
        raise ValueError("give exactly one of --plan and --vram")
    saved = read_plan(plan_path) if plan_path is not None else None
    model_spec = model or (saved.model_id if saved else None)
    if model_spec is None:
        raise ValueError("--vram needs --model")
    resolve_config(model_spec)  # a model that is not there is the error, not its missing tokenizer
    tok = load_tokenizer(tokenizer or model_spec)
    if tok is None:
        raise ValueError(f"no tokenizer for {tokenizer or model_spec!r} on this machine: pass --tokenizer")
    result = autofit.train(model_spec, load_data(data), budget=vram, plan=saved, tokenizer=tok, epochs=epochs,
                           max_steps=max_steps, lr=lr, batch_size=batch_size,
                           eval_data=load_data(eval_data, evaluation=True),
                           policy=policy, task=task, max_length=max_length, text_column=text_columns(text_column),
                           label_column=label_column, output_dir=output_dir,
                           checkpoint_every=checkpoint_every, resume=resume, quiet=quiet, seed=seed,
                           adapter=adapter, measure_memory=measure)
    if result.processes > 1:  # left open, gloo's threads can abort the process at exit, after a good run
        _end_process_group()
    if result.rank != 0:
        return  # under torchrun every process trains; process 0 reports (its result holds every peak)
    out.print(train_summary(result))
    if output_dir is not None and result.plan.knobs.adapter == "none" and result.model is not None:
        # the checkpoints hold weights and training state; this is a model to load (--model DIR, from_pretrained)
        folder = Path(output_dir) / "model"
        result.model.save_pretrained(folder)
        _pad_like_training(tok, padding_id(result.model.config)).save_pretrained(folder)
        out.print(f"trained model saved to {folder} (load it with --model {folder} or from_pretrained)",
                  style="dim")
    if plot is not None:
        out.print(f"saved to {result.plot(plot)}", style="dim")
    if result.memory_warning:
        err.print("[red]warning:[/] " + escape(result.memory_warning), soft_wrap=True, highlight=False)


def _pad_like_training(tok, pad_id: int | None):
    """The tokenizer, padding with the id training padded with (models.padding_id: a decoder's end token): one
    without a pad token could not batch the saved model's inputs."""
    if tok is not None and getattr(tok, "pad_token", None) is None and pad_id is not None:
        tok.pad_token = tok.convert_ids_to_tokens(pad_id)
    return tok


def _end_process_group() -> None:
    """Every process waits for the others to finish their collectives, then closes the group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@app.command()
@friendly_errors
def profile(
    model: str = typer.Option(..., "--model", "-m"),
    task: Optional[str] = typer.Option(None, "--task"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=1, help="Sequence length the table is shown at "
                                          "(default: the model's limit, at most 512)."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole Profile as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw bytes and time per layer (.png)."),
) -> None:
    """The per-layer table: params, grads, optimizer state, activation bytes per token, times."""
    from autofit.profiler import profile_model
    from autofit.report import profile_table

    plots.check_paths(plot)
    seq_len = checked_seq_len(model, seq_len)  # before the (slow) profile
    import torch

    timed_on = "cuda" if torch.cuda.is_available() else "cpu"  # the visible GPU's own times where there is one
    result = profile_model(model, task=task, timing=() if as_json and plot is None else ("fp32",),
                           timing_device=timed_on)
    if as_json:
        print(result.model_dump_json(indent=2))
    else:
        out.print(profile_table(result, seq=seq_len))
    if plot is not None:
        path = plots.save_layers(result, plot, seq=seq_len)
        if not as_json:  # stdout holds only the JSON
            out.print(f"saved to {path}", style="dim")


@app.command()
@friendly_errors
def calibrate(
    dry_run: bool = typer.Option(False, "--dry-run", help="Run the same steps on the CPU (no GPU needed); "
                                                          "nothing is saved."),
    force: bool = typer.Option(False, "--force", help="Measure again though this card has a calibration."),
    as_json: bool = typer.Option(False, "--json", help="Print the calibration as JSON."),
) -> None:
    """Measure this GPU's memory overheads (CUDA context, cuBLAS workspace, allocator reserve) and cache them
    for its plans. `autofit plan` does it on a card's first use."""
    import torch

    from autofit.calibration import calibration_path
    from autofit.card import card_calibration
    from autofit.report import calibration_table

    if not dry_run and not torch.cuda.is_available():
        raise ValueError("no CUDA device is visible: calibrate runs on the GPU it measures "
                         "(--dry-run runs its steps on the CPU)")
    found = card_calibration("cpu" if dry_run else "cuda", force=force or dry_run,
                        report=lambda line: err.print(line, style="dim", highlight=False))
    if as_json:
        print(found.model_dump_json(indent=2))
        return
    out.print(calibration_table(found))
    where = "dry run: not saved" if dry_run else f"saved to {calibration_path(found) or '(cache off)'}"
    out.print(where, style="dim")


@app.command()
@friendly_errors
def explain(plan_path: Path = typer.Argument(..., help="A plan JSON file.")) -> None:
    """Print a saved plan as `autofit plan` shows it."""
    from autofit.report import plan_report

    out.print(plan_report(read_plan(plan_path)))


def main() -> None:  # pragma: no cover - console-script entry
    signal.signal(signal.SIGINT, signal.default_int_handler)  # started: Ctrl-C is friendly_errors' to handle
    sys.exit(app())
