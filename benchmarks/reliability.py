"""Reliability: hundreds of bad inputs through the `autofit` CLI and the Python API, and killed-and-resumed runs.

    python -m benchmarks.reliability --quick     # 40 cases + 2 crash-resume trials: ~4 minutes on 2 cores
    python -m benchmarks.reliability             # ~800 cases (~250 through the CLI) + 5 trials: ~15-25 minutes
    python -m benchmarks.reliability --match 'plan/knobs' --resume-trials 0    # a subset (a regex on names)
    python -m benchmarks.reliability --only plan --no-cli                      # every plan mutation, API only: ~1 min
    python -m benchmarks.reliability --only budget,policy --cli autofit        # another launcher (installed script)

The contract (README): the CLI exits 0 on success, 2 when no plan fits (naming the smallest budget that
does), and 1 with a one-line reason for any other bad input, never a traceback. The Python API
(`autofit.plan`, `autofit.train`, `autofit.Plan.load`) raises an exception with a one-line message.

Each case (benchmarks/_reliability_cases.py) runs in a fresh folder through the CLI (a subprocess, with a
timeout) and, where the input can be expressed in Python, through the API (in a long-lived worker process,
also under a timeout). Outcomes:

    ok              accepted, and the case allows it (controls; odd-but-legal input; accepted with a warning)
    clean_error     CLI: exit 1 or 2, stderr is exactly one line starting with "error:" (besides "note:" lines,
                    which say what was inferred about the data), no traceback
                    API: an exception whose message is one non-empty line
    unclean_error   CLI: exit 1 or 2 without a traceback, but stderr is not that one line (warnings, progress
                    bars, a wrapped message, or exit 2 without naming the smallest budget)
                    API: an exception whose message is empty or several lines (e.g. a raw pydantic report)
    traceback       CLI: "Traceback" in the output
    crash           the process died otherwise (a signal, an exit code other than 0/1/2)
    hang            past the timeout
    wrong_success   accepted an input that must be refused (or, for a WARN case, accepted without a warning)
    wrong_refusal   a valid control was refused
    n/a             the input has no Python-API form (a usage error, a file the API never reads)

Failures are every traceback, unclean_error, crash, hang, wrong_success and wrong_refusal. Clean errors of
an internal-looking type ("error: TypeError: ...", an API exception that is neither a ValueError nor an
OSError) are listed apart: legal by the letter of the contract, yet usually a bug that happened to be caught.
A CLI process costs ~5 s of CPU (importing torch and transformers), so the full run's time depends on what
else the machine runs; the API calls take milliseconds to a second each.

The crash-resume section trains the tiny model with a checkpoint every step, kills it with SIGKILL at
random moments (at a random step; while a checkpoint is being written, i.e. while a `.tmp-checkpoint-*`
folder exists; at a random time), resumes with --resume until it finishes, and compares the per-step losses
(the last checkpoint's trainer_state.json `history`) and the final weights (model.safetensors) with an
uninterrupted run: on the CPU every resume must be bit-identical.

Environment of every subprocess: AUTOFIT_CACHE in the run's temp folder (one shared profile cache),
OMP_NUM_THREADS=1 (two processes share two cores; also makes CPU training deterministic), AUTOFIT_DEBUG
unset, and an address-space limit (--memory-limit-gb, 8 by default) so a runaway allocation fails instead of
starving the machine. Results: benchmarks/results/reliability.json (reliability_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import resource
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import environment, table, write_result  # noqa: E402
from benchmarks._reliability_cases import (EITHER, NO_FIT, OK, WARN, Case, all_cases,  # noqa: E402
                                           build_models, valid_plan_argv)

ROOT = Path(__file__).resolve().parent.parent
# argv[0] set to "autofit", so usage messages read as they do from the installed script.
DEFAULT_CLI = (sys.executable, "-c", "import sys; sys.argv[0] = 'autofit'; from autofit.cli import main; main()")
FAILURES = ("traceback", "unclean_error", "crash", "hang", "wrong_success", "wrong_refusal")
OUTCOMES = ("ok", "clean_error", *FAILURES, "setup_failed", "n/a")
PLACEHOLDER = re.compile(r"\{(model3|model|data64|data|val|plan|tmp|root)\}")
INTERNAL_CLI = re.compile(r"^error: [A-Z]\w*(Error|Exception|Exit|Interrupt)\b")
WARNING_LINE = re.compile(r"^\s*(warning|warn|note)\b", re.IGNORECASE)  # a note says what was inferred


@dataclass
class Settings:
    quick: bool = True
    cli: tuple[str, ...] = DEFAULT_CLI
    jobs: int = 2
    timeout: float = 120.0
    api: bool = True
    cli_runs: bool = True
    resume_trials: int | None = None
    memory_limit_gb: float = 8.0
    keep: bool = False
    verbose: bool = False
    only: list[str] | None = None
    match: str | None = None


@dataclass
class Context:
    settings: Settings
    work: Path
    env: dict[str, str]
    paths: dict[str, str] = field(default_factory=dict)

    def fill(self, text: str, tmp: Path | None = None) -> str:
        values = {**self.paths, "tmp": str(tmp) if tmp is not None else "", "root": str(self.work / "fixtures")}
        return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


# ---- processes ----------------------------------------------------------------------------------------------

def _limit_memory(pid: int, gigabytes: float) -> None:
    if gigabytes > 0 and hasattr(resource, "prlimit"):
        limit = int(gigabytes * 2**30)
        try:
            resource.prlimit(pid, resource.RLIMIT_AS, (limit, limit))
        except (OSError, ValueError):  # the process may already be gone
            pass


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_cli(ctx: Context, argv: list[str], timeout: float, cwd: Path | None = None) -> dict[str, Any]:
    """One `autofit ...` process: exit code, stdout, stderr, seconds, timed out?"""
    started = time.perf_counter()
    proc = subprocess.Popen([*ctx.settings.cli, *argv], cwd=cwd or ROOT, env=ctx.env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    _limit_memory(proc.pid, ctx.settings.memory_limit_gb)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, stderr = proc.communicate()
        timed_out = True
    return {"exit_code": proc.returncode, "timed_out": timed_out, "seconds": round(time.perf_counter() - started, 2),
            "stdout": stdout.decode("utf-8", "replace"), "stderr": stderr.decode("utf-8", "replace")}


class ApiWorker:
    """A long-lived `python -m benchmarks.reliability --api-worker` process running API calls one at a time
    (torch and autofit import once); killed and restarted after a hang or a crash."""

    def __init__(self, ctx: Context, index: int):
        self.ctx, self.index, self.proc, self.fd = ctx, index, None, None
        self.buffer = b""

    def _start(self) -> None:
        read, write = os.pipe()
        log = open(self.ctx.work / f"api-worker-{self.index}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.reliability", "--api-worker", str(write)],
                                     cwd=ROOT, env=self.ctx.env, stdin=subprocess.PIPE, stdout=log,
                                     stderr=subprocess.STDOUT, pass_fds=(write,), start_new_session=True)
        log.close()
        os.close(write)
        _limit_memory(self.proc.pid, self.ctx.settings.memory_limit_gb)
        self.fd, self.buffer = read, b""

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc.wait()
            os.close(self.fd)
        self.proc = None

    def call(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self.stop()
            self._start()
        started = time.perf_counter()
        try:
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.stop()
            return {"status": "crash", "message": "the API worker died before the call",
                    "seconds": 0.0}
        deadline = started + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.perf_counter()
            if left <= 0:
                self.stop()
                return {"status": "hang", "seconds": round(time.perf_counter() - started, 2)}
            ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:  # the worker died mid-call (a signal, the memory limit, os._exit ...)
                    code = self.proc.wait()
                    self.stop()
                    return {"status": "crash", "message": f"API worker exited with {code}",
                            "seconds": round(time.perf_counter() - started, 2)}
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


# ---- the API side (inside the worker) -----------------------------------------------------------------------

class NotApplicable(Exception):
    """The input has no Python-API form."""


def _read_rows(path: str) -> Any:
    """What a Python user would pass for this data file: its rows (read without autofit)."""
    import csv

    p = Path(path)
    if not p.is_file():
        raise NotApplicable(f"{path} is not a file: the API takes rows")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".csv":
            return list(csv.DictReader(text.splitlines()))
        if p.suffix in (".json", ".jsonl"):
            if text.lstrip().startswith("[") or p.suffix == ".json":
                return json.loads(text)
            return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as error:
        raise NotApplicable(f"{path} holds no Python rows ({type(error).__name__})") from None
    raise NotApplicable(f"{path}: no rows in a {p.suffix or 'suffix-less'} file")


def _resolve(value: Any) -> Any:
    """Job arguments -> Python values: {"$rows": path} -> rows; {"$tokenizer": dir} -> a tokenizer."""
    if isinstance(value, dict) and len(value) == 1:
        key, arg = next(iter(value.items()))
        if key == "$rows":
            return _read_rows(arg)
        if key == "$tokenizer":
            from autofit.models import load_tokenizer

            try:
                tok = load_tokenizer(arg)
            except Exception as error:  # noqa: BLE001
                raise NotApplicable(f"no tokenizer object to pass ({type(error).__name__})") from None
            if tok is None:
                raise NotApplicable("no tokenizer object to pass")
            return tok
    if isinstance(value, dict):
        return {k: _resolve(v) for k, v in value.items()}
    return value


def _api_call(fn: str, kwargs: dict[str, Any]) -> Any:
    import autofit

    if fn == "load":
        return autofit.Plan.load(kwargs["path"])
    if fn == "plan":
        out = kwargs.pop("$out", None)
        result = autofit.plan(**kwargs)
        if out is not None:
            result.save(out)
        return result
    if fn == "train":
        plan = kwargs.get("plan")
        if isinstance(plan, dict) and "$plan" in plan:
            kwargs["plan"] = plan = autofit.Plan.load(plan["$plan"])
        if kwargs.get("model") is None:
            if plan is None:
                raise NotApplicable("no model to pass")
            kwargs["model"] = plan.model_id
        kwargs.setdefault("quiet", True)
        return autofit.train(**kwargs)
    raise NotApplicable(f"unknown API function {fn}")


def _api_job(job: dict[str, Any]) -> dict[str, Any]:
    import logging
    import warnings

    try:
        kwargs = _resolve(job["kwargs"])
    except NotApplicable as reason:
        return {"status": "n/a", "message": str(reason), "seconds": 0.0}
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.WARNING)
    logging.getLogger("autofit").addHandler(handler)
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                value = _api_call(job["fn"], kwargs)
                status, error = "returned", None
            except NotApplicable as reason:
                return {"status": "n/a", "message": str(reason), "seconds": 0.0}
            except BaseException as e:  # noqa: BLE001 - SystemExit from a library call is a finding too
                status, error, value = "raised", e, None
    finally:
        logging.getLogger("autofit").removeHandler(handler)
    own = (os.sep + "autofit" + os.sep, os.path.basename(__file__))
    result: dict[str, Any] = {
        "status": status, "seconds": round(time.perf_counter() - started, 2),
        "warnings": [f"{w.category.__name__}: {w.message}" for w in caught
                     if not issubclass(w.category, (DeprecationWarning, FutureWarning, PendingDeprecationWarning))
                     and any(o in (w.filename or "") for o in own)] + [r.getMessage() for r in records],
    }
    if error is not None:
        message = str(error)
        result.update(type=type(error).__name__, value_error=isinstance(error, ValueError),
                      user_error=isinstance(error, (ValueError, OSError)), message=message[:4000],
                      traceback="".join(traceback.format_exception(error))[-3000:])
    elif value is not None:
        for attr in ("final_loss", "optimizer_steps"):
            if hasattr(value, attr):
                result[attr] = getattr(value, attr)
    return result


def api_worker(fd: int) -> None:
    out = os.fdopen(fd, "w")
    import autofit  # noqa: F401 - import once, before the first timed call

    for line in sys.stdin:
        if line.strip():
            result = _api_job(json.loads(line))
            out.write(json.dumps(result, default=str) + "\n")
            out.flush()


# ---- from a command line to an API call ---------------------------------------------------------------------

INT_OPTIONS = {"seq_len", "batch_size", "trials", "checkpoint_every", "epochs", "max_steps", "max_length"}
FLOAT_OPTIONS = {"lr"}
FLAGS = {"resume", "quiet", "json"}
API_NAMES = {
    "plan": {"model": "model", "vram": "budget", "seq_len": "seq_len", "batch_size": "batch_size", "data": "data",
             "tokenizer": "tokenizer", "text_column": "text_column", "policy": "policy", "task": "task",
             "device": "device", "trials": "n_trials", "storage": "storage", "out": "$out", "json": None},
    "train": {"data": "data", "plan": "plan", "model": "model", "vram": "budget", "eval_data": "eval_data",
              "tokenizer": "tokenizer", "text_column": "text_column", "output_dir": "output_dir",
              "checkpoint_every": "checkpoint_every", "resume": "resume", "epochs": "epochs",
              "max_steps": "max_steps", "lr": "lr", "batch_size": "batch_size", "max_length": "max_length",
              "policy": "policy", "quiet": "quiet"},
}


def api_call_for(case: Case) -> dict[str, Any] | None:
    """The Python-API form of a case: its explicit call, or one derived from its command line (None where
    the command line has none: usage errors, `profile`)."""
    if isinstance(case.api, dict):
        return case.api
    if case.api is False or case.argv is None:
        return None
    command, rest = case.argv[0], list(case.argv[1:])
    if command == "explain":
        return {"fn": "load", "kwargs": {"path": rest[0]}} if len(rest) == 1 else None
    names = API_NAMES.get(command)
    if names is None:
        return None
    kwargs: dict[str, Any] = {}
    while rest:
        flag = rest.pop(0)
        key = flag[2:].replace("-", "_") if flag.startswith("--") else None
        if key not in names:
            return None  # an unknown option: a usage error only the CLI can make
        if key in FLAGS:
            value: Any = True
        else:
            if not rest:
                return None
            value = rest.pop(0)
            try:
                value = int(value) if key in INT_OPTIONS else float(value) if key in FLOAT_OPTIONS else value
            except ValueError:
                return None  # "--seq-len abc": the CLI's parser answers; a Python caller passes a number
            if key in ("data", "eval_data"):
                value = {"$rows": value}
            elif key == "tokenizer":
                value = {"$tokenizer": value}
            elif key == "plan":
                value = {"$plan": value}
        if names[key] is not None:
            kwargs[names[key]] = value
    if command == "train" and "plan" not in kwargs and "budget" not in kwargs:
        return None  # "give exactly one of --plan and --vram": a CLI-only mistake
    return {"fn": command, "kwargs": kwargs}


def _fill_job(ctx: Context, value: Any, tmp: Path) -> Any:
    if isinstance(value, str):
        return ctx.fill(value, tmp)
    if isinstance(value, dict):
        return {k: _fill_job(ctx, v, tmp) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill_job(ctx, v, tmp) for v in value]
    return value


# ---- classification -----------------------------------------------------------------------------------------

def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def classify_cli(expect: str, run: dict[str, Any]) -> tuple[str, str]:
    """(outcome, note) of one CLI run against what the case expects."""
    stderr, stdout, code = run["stderr"], run["stdout"], run["exit_code"]
    if run["timed_out"]:
        return "hang", f"no answer in {run['seconds']:.0f} s"
    if "Traceback (most recent call last)" in stderr or "Traceback (most recent call last)" in stdout:
        return "traceback", ""
    lines = [line for line in _lines(stderr) if not line.startswith("note:")]  # notes are not the error
    if code == 0:
        if expect in (OK, EITHER):
            return "ok", ""
        if expect == WARN and any(WARNING_LINE.match(line) for line in _lines(stderr) + _lines(stdout)):
            return "ok", "accepted with a warning"
        return "wrong_success", "accepted without a warning" if expect == WARN else "exit 0"
    if code in (1, 2):
        if expect == OK:
            return "wrong_refusal", ""
        if len(lines) != 1 or not lines[0].startswith("error:"):
            return "unclean_error", f"{len(lines)} stderr lines"
        if code == 2 and "smallest budget" not in lines[0]:
            return "unclean_error", "exit 2 without naming the smallest budget that fits"
        return "clean_error", "exit 1; exit 2 (no plan fits) expected" if expect == NO_FIT and code == 1 else ""
    return "crash", f"exit code {code}"


def classify_api(expect: str, result: dict[str, Any]) -> tuple[str, str]:
    status = result["status"]
    if status in ("hang", "crash", "n/a"):
        return status, result.get("message", "")
    if status == "returned":
        if expect in (OK, EITHER):
            return "ok", ""
        if expect == WARN and result.get("warnings"):
            return "ok", "accepted with a warning"
        loss = result.get("final_loss")
        return "wrong_success", (f"returned, final loss {loss}" if loss is not None else "returned")
    if expect == OK:
        return "wrong_refusal", ""
    message = result.get("message", "").strip()
    if not message or "\n" in message:
        return "unclean_error", f"{result.get('type')}: {len(message.splitlines())}-line message"
    return "clean_error", ""


def _signature(line: str) -> str:
    """A line with its numbers, paths and timestamps blurred: what groups failures by cause."""
    line = re.sub(r"(/[\w.@+-]+)+", "<path>", line)
    return re.sub(r"\d+(\.\d+)?", "#", line).strip()[:50]


def error_of(stderr: str) -> str:
    """The error line of a failed run (the last "error:" line, else the last line)."""
    lines = _lines(stderr)
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [""])[-1][:300]


# ---- running the cases --------------------------------------------------------------------------------------

def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name)


def _write_files(ctx: Context, tmp: Path, files: dict[str, str | bytes]) -> None:
    for rel, content in files.items():
        path = tmp / rel
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str) and content.startswith("@copy:"):
            shutil.copyfile(ctx.fill(content[len("@copy:"):], tmp), path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


def _prepare(ctx: Context, case: Case, channel: str) -> tuple[Path, str | None]:
    """A fresh folder with the case's files, its setup commands run: (folder, why setup failed or None)."""
    tmp = ctx.work / "cases" / _slug(case.name) / channel
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_files(ctx, tmp, case.files)
    for step in case.setup:
        run = run_cli(ctx, [ctx.fill(a, tmp) for a in step], ctx.settings.timeout)
        if run["exit_code"] != 0:
            return tmp, f"setup `{' '.join(step)}` exited {run['exit_code']}: {error_of(run['stderr'])}"
    _write_files(ctx, tmp, case.after_setup)
    return tmp, None


def run_case_cli(ctx: Context, case: Case) -> dict[str, Any]:
    tmp, failed = _prepare(ctx, case, "cli")
    if failed:
        return {"outcome": "setup_failed", "note": failed}
    run = run_cli(ctx, [ctx.fill(a, tmp) for a in case.argv], ctx.settings.timeout)
    outcome, note = classify_cli(case.expect, run)
    lines = [line for line in _lines(run["stderr"]) if not line.startswith("note:")]
    entry = {"outcome": outcome, "note": note, "exit_code": run["exit_code"], "seconds": run["seconds"],
             "stderr_lines": len(lines), "stderr_head": [line[:300] for line in lines[:4]],
             "stderr_tail": [line[:300] for line in lines[-2:]] if len(lines) > 4 else [],
             "stdout_head": [line[:200] for line in _lines(run["stdout"])[:2]]}
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        entry["error_line"] = errors[-1][:400]
    if outcome == "unclean_error":
        noise = [line for line in lines if not line.startswith("error:")]
        entry["noise"] = _signature(noise[0]) if noise else "several error lines"
    if outcome == "clean_error" and INTERNAL_CLI.match(lines[0]):
        entry["internal_error"] = True
    if not ctx.settings.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def run_case_api(ctx: Context, case: Case, worker: ApiWorker) -> dict[str, Any] | None:
    call = api_call_for(case)
    if call is None:
        return None
    tmp, failed = _prepare(ctx, case, "api")
    if failed:
        return {"outcome": "setup_failed", "note": failed}
    job = {"fn": call["fn"], "kwargs": _fill_job(ctx, call["kwargs"], tmp)}
    result = worker.call(job, ctx.settings.timeout)
    outcome, note = classify_api(case.expect, result)
    entry = {"outcome": outcome, "note": note, "seconds": result.get("seconds")}
    if result["status"] == "raised":
        entry.update(type=result["type"], value_error=result["value_error"], user_error=result["user_error"],
                     message=result["message"].strip().splitlines()[0][:300] if result["message"].strip() else "",
                     message_lines=len(result["message"].strip().splitlines()))
        if outcome == "unclean_error":
            entry["traceback_tail"] = result.get("traceback", "")[-600:]
            entry["noise"] = _signature(f"{result['type']}: {entry['message']}")
    if result.get("warnings"):
        entry["warnings"] = result["warnings"][:3]
    for key in ("final_loss", "optimizer_steps"):
        if key in result:
            entry[key] = result[key]
    if not ctx.settings.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def run_cases(ctx: Context, cases: list[Case]) -> dict[str, dict[str, Any]]:
    """Every case through the CLI and the API, `jobs` at a time (each worker thread owns one API process)."""
    jobs: list[tuple[Case, str]] = []
    # Setup-heavy cases first: the longest jobs start early, the short ones fill in at the end.
    for case in sorted(cases, key=lambda c: -len(c.setup)):
        if case.argv is not None and case.cli and ctx.settings.cli_runs:
            jobs.append((case, "cli"))
        if ctx.settings.api and api_call_for(case) is not None:
            jobs.append((case, "api"))
    results: dict[str, dict[str, Any]] = {c.name: {} for c in cases}
    lock = threading.Lock()
    queue = list(reversed(jobs))
    done = [0]
    tally: collections.Counter = collections.Counter()
    started = time.perf_counter()

    def work(index: int) -> None:
        worker = ApiWorker(ctx, index)
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    case, channel = queue.pop()
                try:
                    entry = run_case_cli(ctx, case) if channel == "cli" else run_case_api(ctx, case, worker)
                except Exception as error:  # the instrument's own failure: say so, keep going
                    entry = {"outcome": "setup_failed", "note": f"benchmark error: {type(error).__name__}: {error}"}
                with lock:
                    if entry is not None:
                        results[case.name][channel] = entry
                    done[0] += 1
                    if ctx.settings.verbose and entry is not None and entry["outcome"] in FAILURES + ("setup_failed",):
                        print(f"  {entry['outcome']:<14} {channel:<3} {case.name}", flush=True)
                    if entry is not None:
                        tally[entry["outcome"]] += 1
                    if done[0] % 25 == 0 or done[0] == len(jobs):
                        print(f"[{done[0]}/{len(jobs)}] {time.perf_counter() - started:.0f} s  "
                              + ", ".join(f"{o} {n}" for o, n in sorted(tally.items())), flush=True)
        finally:
            worker.stop()

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(max(1, ctx.settings.jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# ---- crash and resume ---------------------------------------------------------------------------------------

def _checkpoints(out: Path) -> tuple[int, set[str]]:
    """(newest complete checkpoint's step or 0, names of the temporary folders checkpoints are written in)."""
    step, temporary = 0, set()
    try:
        with os.scandir(out) as entries:
            for e in entries:
                if e.name.startswith("checkpoint-") and e.name[11:].isdigit():
                    step = max(step, int(e.name[11:]))
                elif e.name.startswith(".tmp-"):
                    temporary.add(e.name)
    except FileNotFoundError:
        pass
    return step, temporary


def _final_state(out: Path) -> tuple[list[tuple], dict[str, Any], int] | None:
    from safetensors.torch import load_file

    found = sorted((p for p in out.glob("checkpoint-*") if p.name[11:].isdigit()), key=lambda p: int(p.name[11:]))
    if not found:
        return None
    state = json.loads((found[-1] / "trainer_state.json").read_text())
    history = [(h["step"], h["epoch"], h["loss"], h["lr"], h["samples"], h.get("skipped")) for h in state["history"]]
    return history, load_file(str(found[-1] / "model.safetensors")), int(found[-1].name[11:])


def _identical(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _killed_run(ctx: Context, argv: list[str], out: Path, mode: str, target: int, delay: float,
                timeout: float) -> dict[str, Any]:
    """Start a run and SIGKILL it: at `target` steps ("step"), while a checkpoint after `target - 1` steps
    is being written ("save"), or `delay` seconds after the start ("time")."""
    started = time.perf_counter()
    proc = subprocess.Popen([*ctx.settings.cli, *argv], cwd=ROOT, env=ctx.env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    _limit_memory(proc.pid, ctx.settings.memory_limit_gb)
    killed_at, mid_save = None, False
    stale = _checkpoints(out)[1]  # left by an earlier kill: not this run's save
    while proc.poll() is None:
        elapsed = time.perf_counter() - started
        if elapsed > timeout:
            _kill_group(proc)
            proc.wait()
            return {"mode": mode, "result": "hang", "seconds": round(elapsed, 1)}
        step, temporary = _checkpoints(out)
        writing = bool(temporary - stale)
        if ((mode == "step" and step >= target) or (mode == "save" and writing and step >= target - 1)
                or (mode == "time" and elapsed >= delay)):
            _kill_group(proc)
            proc.wait()
            killed_at = step
            mid_save = bool(_checkpoints(out)[1] - stale)  # its temporary folder is there: the kill landed mid-save
            break
        time.sleep(0.001)
    stderr = proc.stderr.read().decode("utf-8", "replace")
    proc.stderr.close()
    if killed_at is None:
        return {"mode": mode, "result": "finished" if proc.returncode == 0 else "failed",
                "exit_code": proc.returncode, "error": error_of(stderr), "target": target}
    return {"mode": mode, "result": "killed", "target": target, "delay": round(delay, 2), "step_at_kill": killed_at,
            "mid_save": mid_save, "seconds": round(time.perf_counter() - started, 2)}


def crash_resume(ctx: Context, trials: int, kills: int, seed: int = 0) -> dict[str, Any]:
    base_argv = ["train", "--plan", ctx.paths["plan"], "--data", ctx.paths["data64"], "--epochs", "2",
                 "--checkpoint-every", "1", "--quiet"]
    root = ctx.work / "resume"
    shutil.rmtree(root, ignore_errors=True)
    baseline_out = root / "baseline"
    t = time.perf_counter()
    run = run_cli(ctx, [*base_argv, "--output-dir", str(baseline_out)], ctx.settings.timeout * 2)
    baseline_seconds = time.perf_counter() - t
    base = _final_state(baseline_out) if run["exit_code"] == 0 else None
    if base is None:
        return {"error": f"the uninterrupted run failed (exit {run['exit_code']}): {error_of(run['stderr'])}",
                "trials": [], "bit_identical": 0, "total": trials}
    total_steps = base[2]
    print(f"crash-resume: uninterrupted run {total_steps} steps in {baseline_seconds:.1f} s", flush=True)

    def trial(index: int) -> dict[str, Any]:
        rng = random.Random(seed * 1000 + index)
        out = root / f"trial-{index}"
        events: list[dict[str, Any]] = []
        for _ in range(kills):
            step, _ = _checkpoints(out)
            if step >= total_steps - 1:
                break
            mode = rng.choice(("step", "save", "time"))
            target = rng.randint(step + 1, total_steps - 1)
            delay = rng.uniform(1.0, baseline_seconds)
            argv = [*base_argv, "--output-dir", str(out)] + (["--resume"] if step > 0 else [])
            event = _killed_run(ctx, argv, out, mode, target, delay, ctx.settings.timeout * 2)
            event["resumed"] = step > 0
            events.append(event)
            if event["result"] in ("finished", "failed", "hang"):
                break
        if not events or events[-1]["result"] == "killed":  # run (resume) to the end
            step, _ = _checkpoints(out)
            argv = [*base_argv, "--output-dir", str(out)] + (["--resume"] if step > 0 else [])
            last = run_cli(ctx, argv, ctx.settings.timeout * 2)
            events.append({"mode": "finish", "resumed": step > 0, "exit_code": last["exit_code"],
                           "result": "finished" if last["exit_code"] == 0 else
                           ("hang" if last["timed_out"] else "failed"), "error": error_of(last["stderr"])})
        entry: dict[str, Any] = {"trial": index, "events": events,
                                 "kills": sum(e["result"] == "killed" for e in events),
                                 "kills_mid_save": sum(bool(e.get("mid_save")) for e in events),
                                 "temporary_folders_left": sorted(_checkpoints(out)[1])}
        if events[-1]["result"] != "finished":
            entry.update(outcome=f"resume {events[-1]['result']}", bit_identical=False,
                         error=events[-1].get("error", ""))
            return entry
        final = _final_state(out)
        if final is None:
            entry.update(outcome="no checkpoint at the end", bit_identical=False)
            return entry
        same_history = final[0] == base[0]
        same_weights = _identical(final[1], base[1])
        entry.update(same_losses=same_history, same_weights=same_weights, final_step=final[2],
                     bit_identical=same_history and same_weights and final[2] == base[2],
                     outcome="bit-identical" if same_history and same_weights else "differs")
        if not same_history:
            diff = next((i for i, (a, b) in enumerate(zip(final[0], base[0])) if a != b),
                        min(len(final[0]), len(base[0])))
            entry["first_different_step"] = diff + 1
            entry["history_lengths"] = [len(final[0]), len(base[0])]
        if not ctx.settings.keep:
            shutil.rmtree(out, ignore_errors=True)
        return entry

    results: list[dict[str, Any]] = [None] * trials  # type: ignore[list-item]
    indices = list(range(trials))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not indices:
                    return
                i = indices.pop(0)
            try:
                results[i] = trial(i)
            except Exception as error:  # noqa: BLE001
                results[i] = {"trial": i, "outcome": f"benchmark error: {type(error).__name__}: {error}",
                              "bit_identical": False}
            r = results[i]
            print(f"  trial {i}: {r['outcome']} after {r.get('kills', 0)} kills "
                  f"({r.get('kills_mid_save', 0)} mid-save)", flush=True)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(max(1, ctx.settings.jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return {"uninterrupted_steps": total_steps, "uninterrupted_seconds": round(baseline_seconds, 1),
            "kills_per_trial": kills, "trials": results, "total": trials,
            "bit_identical": sum(bool(r.get("bit_identical")) for r in results),
            "kills": sum(r.get("kills", 0) for r in results),
            "temporary_folders_left": sum(len(r.get("temporary_folders_left", [])) for r in results),
            "kills_mid_save": sum(r.get("kills_mid_save", 0) for r in results)}


# ---- report -------------------------------------------------------------------------------------------------

def _detail(channel: str, entry: dict[str, Any]) -> str:
    """The most telling line of a failure: the error (or traceback's last) line, or what a wrong success
    printed first."""
    if channel == "api":
        if entry.get("type"):
            return f"{entry['type']}: {entry.get('message', '')}"
        return entry.get("note", "")
    head, tail = entry.get("stderr_head") or [], entry.get("stderr_tail") or []
    if entry["outcome"] == "traceback":
        return (tail or head or [""])[-1]
    if entry["outcome"] == "wrong_success":
        return " | ".join(entry.get("stdout_head") or [])
    if entry["outcome"] == "unclean_error":
        return f"{entry.get('error_line') or '(no error line)'}  <- after: {entry.get('noise', '')}"
    return entry.get("note", "") or (head or [""])[0]


def summarize(cases: list[Case], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    counts = {ch: collections.Counter() for ch in ("cli", "api")}
    by_family: dict[str, dict[str, collections.Counter]] = {ch: collections.defaultdict(collections.Counter)
                                                             for ch in ("cli", "api")}
    for case in cases:
        for channel, entry in results[case.name].items():
            counts[channel][entry["outcome"]] += 1
            by_family[channel][case.family][entry["outcome"]] += 1
    failures = [{"case": c.name, "channel": ch, "outcome": e["outcome"], "expect": c.expect, "note": e.get("note", ""),
                 "detail": _detail(ch, e)}
                for c in cases for ch, e in results[c.name].items() if e["outcome"] in FAILURES + ("setup_failed",)]
    causes = collections.Counter((f["channel"], f["outcome"], results[f["case"]][f["channel"]].get("noise", ""))
                                 for f in failures if f["outcome"] == "unclean_error")
    internal = [{"case": c.name, "channel": ch, "first_line": (e.get("stderr_head") or [""])[0] if ch == "cli"
                 else f"{e.get('type')}: {e.get('message', '')}"}
                for c in cases for ch, e in results[c.name].items()
                if e["outcome"] == "clean_error"
                and (e.get("internal_error") or (ch == "api" and not e.get("user_error")))]
    return {"counts": {ch: dict(v) for ch, v in counts.items()},
            "by_family": {ch: {f: dict(v) for f, v in fams.items()} for ch, fams in by_family.items()},
            "failures": failures, "internal_errors": internal,
            "unclean_causes": [{"channel": ch, "cause": cause, "count": n,
                                "examples": [f["case"] for f in failures
                                             if f["outcome"] == "unclean_error" and f["channel"] == ch
                                             and results[f["case"]][ch].get("noise") == cause][:3]}
                               for (ch, _, cause), n in causes.most_common()]}


def _print_report(cases: list[Case], summary: dict[str, Any], resume: dict[str, Any] | None) -> str:
    families = sorted({c.family for c in cases})
    shown = [o for o in OUTCOMES if any(summary["counts"][ch].get(o) for ch in ("cli", "api"))]
    lines = ["", "## Outcomes", "",
             table(["channel", "cases", *shown],
                   [[ch, sum(summary["counts"][ch].values()), *(summary["counts"][ch].get(o, 0) for o in shown)]
                    for ch in ("cli", "api")]), "", "## By input family (CLI / API)", ""]
    rows = []
    for fam in families:
        cli, api = summary["by_family"]["cli"].get(fam, {}), summary["by_family"]["api"].get(fam, {})
        rows.append([fam, sum(1 for c in cases if c.family == fam), *(f"{cli.get(o, 0)} / {api.get(o, 0)}"
                                                                      for o in shown)])
    lines += [table(["family", "cases", *shown], rows), ""]
    if summary["failures"]:
        lines += ["## Failures", "",
                  "Every traceback, hang, crash, wrong success and wrong refusal, and the CLI's unclean errors; the "
                  "API's unclean errors are grouped by cause below (each one is in the JSON).", ""]
        order = {o: i for i, o in enumerate(FAILURES + ("setup_failed",))}
        listed = [f for f in summary["failures"] if not (f["outcome"] == "unclean_error" and f["channel"] == "api")]
        for f in sorted(listed, key=lambda f: (order[f["outcome"]], f["channel"], f["case"])):
            lines.append(f"- {f['outcome']:<13} {f['channel']:<3} {f['case']}  [{f['expect']}]  "
                         f"{(f['detail'] or f['note'])[:200]}")
        lines.append("")
    if summary["unclean_causes"]:
        lines += ["## Unclean errors by cause", "",
                  "CLI: the first stderr line that is not the error line. API: the exception and its first line.",
                  "", table(["channel", "count", "cause", "e.g."],
                            [[c["channel"], c["count"], c["cause"], ", ".join(c["examples"])]
                             for c in summary["unclean_causes"]]), ""]
    if summary["internal_errors"]:
        lines += [f"## Clean errors of an internal-looking type ({len(summary['internal_errors'])})", ""]
        lines += [f"- {e['channel']:<3} {e['case']}  {e['first_line'][:140]}" for e in summary["internal_errors"][:40]]
        if len(summary["internal_errors"]) > 40:
            lines.append(f"- ... {len(summary['internal_errors']) - 40} more in the JSON")
        lines.append("")
    if resume is not None:
        lines += ["## Crash and resume", ""]
        if resume.get("error"):
            lines.append(f"error: {resume['error']}")
        else:
            lines.append(f"{resume['bit_identical']}/{resume['total']} resumed runs bit-identical to the "
                         f"uninterrupted one ({resume['uninterrupted_steps']} steps; {resume['kills']} SIGKILLs, "
                         f"{resume['kills_mid_save']} of them while a checkpoint was being written; "
                         f"{resume['temporary_folders_left']} half-written checkpoint folders left behind)")
            for r in resume["trials"]:
                detail = ", ".join(f"{e['mode']}" + (f"@{e.get('step_at_kill')}" if e["result"] == "killed" else
                                                     f":{e['result']}") + ("(mid-save)" if e.get("mid_save") else "")
                                   for e in r.get("events", []))
                lines.append(f"- trial {r['trial']}: {r['outcome']}  [{detail}]"
                             + (f"  {r['error']}" if r.get("error") else ""))
        lines.append("")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


# ---- main ---------------------------------------------------------------------------------------------------

def _select(cases: list[Case], settings: Settings) -> list[Case]:
    if settings.quick:
        cases = [c for c in cases if c.quick]
    if settings.only:
        cases = [c for c in cases if c.family in settings.only]
    if settings.match:
        cases = [c for c in cases if re.search(settings.match, c.name)]
    return cases


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def main(quick: bool = True, settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or Settings(quick=quick)
    settings.jobs = max(1, min(settings.jobs, 2))
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="autofit-reliability-"))
    env = {k: v for k, v in os.environ.items() if k != "AUTOFIT_DEBUG"}
    env.update(AUTOFIT_CACHE=str(work / "profile-cache"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1")
    ctx = Context(settings, work, env)
    print(f"work folder {work}; CLI: {shlex.join(settings.cli)}", flush=True)
    try:
        fixtures = work / "fixtures"
        fixtures.mkdir()
        ctx.paths = {k: str(v) for k, v in build_models(fixtures).items()}
        ctx.paths["plan"] = str(fixtures / "plan.json")
        made = run_cli(ctx, [ctx.fill(a) for a in valid_plan_argv()], 600)
        if made["exit_code"] != 0 or not Path(ctx.paths["plan"]).is_file():
            raise SystemExit(f"could not make the valid plan every plan case starts from (exit {made['exit_code']}):"
                             f"\n{made['stderr'][-3000:]}")
        valid_plan = json.loads(Path(ctx.paths["plan"]).read_text())
        cases = _select(all_cases(valid_plan, has_cuda=_has_cuda()), settings)
        n_cli = sum(1 for c in cases if c.argv is not None and c.cli) if settings.cli_runs else 0
        n_api = sum(1 for c in cases if api_call_for(c) is not None) if settings.api else 0
        print(f"{len(cases)} cases ({n_cli} through the CLI, {n_api} through the API); timeout "
              f"{settings.timeout:.0f} s, {settings.jobs} at a time", flush=True)
        results = run_cases(ctx, cases)
        cases_seconds = time.perf_counter() - started
        trials = settings.resume_trials if settings.resume_trials is not None else (2 if settings.quick else 5)
        resume = crash_resume(ctx, trials, kills=2 if settings.quick else 3) if trials > 0 else None
    finally:
        if not settings.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary = summarize(cases, results)
    markdown = _print_report(cases, summary, resume)
    total = sum(summary["counts"][ch].get(o, 0) for ch in ("cli", "api") for o in OUTCOMES)
    headline = {
        "cases": len(cases), "runs": total,
        **{f"cli_{o}": summary["counts"]["cli"].get(o, 0) for o in ("ok", "clean_error", *FAILURES)},
        **{f"api_{o}": summary["counts"]["api"].get(o, 0) for o in ("ok", "clean_error", *FAILURES)},
        "tracebacks": sum(summary["counts"][ch].get("traceback", 0) for ch in ("cli", "api")),
        "wrong_successes": sum(summary["counts"][ch].get("wrong_success", 0) for ch in ("cli", "api")),
        "hangs": sum(summary["counts"][ch].get("hang", 0) for ch in ("cli", "api")),
        "resume_bit_identical": f"{resume['bit_identical']}/{resume['total']}" if resume else None,
    }
    family_sizes = dict(collections.Counter(c.family for c in cases))
    payload = {
        "benchmark": "reliability", "mode": "quick" if settings.quick else "full", **environment(),
        "seconds": round(time.perf_counter() - started, 1), "cases_seconds": round(cases_seconds, 1),
        "settings": {"cli": list(settings.cli), "jobs": settings.jobs, "timeout_s": settings.timeout,
                     "api": settings.api, "cli_runs": settings.cli_runs,
                     "memory_limit_gb": settings.memory_limit_gb, "only": settings.only,
                     "match": settings.match, "subprocess_env": {"OMP_NUM_THREADS": "1", "AUTOFIT_CACHE": "<temp>"}},
        "headline": headline, "families": family_sizes, **summary, "resume": resume,
        "cases": [{"name": c.name, "family": c.family, "expect": c.expect, "note": c.note,
                   "argv": list(c.argv) if c.argv else None, **results[c.name]} for c in cases],
        "markdown": markdown,
    }
    partial = bool(settings.only or settings.match)
    name = "reliability" + ("_quick" if settings.quick else "") + ("_partial" if partial else "")
    path = write_result(name, payload)
    print(f"{len(cases)} cases in {payload['seconds'] / 60:.1f} min; wrote {path}", flush=True)
    return payload


def _parse(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick subset (~65 cases) and 2 resume trials")
    parser.add_argument("--only", help="comma-separated families: control,budget,model,data,options,policy,plan")
    parser.add_argument("--match", help="only cases whose name matches this regular expression")
    parser.add_argument("--cli", help="the command that runs autofit (default: this Python, importing the "
                                      "autofit next to this file)")
    parser.add_argument("--jobs", type=int, default=2, help="processes at a time (at most 2)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a case counts as a hang")
    parser.add_argument("--no-api", action="store_true", help="the CLI only")
    parser.add_argument("--no-cli", action="store_true", help="the Python API only (fast)")
    parser.add_argument("--resume-trials", type=int, help="crash-resume trials (default 5, --quick 2; 0: none)")
    parser.add_argument("--memory-limit-gb", type=float, default=8.0, help="address-space limit per process")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (printed at the start)")
    parser.add_argument("--verbose", action="store_true", help="print each failure as it happens")
    parser.add_argument("--api-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.api_worker is not None:
        api_worker(args.api_worker)
        raise SystemExit(0)
    return Settings(quick=args.quick, cli=tuple(shlex.split(args.cli)) if args.cli else DEFAULT_CLI, jobs=args.jobs,
                    timeout=args.timeout, api=not args.no_api, cli_runs=not args.no_cli,
                    resume_trials=args.resume_trials,
                    memory_limit_gb=args.memory_limit_gb, keep=args.keep, verbose=args.verbose,
                    only=args.only.split(",") if args.only else None, match=args.match)


if __name__ == "__main__":
    settings = _parse()
    main(settings.quick, settings)
