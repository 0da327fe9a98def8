"""What the user sees: selfsup's lines once each on stderr, progress on long work, stdout = JSON."""

import json

from pipelines import console
from pipelines.console import Progress, StepProgress, log, to_stderr


def test_step_progress_says_where_training_is_and_when_it_ends(capsys, monkeypatch):
    monkeypatch.setattr(console, "SILENCE_S", 0)  # not a terminal: progress only after silence
    to_stderr()
    ticker = StepProgress(total_steps=10, epochs=2, start_step=0, every_s=0)
    ticker.step(images=64, waited=0.25, elapsed=1.0, step=4, epoch=0)
    line = capsys.readouterr().err.strip()
    assert line.startswith("[selfsup] epoch 1/2 · step 4/10 · 64 img/s · data wait 25% · ETA ")
    ticker.step(images=64, waited=0.0, elapsed=1.0, step=10, epoch=1)  # the last step: the epoch line says it
    assert capsys.readouterr().err == ""
    quiet = StepProgress(total_steps=10, epochs=2, start_step=0, every_s=3600)
    quiet.step(images=64, waited=0.0, elapsed=1.0, step=1, epoch=0)  # the first step is said at once: start-up over
    assert "step 1/10 · the first step done " in capsys.readouterr().err
    quiet.step(images=64, waited=0.0, elapsed=1.0, step=2, epoch=0)  # then the cadence
    assert capsys.readouterr().err == ""
    early = StepProgress(total_steps=10, epochs=2, start_step=5, every_s=0)  # resumed at step 5
    early.step(images=64, waited=0.0, elapsed=1.0, step=6, epoch=0)
    assert "step 6/10 · the first step done" in capsys.readouterr().err
    early.step(images=4, waited=0.0, elapsed=1.0, step=7, epoch=0)  # one step timed since: no ETA; a slow rate kept
    assert capsys.readouterr().err.strip() == "[selfsup] epoch 1/2 · step 7/10 · 4.0 img/s · data wait 0%"


def test_progress_at_zero_says_what_it_waits_for(capsys, monkeypatch):
    monkeypatch.setattr(console, "SILENCE_S", 0)
    to_stderr()
    Progress("prepare: checked", 5000, every_s=0).tick(0)
    line = capsys.readouterr().err.strip()
    assert line == "[selfsup] prepare: checked 0/5,000 images · waiting for the first to finish"


def test_progress_of_one_blocking_call_is_printed_by_a_watcher(capsys, monkeypatch):
    monkeypatch.setattr(console, "SILENCE_S", 0)
    to_stderr()
    counts = iter(range(100, 10_000, 100))
    with Progress("embed:", 5000, every_s=0.05).watching(lambda: next(counts)):
        import time

        time.sleep(0.3)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and all(line.startswith("[selfsup] embed: ") and "/5,000 images" in line for line in lines)


class Terminal:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def test_progress_lines_replace_each_other_on_a_terminal_and_are_sparse_elsewhere(monkeypatch, capsys):
    to_stderr()
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    log.info("epoch 1/2 · step 1/4", extra={"transient": True})
    log.info("epoch 1/2 · step 2/4", extra={"transient": True})
    log.info("epoch 1/2 step 4/4 loss 1.0")
    clear = "\r\033[K"  # back to the line's start, erase it
    assert terminal.text == (f"{clear}[selfsup] epoch 1/2 · step 1/4{clear}[selfsup] epoch 1/2 · step 2/4"
                             f"{clear}[selfsup] epoch 1/2 step 4/4 loss 1.0\n")
    monkeypatch.undo()
    monkeypatch.setattr(console, "SILENCE_S", 3600)  # a pipe: a progress line only after an hour's silence
    to_stderr()
    log.info("lasting")
    log.info("progress", extra={"transient": True})
    assert capsys.readouterr().err == "[selfsup] lasting\n"


def test_the_raylets_startup_notice_is_dropped_on_a_local_ray_and_kept_on_a_cluster(monkeypatch, capsys):
    notice = ("(raylet) WARNING: 8 PYTHON worker processes have been started on node: 70dc with address: 127.0.0.1, "
              "which is 4x the maximum expected startup concurrency (2). This could be a result of ...")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    stream = console.stdout_while_running()
    print(notice, file=stream)  # print writes the line and its newline separately
    print("a library's line", file=stream)
    stream.write("no newline yet")
    stream.flush()
    assert capsys.readouterr().err == "a library's line\nno newline yet"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    print(notice, file=console.stdout_while_running())
    assert capsys.readouterr().err == notice + "\n"


def test_the_relay_says_what_the_job_waits_for_after_a_silence_only(capsys, monkeypatch):
    """Issue 34, item 4: between the start line and the first step (Ray Train starting the workers,
    the first batches decoding: minutes on a busy machine) the driver says what it waits for."""
    import time

    from pipelines.console import Relay

    monkeypatch.setattr(console, "SILENCE_S", 0)
    to_stderr()
    relay = Relay.__new__(Relay)  # its thread's logic, without the queue actor (Ray)
    relay.waiting, relay.since = "waiting for the first decoded batches", time.monotonic() - 40
    monkeypatch.setitem(console._console, "last", time.monotonic() - 1)  # a line a second ago
    relay._say_waiting()
    assert capsys.readouterr().err == ""
    monkeypatch.setitem(console._console, "last", time.monotonic() - 20)
    relay._say_waiting()
    assert capsys.readouterr().err.strip() == "[selfsup] waiting for the first decoded batches · 40s so far"
    relay.waiting = ""  # a progress line came: the job says its own progress from here on
    monkeypatch.setitem(console._console, "last", time.monotonic() - 20)
    relay._say_waiting()
    assert capsys.readouterr().err == ""


def test_a_pretrain_console_is_selfsups_own_lines_once_and_stdout_is_one_json_line(own_ray_pretrain):
    """A real `selfsup pretrain` in its own process (conftest's `own_ray_pretrain`): Ray's forwarded
    worker logs used to double each epoch line, bury it in Ray Train/Data INFO lines and land a
    raylet warning on stdout."""
    done, _ = own_ray_pretrain
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.splitlines()) == 1, done.stdout
    result = json.loads(done.stdout)
    assert result["metrics"]["epoch"] == 2
    lines = done.stderr.splitlines()
    for epoch in (1, 2):
        assert sum(line.startswith(f"[selfsup] epoch {epoch}/2 step ") for line in lines) == 1, lines
    assert any(" · ETA " in line for line in lines), lines  # progress inside the epochs
    assert not any("Traceback" in line or "INFO" in line for line in lines), lines
    ours = [line for line in lines if line.startswith("[selfsup]")]
    assert len(ours) > len(lines) / 2, lines
    assert ours[0] == "[selfsup] pretrain: loading PyTorch and Ray, then checking the inputs"  # at once
    assert ours[1].startswith("[selfsup] pretrain: simclr, preset tiny: 2 epochs x "), ours[1]  # what it chose
    assert any(line.startswith("[selfsup] 1 worker ready on cpu; ") for line in ours), ours


def test_a_command_on_a_terminal_says_at_once_what_it_is_loading(monkeypatch, tmp_path):
    """Issue 34, item 4: the seconds PyTorch and Ray take to load get a line of their own on a
    terminal, replaced by the next; a one-line error starts on a clean line."""
    import sys

    from pipelines.cli import main

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["pretrain", "--method", "simclr", "--data", str(tmp_path / "nothing")]) == 2
    clear = "\r\033[K"
    opening = f"{clear}[selfsup] pretrain: loading PyTorch and Ray, then checking the inputs{clear}"
    assert terminal.text.startswith(opening) and terminal.text[len(opening):].startswith("selfsup pretrain: error: ")
    assert terminal.text.count("\n") == 1  # the error, one line


def test_a_line_printed_on_stdout_after_the_command_has_returned_goes_to_stderr(tmp_path):
    """Ray's shutdown at exit may print a raylet's warning on the driver's stdout after `main` has
    returned; the `selfsup` script keeps stdout for the JSON line even then (here: a refused command,
    then a library's line at exit)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import atexit, sys; atexit.register(lambda: print('a late line from a library')); "
            "from pipelines.cli import script; "
            f"sys.argv = ['selfsup', 'prepare', {str(tmp_path / 'missing')!r}, '--out', {str(tmp_path / 'out')!r}]; "
            "script()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr[-2000:])
    assert "a late line from a library" in done.stderr and "selfsup prepare: error:" in done.stderr
