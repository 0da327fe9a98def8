import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/corpus.py


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session, sized for a 2-core machine."""
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # The dashboard stays on: the state API (used to find and kill a worker) and Tune need it.
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, logging_level="WARNING", include_dashboard=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits(ray_session, tmp_path_factory):
    """sample:digits prepared once, in small shards so streaming spans many files."""
    from pipelines.prepare import PrepareConfig, prepare

    out = str(tmp_path_factory.mktemp("digits"))
    summary = prepare("sample:digits", out, PrepareConfig(shard_mb=0.02, row_group_mb=0.005))
    return out, summary
