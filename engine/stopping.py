"""Stopping a run without losing work, and keeping one run per folder.

SIGTERM (a cluster preempting, SLURM's time limit, `docker stop`, torchrun forwarding a stop),
SIGINT (Ctrl-C) and SIGUSR1 / SIGUSR2 (SLURM's `--signal=USR1@120` lead time) ask for a
checkpoint at the next step boundary; every rank agrees on that step (trainer.py), saves, and the
run ends with `Stopped`, exit status 128 + the signal. The same signal again, a second or more
later, stops at once (the default action); a repeat within that second is a second delivery of
the same stop (a terminal's Ctrl-C reaches torchrun and its workers, and torchrun forwards it).

`RunFolder` holds an exclusive lock on the output folder while a run trains in it and clears the
partial checkpoints an interrupted save left behind (they can be tens of GB).
"""

import fcntl
import logging
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

from .errors import RunError

log = logging.getLogger(__name__)

STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2") if hasattr(signal, name)
)
_REPEAT_GRACE_S = 1.0


class Stopped(RunError):
    """The run stopped on a signal after saving a checkpoint; `exit_code` is 128 + the signal.
    `quiet` on every rank but 0: one line for the run, not one per rank."""

    def __init__(self, message: str, signum: int, quiet: bool = False):
        super().__init__(message)
        self.exit_code = 128 + signum
        self.quiet = quiet


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopRequests:
    """Within: the first stop signal is recorded in `signum` instead of ending the process.
    Handlers are installed only in the main thread (Python delivers signals there alone)."""

    def __init__(self):
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            return
        if now - self._first_at < _REPEAT_GRACE_S:
            return  # the same stop, delivered twice
        self.__exit__(None, None, None)  # the user insists: the default action, now
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


class RunFolder:
    """An exclusive lock on `out_dir/.lock` (rank 0 takes it) for as long as a run trains there,
    and the cleaning of what interrupted saves left. The lock is advisory (flock): where the file
    system does not support it the run goes on with a warning."""

    def __init__(self, out_dir: Path, enabled: bool = True):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self._handle = None

    def __enter__(self) -> "RunFolder":
        if not self.enabled:
            return self
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / ".lock"
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunError(
                f"train.output_dir {self.out_dir} is in use by another run ({holder}); wait for it to end, "
                "or choose another train.output_dir"
            ) from None
        except OSError as err:
            log.warning("cannot lock %s (%s): nothing stops two runs from sharing this folder", path, err)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._handle = handle
        self.clear_partial_saves()
        return self

    def clear_partial_saves(self) -> list[Path]:
        """Remove the temporary folders and files of checkpoint saves that never finished: with the
        lock held, no writer of them is alive."""
        root = self.out_dir / "checkpoints"
        removed = []
        if not root.is_dir():
            return removed
        for path in sorted(root.iterdir()):
            name = path.name
            if not (name.startswith(".step-") or name.startswith(".latest.tmp")):
                continue
            if ".old-" in name:  # a published checkpoint moved aside while its step was saved again
                final = root / name[1:].split(".old-")[0]
                if not final.exists():  # the save died between the two renames: this is the only copy
                    os.replace(path, final)
                    log.warning("restored %s from %s, left by a save that did not finish", final, path)
                    continue
            size = (
                sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
                if path.is_dir()
                else path.stat().st_size
            )
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            log.warning(
                "removed %s (%.1f MB), left by a checkpoint save that did not finish", path, size / 1e6
            )
            removed.append(path)
        return removed

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            try:
                self._handle.seek(0)
                self._handle.truncate()
                fcntl.flock(self._handle, fcntl.LOCK_UN)
            finally:
                self._handle.close()
                self._handle = None
