"""Checkpoints, in one place: what a run saves for an exact resume, reading it back without
unpickling code, choosing the newest one that loads, keeping a run folder to what Ray registered,
and building a method (fresh, or with a checkpoint's weights).

A checkpoint is a folder with `state.pt` (weights, optimizer, scaler, progress, RNG states; loadable
with `torch.load(weights_only=True)`) and `config.yaml` (the complete run config). Every reader
goes through `load_state`; a damaged file and a refused one are `DataError`s with a one-line message.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import zipfile

import numpy as np
import torch
import yaml

from methods import get_method
from pipelines.config import RunConfig, config_from_dict
from pipelines.console import log
from pipelines.data.shards import DataError

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"


def build_method(config: RunConfig):
    """The configured method with freshly initialised weights (seeded)."""
    torch.manual_seed(config.train.seed)
    return get_method(config.method)(config.backbone, config.hparams, config.recipe())


def rng_state() -> dict:
    numpy_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state[1].tolist(), "numpy_pos": int(numpy_state[2]),
             "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, rank: int = 0) -> None:
    """Restores the checkpoint's generators (rank 0's). Rank 0 continues exactly; every other
    rank branches off to a stream of its own, or all workers would draw the same view parameters
    after a resume."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if rank > 0:
        torch.manual_seed(int(torch.randint(0, 2**62, (1,)).item()) + rank)


def save_checkpoint(folder: str, method, optimizer, scaler, progress: dict, config: RunConfig) -> None:
    """Everything an exact resume needs, loadable with `torch.load(weights_only=True)`. The state
    is written under another name and renamed when complete, so a crash mid-write never leaves a
    partial file under the name a loader looks for."""
    partial = os.path.join(folder, STATE_FILE + ".partial")
    torch.save(
        {
            "method": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "progress": progress,
            "rng": rng_state(),
        },
        partial,
    )
    with open(os.path.join(folder, CONFIG_FILE), "w") as stream:
        yaml.safe_dump(config.to_dict(), stream, sort_keys=False)
    os.replace(partial, os.path.join(folder, STATE_FILE))


class CheckpointRefused(DataError):
    """A checkpoint file that holds more than tensors and plain values (pickled code)."""


class CheckpointDamaged(DataError):
    """A checkpoint file that cannot be read (truncated, or not a torch file)."""


def load_state(folder: str) -> dict:
    """A checkpoint's state, unpickling tensors and plain containers only: a file crafted to run
    code when loaded is refused, not executed."""
    path = os.path.join(folder, STATE_FILE)
    # torch.save writes a zip whose directory is at its end: a truncated or foreign file has none,
    # and is damaged, not refused (the unpickler would report it as a refusal).
    if os.path.exists(path) and not zipfile.is_zipfile(path):
        raise CheckpointDamaged(f"checkpoint {path}: damaged, cannot be read (truncated or not a torch file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0][:200]
        raise CheckpointRefused(f"checkpoint {path}: refused: it holds pickled objects, not only weights "
                                f"({reason})") from None
    except (RuntimeError, EOFError, OSError) as error:  # torch's zip reader reports truncation as RuntimeError
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise CheckpointDamaged(f"checkpoint {path}: damaged, cannot be read ({reason})") from None


class CheckpointNotFound(DataError):
    """A `--checkpoint` path that holds no selfsup checkpoint, or none that can be read."""


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's registered checkpoints
ORPHANS = "orphaned"


def forget_missing(run_folder: str) -> list[str]:
    """Takes the checkpoints that no longer exist (a damaged one the user deleted) out of Ray's
    snapshot of `run_folder`, so the run resumes from the newest one that does: Ray Train refuses
    a whole run folder whose snapshot names a missing checkpoint ("a reference to a checkpoint
    that does not exist anymore"). The snapshot before the change is kept beside it as `.bak`.
    Returns the names taken out."""
    snapshot = os.path.join(run_folder, RAY_SNAPSHOT)
    if not os.path.exists(snapshot):
        return []
    with open(snapshot) as stream:
        record = json.load(stream)
    results, indices = record.get("checkpoint_results", []), record.get("checkpoint_report_indices", [])
    missing = [r["checkpoint_dir_name"] for r in results
               if not os.path.isdir(os.path.join(run_folder, r["checkpoint_dir_name"]))]
    if not missing:
        return []
    kept = [(r, i) for r, i in zip(results, indices) if r["checkpoint_dir_name"] not in missing]
    record["checkpoint_results"] = [r for r, _ in kept]
    record["checkpoint_report_indices"] = [i for _, i in kept]
    if (record.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name") in missing:
        record["latest_checkpoint_result"] = kept[-1][0] if kept else None
    pending = [(r, v) for r, v in zip(record.get("pending_training_results", []),
                                      record.get("pending_validation_specs", []))
               if r["checkpoint_dir_name"] not in missing]
    record["pending_training_results"] = [r for r, _ in pending]
    record["pending_validation_specs"] = [v for _, v in pending]
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        if key in record:
            record[key] = [name for name in record[key] if name not in missing]
    os.replace(snapshot, snapshot + ".bak")
    partial = snapshot + ".partial"
    with open(partial, "w") as stream:
        json.dump(record, stream)
    os.replace(partial, snapshot)
    return missing


def move_orphans(run_folder: str) -> list[str]:
    """Moves the checkpoint folders of `run_folder` that Ray's snapshot does not list (written by a
    worker just before the driver died or was interrupted: Ray never deletes or resumes from them)
    into `run_folder/orphaned/`, so the run folder holds exactly the checkpoints its policy keeps
    and a `checkpoint_*` glob cannot pick a stray one. Moved, not deleted: nothing is lost.
    Returns the folders moved."""
    if not os.path.isdir(run_folder):
        return []
    known = set()
    snapshot = os.path.join(run_folder, RAY_SNAPSHOT)
    if os.path.exists(snapshot):
        with open(snapshot) as stream:
            record = json.load(stream)
        results = [*record.get("checkpoint_results", []), record.get("latest_checkpoint_result") or {}]
        known = {r.get("checkpoint_dir_name") for r in results}
    moved = []
    for name in sorted(os.listdir(run_folder)):
        if name.startswith("checkpoint_") and name not in known and os.path.isdir(os.path.join(run_folder, name)):
            os.makedirs(os.path.join(run_folder, ORPHANS), exist_ok=True)
            os.replace(os.path.join(run_folder, name), os.path.join(run_folder, ORPHANS, name))
            moved.append(os.path.join(run_folder, ORPHANS, name))
    return moved


def newest_loadable(run_folder: str, below: str | None = None) -> tuple[str, dict, list[str]] | None:
    """(folder, state, damaged folders skipped) of the newest checkpoint in `run_folder` whose state
    loads, considering only those older than `below` when given; None when none loads. Ray names
    checkpoint folders by time, so the newest sorts last."""
    names = sorted((e for e in os.listdir(run_folder) if e.startswith("checkpoint_")), reverse=True)
    skipped = []
    for name in names:
        folder = os.path.join(run_folder, name)
        if below is not None and name >= os.path.basename(below.rstrip("/")):
            continue
        if not os.path.exists(os.path.join(folder, STATE_FILE)):
            continue
        try:
            return folder, load_state(folder), skipped
        except CheckpointDamaged:
            skipped.append(folder)
    return None


def find_checkpoint(path: str) -> str:
    """The checkpoint folder at `path`, or the latest one in the run folder `path`, after checking
    that its state loads as plain weights (a file that would run code when unpickled is refused);
    before Ray starts."""
    if not os.path.exists(os.path.join(path, STATE_FILE)) and os.path.isdir(path):
        found = newest_loadable(path)  # a run folder: its newest checkpoint that loads
        if found is None and any(e.startswith("checkpoint_") for e in os.listdir(path)):
            raise CheckpointNotFound(f"--checkpoint {path}: none of its checkpoints can be read")
        if found is not None:
            for damaged in found[2]:
                log.warning(f"checkpoint {damaged} is damaged; using the previous one, {found[0]}")
            return os.path.abspath(found[0])
    if not os.path.exists(os.path.join(path, STATE_FILE)):
        raise CheckpointNotFound(f"--checkpoint {path}: no {STATE_FILE} (expected a selfsup checkpoint or run folder)")
    load_state(path)
    return os.path.abspath(path)  # every JSON line names checkpoints the same way


def load_checkpoint(path: str, state: dict | None = None):
    """(method with the checkpoint's weights, its RunConfig). Weights load without unpickling code;
    `state` is the checkpoint's already loaded `load_state(path)`, if the caller has it."""
    with open(os.path.join(path, CONFIG_FILE)) as stream:
        config = config_from_dict(yaml.safe_load(stream))
    method = build_method(config)
    method.load_state_dict((state or load_state(path))["method"])
    return method, config
