"""What the user sees: selfsup's own lines, once each, on stderr; stdout holds only the final JSON.

By default Ray forwards everything its workers print to the driver's console (`log_to_driver`):
Ray Train's and Ray Data's INFO logs, C++ warnings, other libraries' deprecation warnings, and
some of it on the driver's *stdout*, where it breaks `selfsup … | jq`. A selfsup command starts
Ray with `log_to_driver=False` (the workers' output stays in the session's log files,
`/tmp/ray/session_latest/logs`) and its own lines travel from the workers to the driver through a
`ray.util.queue.Queue` (`Relay`), printed there by a thread while the job runs.

Everything, workers and methods included, writes through the standard `logging` logger named
`selfsup` (`log`): INFO lines read `[selfsup] …`, warnings `[selfsup] WARNING: …`. Where they go is
the pipeline's choice: the driver's stderr (`to_stderr`), or the driver's relay from a worker
(`to_relay`). `SELFSUP_RAY_LOGS=all` brings back Ray's forwarding of every worker's output, for
debugging.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Callable

RAY_LOGS_ENV = "SELFSUP_RAY_LOGS"  # "all": forward every worker's output to the console, as Ray does
# Long work prints a progress line at least this often (seconds); the variable is for tests.
PROGRESS_EVERY_S = float(os.environ.get("SELFSUP_PROGRESS_EVERY_S", 15))

log = logging.getLogger("selfsup")


class UsageError(ValueError):
    """A bad argument or config value, found before Ray starts: the command prints its message as
    one line and exits 2 (`pipelines/cli.py`)."""


class _Format(logging.Formatter):
    def __init__(self, prefix: str = ""):
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname}: "
        return f"[selfsup] {self.prefix}{level}{record.getMessage()}"


def _use(handler: logging.Handler, prefix: str = "") -> None:
    handler.setFormatter(_Format(prefix))
    for old in list(log.handlers):
        log.removeHandler(old)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


# Progress lines are transient. On a terminal each one replaces the last, in place, so the
# console keeps only the lasting lines (epochs, warnings, results). Elsewhere (a log file, a pipe,
# CI) a progress line is written only when nothing was for SILENCE_S, so a long step still shows
# life without burying the lasting lines.
SILENCE_S = 1.7 * PROGRESS_EVERY_S  # with a line due every 15 s, no silence much over 30 s
WATCH_POLL_S = 1.0  # how often a watcher checks whether a progress line is due
_console = {"last": 0.0, "pending": False}


def end_transient() -> None:
    """Clears a transient line still on the terminal, so that a line printed by other means (a
    command's one-line error) starts on a clean line."""
    if _console["pending"]:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()
        _console["pending"] = False


def write(line: str, transient: bool = False) -> None:
    """One console line on stderr (see SILENCE_S for transient ones)."""
    stream, now = sys.stderr, time.monotonic()
    if transient and stream.isatty():
        stream.write("\r\033[K" + line)
        _console["pending"] = True
    elif transient and now - _console["last"] < SILENCE_S:
        return
    else:
        stream.write(("\r\033[K" if _console["pending"] else "") + line + "\n")
        _console["pending"] = False
    stream.flush()
    _console["last"] = now


class _Stderr(logging.Handler):
    """Writes to whatever `sys.stderr` is at the time (a test may have swapped it)."""

    def emit(self, record: logging.LogRecord) -> None:
        write(self.format(record), getattr(record, "transient", False))


def to_stderr() -> None:
    """The `selfsup` logger prints to this process's stderr (the driver, or a plain script)."""
    _use(_Stderr())


# The raylet's notice that more worker processes started than the machine has CPUs. On a local Ray
# it is what Ray Data's fractional-CPU decode tasks beside the training workers do on a small
# machine, with nothing to act on (README, "The console"); a cluster's console keeps it.
RAYLET_STARTUP_NOTICE = "maximum expected startup concurrency"


class _DroppingLines:
    """A text stream that hands `sink` every whole line except those holding `needle`."""

    def __init__(self, sink, needle: str):
        self.sink, self.needle, self.pending = sink, needle, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        kept = [line + "\n" for line in lines if self.needle not in line]
        if kept:
            self.sink.write("".join(kept))
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.sink.write(self.pending)
            self.pending = ""
        self.sink.flush()

    def __getattr__(self, name):  # isatty, encoding, fileno, ...: the sink's
        return getattr(self.sink, name)


def stdout_while_running():
    """What `sys.stdout` is while a command runs, so that stdout holds the JSON line only: stderr,
    without the raylet's startup notice when this command starts its own Ray."""
    return sys.stderr if os.environ.get("RAY_ADDRESS") else _DroppingLines(sys.stderr, RAYLET_STARTUP_NOTICE)


def forward_worker_logs() -> bool:
    """Whether Ray should forward every worker's output to the console (`SELFSUP_RAY_LOGS=all`)."""
    return os.environ.get(RAY_LOGS_ENV, "").lower() == "all"


class _RelayHandler(logging.Handler):
    def __init__(self, queue):
        super().__init__()
        self.queue = queue

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put((self.format(record), getattr(record, "transient", False), getattr(record, "waiting", None)),
                           timeout=10)
        except Exception:  # the driver is gone or slow: the line must not stop training
            print(self.format(record), file=sys.stderr, flush=True)


def to_relay(queue, prefix: str = "") -> None:
    """In a Ray worker: the `selfsup` logger's lines go to the driver's relay (`queue`), or to the
    worker's stderr when there is none (a caller that made no relay); `prefix` names the source
    (e.g. a search's trial)."""
    _use(_RelayHandler(queue) if queue is not None else _Stderr(), prefix)


class Relay:
    """Driver side: a queue actor the workers put lines into and a thread printing them on the
    driver's stderr while the job runs. `with Relay(waiting) as relay:` and pass `relay.queue` to
    the workers' config; leaving the block prints what is left and removes the actor.

    While no line comes, the thread says what the job is waiting for, at the progress cadence:
    `waiting` at first (e.g. the workers' start), then what a worker's line tagged
    `extra={"waiting": ...}` names; a progress line (transient) ends the waiting, since from then
    on the job prints its own progress."""

    def __init__(self, waiting: str = ""):
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._print, name="selfsup-console", daemon=True)
        self.waiting, self.since = waiting, time.monotonic()

    def _print(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                line, transient, waiting = self.queue.get(timeout=0.5)
            except Empty:
                self._say_waiting()
                continue
            except Exception:  # Ray is shutting down
                return
            write(line, transient)
            if waiting is not None:
                self.waiting, self.since = waiting, time.monotonic()
            elif transient:
                self.waiting = ""

    def _say_waiting(self) -> None:
        now = time.monotonic()
        if self.waiting and now - max(_console["last"], self.since) >= PROGRESS_EVERY_S:
            log.info(f"{self.waiting} · {format_seconds(now - self.since)} so far", extra={"transient": True})

    def __enter__(self) -> "Relay":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            for line, transient, _ in self.queue.get_nowait_batch(self.queue.qsize()):
                write(line, transient)
            self.queue.shutdown()
        except Exception:
            pass


class Progress:
    """Progress lines for long work: `tick(done)` prints `[selfsup] {what} done/total · rate/s ·
    ETA` when PROGRESS_EVERY_S has passed since the last line; `extra` adds fields."""

    def __init__(self, what: str, total: int, unit: str = "images", every_s: float = PROGRESS_EVERY_S):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.started = self.last = time.monotonic()

    @contextlib.contextmanager
    def watching(self, count: Callable[[], int]):
        """For work that runs in one blocking call: a thread prints a line every `every_s` with
        `count()` as the amount done (e.g. images seen, from the run's quality log)."""
        stop = threading.Event()

        def watch():
            while not stop.wait(max(0.01, min(WATCH_POLL_S, self.every_s))):
                try:
                    self.tick(count())
                except Exception:  # a count that failed once (Ray busy) is tried again next time
                    pass

        thread = threading.Thread(target=watch, name="selfsup-progress", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=5)

    def due(self) -> bool:
        """On a terminal every `every_s`; elsewhere once the console has been silent for SILENCE_S
        (the only time `write` prints a progress line there), whoever printed last."""
        now = time.monotonic()
        if sys.stderr.isatty():
            return now - self.last >= self.every_s
        return now - self.last >= self.every_s and now - _console["last"] >= SILENCE_S

    def tick(self, done: int, rate: float | None = None, extra: str = "", force: bool = False) -> None:
        if not (force or self.due()):
            return
        now = time.monotonic()
        self.last = now
        if not done:  # no rate to give yet: say what it waits for, not "0.0 images/min"
            log.info(f"{self.what} 0/{self.total:,} {self.unit} · waiting for the first to finish",
                     extra={"transient": True})
            return
        rate = rate if rate is not None else done / max(now - self.started, 1e-9)
        left = (self.total - done) / rate if rate > 0 and self.total else float("nan")
        eta = f" · ETA {format_seconds(left)}" if left == left else ""
        speed = f"{rate:,.0f} {self.unit}/s" if rate >= 1 else f"{rate * 60:,.1f} {self.unit}/min"
        log.info(f"{self.what} {done:,}/{self.total:,} {self.unit} · {speed}{extra}{eta}",
                 extra={"transient": True})


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


ETA_AFTER_STEPS = 3


class StepProgress:
    """Training progress: `step(...)` after each optimizer step; at most every PROGRESS_EVERY_S
    it prints `[selfsup] epoch e/E · step s/S · N img/s · data wait W% · ETA …` (rates over the
    steps since the last line; the ETA from every step since this worker (re)started)."""

    def __init__(self, total_steps: int, epochs: int, start_step: int, every_s: float = PROGRESS_EVERY_S):
        self.total_steps, self.epochs, self.start_step, self.every_s = total_steps, epochs, start_step, every_s
        self.started = self.last = time.monotonic()
        self.images = self.time = self.wait = 0.0

    def step(self, images: int, waited: float, elapsed: float, step: int, epoch: int) -> None:
        self.images, self.time, self.wait = self.images + images, self.time + elapsed, self.wait + waited
        now = time.monotonic()
        timed = step - self.start_step
        if timed == 1:  # the first step ends the start-up (the driver's relay stops saying what it waits for)
            log.info(f"epoch {epoch + 1}/{self.epochs} · step {step}/{self.total_steps} · the first step done "
                     f"{format_seconds(now - self.started)} after the workers started; timing the next",
                     extra={"transient": True})
            self.started = self.last = now
            self.images = self.time = self.wait = 0.0
            return
        if now - self.last < self.every_s or step >= self.total_steps:
            return
        timed -= 1  # steps timed since the first
        per_step = (now - self.started) / max(timed, 1)
        # An ETA from the first step or two measures their start-up, not the run's pace: none until more are timed.
        eta = f" · ETA {format_seconds(per_step * (self.total_steps - step))}" if timed >= ETA_AFTER_STEPS else ""
        rate = self.images / max(self.time, 1e-9)
        speed = f"{rate:,.0f}" if rate >= 10 else f"{rate:.1f}"  # a slow machine's 0.4 img/s is not "0"
        log.info(f"epoch {epoch + 1}/{self.epochs} · step {step}/{self.total_steps} · {speed} img/s · "
                 f"data wait {self.wait / max(self.time, 1e-9):.0%}{eta}", extra={"transient": True})
        self.last, self.images, self.time, self.wait = now, 0.0, 0.0, 0.0
