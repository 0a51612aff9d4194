"""What the `autofit` command checks and reads before any work: files it will write, options that need another,
a --seq-len the model cannot take, the data and plan files. Errors name the option as it was typed."""

from __future__ import annotations

from pathlib import Path

from autofit.paths import unwritable_reason


def check_out_file(flag: str, path: Path | None) -> None:
    """A file the command writes once its search is done (--out, --accelerate-config): a folder in its place, a
    missing folder or no permission fails now, not after the search."""
    reason = unwritable_reason(path) if path is not None else None
    if reason is not None:
        raise ValueError(f"{flag} {path}: {reason}")


def check_outputs_apart(outputs: dict[str, Path | None], inputs: dict[str, object]) -> None:
    """Files a command writes (flag -> path) must be neither a file it reads (flag -> value: `--out data.jsonl`
    would overwrite the data with the plan) nor each other."""
    taken = {Path(value).resolve(): flag for flag, value in inputs.items()
             if isinstance(value, str | Path) and Path(value).is_file()}
    for flag, path in outputs.items():
        if path is None:
            continue
        if path.resolve() in taken:
            raise ValueError(f"{flag} {path} is the file {taken[path.resolve()]} names: write to another file")
        taken[path.resolve()] = flag


def check_needs_data(data: Path | None, options: dict[str, object]) -> None:
    """Options (flag -> value) that name columns of --data or read it: without it they would be ignored."""
    given = [flag for flag, value in options.items() if value is not None]
    if data is None and given:
        what = "tokenizes the data" if given[0] == "--tokenizer" else "names a column of the data"
        raise ValueError(f"{given[0]} {what}: give --data too")


def checked_seq_len(model: str, seq_len: int | None, multiple: int | None = None) -> int:
    """`seq_len` when `model` takes it (padded to `multiple`); None: the default, cut to the model's limit."""
    from autofit.limits import check_seq_len
    from autofit.models import resolve_config

    config = resolve_config(model)[1]
    return check_seq_len(config, seq_len, explicit=seq_len is not None, multiple=multiple, flag="--seq-len")


def text_columns(option: str | None) -> str | list[str] | None:
    """--text-column: one column, or a pair named "a,b" (question and passage, premise and hypothesis)."""
    if option is None or "," not in option:
        return option
    return [name.strip() for name in option.split(",")]


def load_data(path: Path | None, *, evaluation: bool = False):
    from autofit.data_files import load_data_file

    return None if path is None else load_data_file(path, evaluation=evaluation)


def read_plan(path: Path):
    from autofit.plan import Plan

    if not path.is_file():
        raise ValueError(f"plan file {path} is a directory" if path.is_dir() else f"plan file not found: {path}")
    return Plan.load(path)  # PlanFileError names the file and the first bad field
