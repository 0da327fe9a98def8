import os

import pytest

from pipelines.train.local_ray import keep_local_ray_on_loopback, use_local_train_settings, warm_workers_config  # noqa: E402

# The tests' own Rays listen on loopback only, as `selfsup`'s do (set before anything imports Ray).
keep_local_ray_on_loopback()
# MLflow 3 keeps its file store (the tests' tracking server) behind this switch; set before Ray
# starts, so Ray's processes (the run controllers that log to MLflow) inherit it.
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


# Lines a test puts in the session's log even when it passes (CI runs `pytest -q`, which shows
# no passing test's output): where a cross-host run trained, what the autoscaler took.
REPORTED_LINES: list[str] = []


@pytest.fixture
def report_line():
    """`report_line(text)`: `text` in the session's summary, under "measured by the tests"."""
    return REPORTED_LINES.append


def pytest_terminal_summary(terminalreporter):
    if REPORTED_LINES:
        terminalreporter.section("measured by the tests")
        for line in REPORTED_LINES:
            terminalreporter.write_line(line)


def pytest_collection_modifyitems(items):
    """Two tiers: a test that needs the session's Ray (directly or through a fixture that trains
    or prepares on it) is `slow`, as is one marked so by hand (its own Ray, or a subprocess that
    starts one). `pytest -m "not slow"` runs the rest in under two minutes."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session, sized for a 2-core machine."""
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # The dashboard stays on: the state API (used to find and kill a worker) and Tune need it.
    # As a local `selfsup` Ray (pipelines/train/local_ray.py): idle workers kept, so that no run of the
    # session starts and imports its decode and Train processes again, and Ray Train's local settings.
    use_local_train_settings()
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, logging_level="WARNING", include_dashboard=True,
             _system_config=warm_workers_config(2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits(ray_session, tmp_path_factory):
    """sample:digits prepared once, in small shards so streaming spans many files."""
    from pipelines.images.prepare import PrepareConfig, prepare

    out = str(tmp_path_factory.mktemp("digits"))
    summary = prepare("sample:digits", out, PrepareConfig(shard_mb=0.02, row_group_mb=0.005))
    return out, summary


@pytest.fixture(scope="session")
def learns_run(digits, tmp_path_factory):
    """`learns_run(method)`: that method's "it learns" run (tests/helpers/runs.py `LEARNS`, with the
    label-free metrics at its end), trained once a session: tests/test_learns.py judges its
    encoder, the tests of `mae_run` read MAE's and tests/test_dino_pipeline.py DINO's."""
    from pipelines.train.pretrain import pretrain
    from tests.helpers.runs import learns_config

    out, _ = digits
    storage, runs = tmp_path_factory.mktemp("learns"), {}

    def run(method: str) -> dict:
        if method not in runs:
            runs[method] = pretrain(learns_config(method), f"{out}/train", storage=str(storage), name=method)
        return runs[method]

    return run


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """A local MLflow tracking store (see the switch above)."""
    return f"file://{tmp_path_factory.mktemp('mlruns')}"


@pytest.fixture(scope="session")
def one_epoch_run(mlflow_uri, digits, tmp_path_factory):
    """SimCLR (small-image ResNet), one epoch, tracked to TensorBoard and MLflow; test_pretrain
    resumes it to two epochs under the same name."""
    from pipelines.train.pretrain import pretrain
    from tests.helpers.runs import tiny_config

    out, _ = digits
    storage = str(tmp_path_factory.mktemp("runs"))
    config = tiny_config(**{"optim.epochs": 1, "tracking.mlflow_uri": mlflow_uri})
    return storage, pretrain(config, f"{out}/train", storage=storage, name="again")


@pytest.fixture(scope="session")
def mae_run(learns_run):
    """MAE (the `tiny` ViT at patch 2), its "it learns" run: label-free metrics at the end."""
    return learns_run("mae")


@pytest.fixture(scope="session")
def own_ray_pretrain(digits, tmp_path_factory):
    """A real `selfsup pretrain` in a process of its own, which starts its own Ray as a user's
    does, run once a session with the sockets its process tree listened on while it ran:
    tests/test_console.py reads its console, tests/test_security.py its sockets. Returns
    (`subprocess.CompletedProcess`, `{(process name, address, port)}`)."""
    from tests.helpers.cli import selfsup_command
    from tests.helpers.listening import run_watching_sockets

    out, _ = digits
    folder = tmp_path_factory.mktemp("own-ray")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    environ["SELFSUP_PROGRESS_EVERY_S"] = "1"
    command = selfsup_command("pretrain", "--method", "simclr", "--preset", "tiny", "--data", f"{out}/train",
                              "--val", f"{out}/test", "--storage", str(folder), "--name", "console", "--num-cpus", "2",
                              sets={"optim.epochs": 2, "optim.batch_size": 128, "optim.warmup_epochs": 0,
                                    "data.canvas_size": 16, "views.view.size": 16,
                                    "backbone.kwargs.channels": [8, 16, 32, 64], "backbone.kwargs.stem_width": 8})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return run_watching_sockets(command, root, environ, folder, timeout=900)
