"""`selfsup tune`: spaces, a 3-trial ASHA search on the sample, best-config round trip, resume."""

import glob
import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from methods import METHODS
from methods.base import LabelFreeObjective
from pipelines.config import build_config
from tests.helpers.cli import selfsup_command, trial_rows
from tests.helpers.runs import COMMON, TINY
from tune.search import LABEL_FREE, TOO_CLOSE, SearchSettings, check_space, objective_note, too_close_note
from tune.space import parse_dimension, parse_space

SIMCLR_DIGITS = {**COMMON, **TINY["simclr"]}


def base_config(**sets):
    return build_config("simclr", "tiny", sets={**SIMCLR_DIGITS, **sets}).to_dict()


def test_space_strings_become_config_keys_and_bad_ones_say_why():
    assert parse_dimension("temperature=loguniform(0.05, 1)").key == "hparams.temperature"
    assert parse_dimension("batch_size=choice(128,256,512)").args == (128, 256, 512)
    assert parse_dimension("hparams.proj_out=grid(32, 64)").dist == "grid"
    assert parse_dimension("lr=grid(1e-9, 0.3)").args == (1e-9, 0.3)  # a number, though YAML 1.1 says string
    assert parse_dimension("views.view.scale=choice([0.2, 1.0], [0.5, 1])").args == ([0.2, 1.0], [0.5, 1])
    for method, cls in METHODS.items():
        assert [d.name for d in parse_space([], method)] == [s.split("=")[0] for s in cls.search_space]
    for bad, message in [("temperature=normal(0, 1)", "expected name=dist"),
                         ("temperature=loguniform(0, 1)", "low end > 0"),
                         ("temperature=uniform(1, 0.5)", "below the high end"),
                         ("warmth=uniform(0, 1)", "unknown name 'warmth'")]:
        with pytest.raises(ValueError, match=message):
            parse_dimension(bad)
    with pytest.raises(ValueError, match="searched twice"):
        parse_space(["lr=uniform(0.1, 1)", "optim.base_lr=choice(0.3)"], "simclr")


def test_space_ends_are_validated_against_the_config_before_ray():
    base, on_three = base_config(), base_config(**{"train.workers": 3})
    with pytest.raises(ValueError, match=r"--space temperature=20: hparams.temperature=20: must be in \(0, 10\]"):
        check_space(base, [parse_dimension("temperature=loguniform(0.05, 20)")], 1438, "digits")
    with pytest.raises(ValueError, match="must divide evenly across 3 workers"):
        check_space(on_three, [parse_dimension("batch_size=choice(64, 96)")], 1438, "digits")
    with pytest.raises(ValueError, match=r"--space batch_size=2048: optim.batch_size=2048: larger than the 1438"):
        check_space(base, [parse_dimension("batch_size=choice(64, 2048)")], 1438, "digits")
    with pytest.raises(ValueError, match="needs --val"):
        SearchSettings(metric="knn_top1").resolved(has_val=False)
    with pytest.raises(ValueError, match="needs the probe set"):
        SearchSettings().resolved(has_val=False, has_probe=False)
    for has_val, objective in ((True, "knn_top1"), (False, "rankme")):
        settings = SearchSettings()
        assert settings.resolved(has_val=has_val).metric == objective
        assert settings.metric == ""  # resolving makes a new one: nothing is changed in place


def test_a_search_without_labels_ranks_by_the_methods_own_objective_and_says_how_far_to_trust_it():
    for name, cls in METHODS.items():
        assert cls.label_free.metric in LABEL_FREE, name
        settings = SearchSettings().resolved(has_val=False, label_free=cls.label_free)
        assert (settings.metric, settings.mode) == (cls.label_free.metric, cls.label_free.mode)
    declared = LabelFreeObjective("alignment", "min", spearman=0.61, trials=16)
    settings = SearchSettings().resolved(has_val=False, label_free=declared)
    assert (settings.metric, settings.mode) == ("alignment", "min")
    assert SearchSettings().resolved(has_val=True, label_free=declared).mode == "max"  # knn_top1's own
    assert SearchSettings(metric="loss").resolved(has_val=True).mode == "max"  # a named metric: max unless told
    assert SearchSettings(metric="loss", mode="min").resolved(has_val=True).mode == "min"
    assert "Spearman +0.61" in declared.agreement("simclr") and "--val" not in declared.agreement("simclr")
    assert "under the +0.5 a trusted" in LabelFreeObjective("rankme", spearman=-0.48, trials=8).agreement("simclr")
    one_search = LabelFreeObjective("alpha_req", "max", spearman=0.93, trials=8).agreement("byol")
    assert "fewer than the 16 trials" in one_search and "--val" in one_search
    assert "not measured" in LabelFreeObjective().agreement("distill")

    def rows(*values):
        return [{"trial_id": f"t{i}", "rankme": v, "status": "finished"} for i, v in enumerate(values)]

    rankme = SearchSettings().resolved(has_val=False)  # distillation declares RankMe, unmeasured
    apart, close = rows(20.0, 15.0, 9.0), rows(15.0, 15.0 - 6.0 * TOO_CLOSE / 2, 9.0)
    assert too_close_note(close[:2], rankme) is None  # two trials: no range to judge closeness by
    assert "not measured for distill" in objective_note(rankme, "distill") and too_close_note(apart, rankme) is None
    assert "does not separate trials t0 and t1" in too_close_note(close, rankme)
    assert "does not separate trials t0 and t1" in too_close_note(close[::-1], rankme)  # ranked, whatever the order
    labels = SearchSettings().resolved(has_val=True)
    assert objective_note(labels, "mae") is None and too_close_note(close, labels) is None  # labels: nothing to say
    chosen = SearchSettings(metric="lidar").resolved(has_val=False)
    assert "chosen by --metric" in objective_note(chosen, "mae")


def test_each_measured_objective_is_the_label_free_studys_row():
    """A method's declared agreement is the study's figure in docs/FINDINGS.md, not a copy that drifts."""
    findings = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "FINDINGS.md")).read()
    for name, cls in METHODS.items():
        objective = cls.label_free
        if objective.spearman is not None:
            row, score = f"| {name} | {objective.trials} |", ("-" if objective.mode == "min" else "") + objective.metric
            rows = [line for line in findings.splitlines() if line.startswith(row) and f"| {score} |" in line]
            assert rows and f"| {objective.spearman:+.2f} |" in rows[0], f"{name}: no study row for {objective}"


def search_command(out, storage, name):
    sets = {**SIMCLR_DIGITS, "optim.epochs": 2, "train.checkpoint_every_steps": 5}
    return selfsup_command("tune", "--method", "simclr", "--preset", "tiny", "--data", f"{out}/train", "--val", f"{out}/test",
                           "--space", "lr=grid(0.6, 0.3, 1e-9)", "--samples", "1", "--scheduler", "asha",
                           "--metric", "loss", "--mode", "min", "--max-concurrent", "1", "--storage", str(storage),
                           "--name", name, "--num-cpus", "2", sets=sets)


@pytest.fixture(scope="module")
def killed_search(digits, tmp_path_factory):
    """Three trials one after another: two learn, the last has an LR of ~0 (it cannot lower its
    loss; ranked by the loss, comparable here because only the LR differs). The driver is killed
    during the second trial, and the same command is run again."""
    import ray

    out, _ = digits
    storage = tmp_path_factory.mktemp("tune")
    # The driver joins the test session's Ray, as `ray job submit` joins a cluster: a second Ray
    # instance on the machine would break Ray's own state-API calls (placement-group cleanup).
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    command = search_command(out, storage, "search")
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    train = storage / "search" / "train"

    def second_trial_checkpointed():  # a checkpoint counts once the controller registered it
        runs = sorted(os.listdir(train)) if train.exists() else []
        snapshots = [train / run / "checkpoint_manager_snapshot.json" for run in runs]
        return len(runs) == 2 and all(p.exists() and "checkpoint_" in p.read_text() for p in snapshots)

    deadline = time.time() + 400
    try:
        while not second_trial_checkpointed():
            assert time.time() < deadline and driver.poll() is None, "the search did not reach its second trial"
            time.sleep(0.5)
    finally:  # also when the wait fails: a driver left running would hold the session's CPUs
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver dies; its trials (actors it owns) die with it
    driver.wait()
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address
    while list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]):
        assert time.time() < deadline + 120, "the dead driver's training workers did not stop"
        time.sleep(1)
    runs_at_kill = sorted(os.listdir(train))
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    last = rerun.stdout.strip().splitlines()[-1]
    assert last.startswith("{"), rerun.stdout[-3000:]  # the JSON line comes last
    return json.loads(last), storage, runs_at_kill, rerun.stderr


def test_three_trial_search_writes_table_best_yaml_and_picture(killed_search):
    result, _, _, console = killed_search
    table = trial_rows(result)
    assert len(table) == 3 and result["trials"] == 3
    assert {row["lr"] for row in table} == {"0.6", "0.3", "1e-09"}
    assert all(float(row["peak_lr"]) == pytest.approx(float(row["lr"]) * 8) for row in table)  # sqrt(64)
    assert "sqrt" in open(result["trials.md"]).read()
    assert os.path.getsize(result["search.png"]) > 5000
    # The trials' own lines reach the search's console, each naming its trial.
    assert any(line.startswith("[selfsup] trial ") and " epoch " in line for line in console.splitlines()), console[-3000:]


def test_asha_stops_the_bad_trial_before_its_last_epoch(killed_search):
    result, _, _, _ = killed_search
    bad = next(row for row in trial_rows(result) if row["lr"] == "1e-09")
    assert bad["status"] == "stopped early" and int(bad["epochs_run"]) < 2
    assert result["best"]["lr"] != 1e-9 and result["best"]["status"] == "finished"


def test_best_yaml_reproduces_its_trials_config(killed_search):
    result, storage, _, _ = killed_search
    from_yaml = build_config("simclr", file=result["best.yaml"]).to_dict()
    snapshots = glob.glob(str(storage / "search" / "train" / result["best"]["trial_id"] / "checkpoint_*" / "config.yaml"))
    assert snapshots, "the best trial's checkpoints hold the config it ran"
    with open(sorted(snapshots)[-1]) as stream:
        assert from_yaml == yaml.safe_load(stream)


def test_killed_search_resumed_where_it_stopped(killed_search):
    result, storage, runs_at_kill, _ = killed_search
    assert result["by_status"]["error"] == 0
    runs = sorted(os.listdir(storage / "search" / "train"))
    assert runs[:2] == runs_at_kill and len(runs) == 3  # no trial started over under a new id
    reports = [json.loads(line) for path in glob.glob(str(storage / "search" / "*" / "result.json"))
               for line in open(path)]
    assert any(report.get("resumed_from_step", 0) > 0 for report in reports)  # the interrupted trial resumed
