"""Several selfsup commands on one machine at once, each starting a Ray of its own (issue 18); the
search among them is also the suite's search without labels (no --val: ranked by SimCLR's
label-free objective).

Ray Train and Ray Data call Ray's state API from inside their actors without an address; with
more than one Ray on the machine those calls fail ("Found multiple active Ray instances"), the
Train placement-group cleaner dies of it, and a Tune trial's placement group can leak so that the
next trial waits for CPUs forever. The commands pin their workers to their own Ray
(`pipelines.local_ray.pin_ray_address`); here a run and a 2-trial search start together beside
the test session's Ray (three Rays in all: a second run beside them met no code the first does
not), and the workers' own log files are searched for the
error, which the runs themselves would survive silently.
"""

import glob
import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest

from methods import METHODS
from pipelines.train.local_ray import LOCAL_TRAIN_SETTINGS, WARM_WORKERS, use_local_train_settings, warm_workers_config
from tests.helpers.cli import selfsup_command, set_args, trial_rows
from tests.helpers.runs import COMMON, TINY
from tests.helpers.timing import deadline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def own_ray_command(args: list[str], ray_tmp: str, cwd) -> subprocess.Popen:
    """A selfsup command that starts its own Ray, with that Ray's files (and logs) under `ray_tmp`."""
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp, "PYTHONPATH": REPO}
    return subprocess.Popen(selfsup_command(*args), env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def worker_logs_saying(ray_tmp: str, text: str) -> list[str]:
    found = []
    for path in glob.glob(os.path.join(ray_tmp, "**", "logs", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, errors="replace") as stream:
                if text in stream.read():
                    found.append(os.path.basename(path))
    return found


def test_a_local_ray_keeps_warm_workers_up_to_a_floor_or_one_per_cpu():
    """Ray's own limit (one idle worker per CPU) is raised on small machines and kept on big ones."""
    assert warm_workers_config(2) == {"num_workers_soft_limit": WARM_WORKERS}
    assert warm_workers_config(4 * WARM_WORKERS) == {"num_workers_soft_limit": 4 * WARM_WORKERS}


def test_ray_train_settings_of_a_local_ray_reach_its_controllers_and_leave_the_users_own():
    """Ray Train hands these variables from the driver to each run's controller (a renamed one
    would be silently ignored); a value the user set is kept."""
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE

    assert set(LOCAL_TRAIN_SETTINGS) <= set(ENV_VARS_TO_PROPAGATE)
    environ = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3"}
    use_local_train_settings(environ)
    assert environ == {**LOCAL_TRAIN_SETTINGS, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3"}


@pytest.mark.slow
def test_a_run_and_a_search_at_once_each_on_its_own_ray_finish_quietly(digits, tmp_path):
    out, _ = digits
    sets = set_args({**COMMON, **TINY["simclr"], "optim.epochs": 1})
    # Short folders: Ray's socket paths live under RAY_TMPDIR and must stay under ~107 characters.
    ray_tmps = [tempfile.mkdtemp(prefix="ss-") for _ in range(2)]
    try:
        run_both_at_once(out, tmp_path, sets, ray_tmps)
    finally:
        for ray_tmp in ray_tmps:
            shutil.rmtree(ray_tmp, ignore_errors=True)


def run_both_at_once(out, tmp_path, sets, ray_tmps):
    started = time.time()
    commands = {
        "run": own_ray_command(["pretrain", "--method", "simclr", "--preset", "tiny", "--data", "train",
                                "--storage", str(tmp_path), "--name", "a", *sets], ray_tmps[0], out),
        "search": own_ray_command(["tune", "--method", "simclr", "--preset", "tiny", "--data", "train", "--samples", "2",
                                   "--scheduler", "fifo", "--storage", str(tmp_path), "--name", "search", *sets],
                                  ray_tmps[1], out),
    }
    results, stderrs = {}, {}
    for name, process in commands.items():
        stdout, stderr = process.communicate(timeout=max(60, deadline("two_rays") - (time.time() - started)))
        assert process.returncode == 0, f"{name}: {stderr[-3000:]}"
        assert "Traceback" not in stderr, f"{name}: {stderr[-3000:]}"
        results[name], stderrs[name] = json.loads(stdout.strip().splitlines()[-1]), stderr
    print(f"a run and a search together: {time.time() - started:.0f} s")

    assert results["run"]["metrics"]["step"] == results["run"]["metrics"]["total_steps"] > 0
    assert results["search"]["by_status"]["finished"] == 2  # a leaked placement group would starve the later trial
    search_without_labels_ranks_by_the_methods_objective(results["search"], stderrs["search"])
    for name, ray_tmp in zip(commands, ray_tmps):
        assert worker_logs_saying(ray_tmp, "Found multiple active Ray instances") == [], name


def search_without_labels_ranks_by_the_methods_objective(result, stderr):
    """No --val: the objective is the metric SimCLR declares for searches without labels, on the
    probe set, and the console and the table name it with its measured agreement. (--data is
    relative to where the command ran: the trials, which run in their own folders, still found it.)"""
    objective = METHODS["simclr"].label_free
    table = trial_rows(result)
    assert len(table) == 2 and all(row["status"] == "finished" for row in table)
    values = [float(row[objective.metric]) for row in table]
    assert values == sorted(values, reverse=objective.mode == "max")  # ranked by the objective, best first
    assert all(float(row["rankme"]) > 1 and float(row["lidar"]) >= 1 for row in table)  # every metric reported
    assert "knn_top1" not in table[0]  # no labels anywhere
    report = open(result["trials.md"]).read()
    agreement = objective.agreement("simclr")
    assert f"Trials are ranked by `{objective.metric}`" in report and agreement in report
    assert f"no labels: trials are ranked by {objective.metric}" in stderr and agreement in stderr
    assert result["best"][objective.metric] == values[0] and os.path.exists(result["best.yaml"])
