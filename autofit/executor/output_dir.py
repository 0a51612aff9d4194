"""The run's output directory: checked before anything trains, held by one run at a time, tidied after a kill.

Two runs writing checkpoints into one directory would corrupt each other: the second one's tidying removes
the first one's half-written save, and either's resume would pick up the other's steps. A run therefore
holds an exclusive `flock` on `<output_dir>/.autofit.lock` while it trains. The operating system drops the
lock when the process ends, however it ends, so a killed run never leaves the directory locked (its lock file
stays, naming the dead holder; a run that ends removes it). Where `fcntl` does not exist (Windows) there is
no lock.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from autofit.executor.checkpoint import OLD_PREFIX, TMP_PREFIX, CheckpointError, complete, numbered_checkpoints

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".autofit.lock"


@dataclass
class OutputDirClaim:
    """A run's hold on its output directory, from `claim_output_dir` until `release`."""

    lock: IO | None
    """The open lock file whose `flock` keeps other autofit runs out (None without fcntl)."""
    notes: list[str] = field(default_factory=list)
    """What tidying the directory did, one line each."""

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no one locks a file about to vanish) and let go."""
        if self.lock is not None:
            Path(self.lock.name).unlink(missing_ok=True)
            self.lock.close()  # closing the file drops the flock
            self.lock = None

    def __enter__(self) -> OutputDirClaim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_output_dir(output_dir: str | Path, *, resume: bool = False) -> OutputDirClaim:
    """Make `output_dir` writable and this run's alone, then tidy what a killed save left. Raises
    CheckpointError with a one-line reason, when another run holds it too, or (unless `resume`) when it holds
    an earlier run's checkpoints."""
    output_dir = check_output_dir(output_dir)
    claim = OutputDirClaim(_lock(output_dir))
    try:
        claim.notes = tidy_output_dir(output_dir)
        if not resume:
            check_no_earlier_run(output_dir)
    except BaseException:
        claim.release()
        raise
    return claim


def check_output_dir(output_dir: str | Path) -> Path:
    """`output_dir`, made if need be, once a file could be written there; else a one-line CheckpointError."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise CheckpointError(f"--output-dir {output_dir} is a file, not a directory")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f"{TMP_PREFIX}write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise CheckpointError(f"cannot write checkpoints to {output_dir}: {error.strerror or error}") from None
    return output_dir


def check_no_earlier_run(output_dir: str | Path) -> None:
    """Refuse, in one line, a fresh run into a directory holding another run's checkpoints: its saves would
    mingle with them (a resume would pick whichever step is higher) and the old run's would be dropped."""
    found = numbered_checkpoints(output_dir)
    if found:
        raise CheckpointError(f"{output_dir} holds an earlier run's checkpoints ({found[-1].name}"
                              f"{f' and {len(found) - 1} more' if len(found) > 1 else ''}): continue that run "
                              "with --resume, or pick another --output-dir (or remove them)")


def check_output_dir_free(output_dir: str | Path) -> None:
    """Refuse, in one line, an output directory another run is training into (before any profiling)."""
    OutputDirClaim(_lock(Path(output_dir))).release()


def tidy_output_dir(output_dir: Path) -> list[str]:
    """Remove what a killed save left: half-written `.tmp-*` folders go; a `.old-*` folder whose replacement
    never landed comes back. Only safe while this run holds the directory. Returns what it did, one line each."""
    done = []
    for path in sorted(output_dir.iterdir()):
        if path.name.startswith(TMP_PREFIX) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path.name}, left by an interrupted save")
        elif path.name.startswith(OLD_PREFIX) and path.is_dir():
            name = path.name[len(OLD_PREFIX):].rsplit("-", 1)[0]
            if complete(output_dir / name):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.rename(output_dir / name)
                done.append(f"restored {name}, whose replacement an interrupted save never finished")
    return done


def _lock(output_dir: Path) -> IO | None:
    """The lock file of `output_dir`, locked by this process; CheckpointError when another process holds it."""
    if fcntl is None:
        return None
    path = output_dir / LOCK_NAME
    for _ in range(10):  # a holder that released meanwhile removed the file we opened: open the new one
        lock = open(path, "a+")  # noqa: SIM115 - held open for the run, closed by OutputDirClaim.release
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise CheckpointError(f"another autofit run ({holder}) is training into {output_dir}: wait for it "
                                  "to finish, or pick another --output-dir") from None
        if path.exists() and os.path.samestat(os.fstat(lock.fileno()), path.stat()):
            break
        lock.close()
    lock.seek(0)
    lock.truncate()
    lock.write(f"process {os.getpid()} on {socket.gethostname()}")
    lock.flush()
    return lock
