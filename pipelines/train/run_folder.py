"""A run folder as Ray Train keeps it: `checkpoint_*` folders and Ray's snapshot of the ones it
registered (`checkpoint_manager_snapshot.json`, a private format of Ray Train 2.60 that this module
alone reads and edits). Before a run resumes, `repair_run_folder` puts the folder back in the
state Ray can resume from; `run_settings` and `run_method` say what a run folder trained, for the
checks that a rerun is the same run and would load the right model.
"""

from __future__ import annotations

import glob
import json
import os

import yaml

from methods.versions import require
from pipelines.console import log
from pipelines.weights.checkpoint import CONFIG_FILE

require("ray", "repairs a run folder before a resume (Ray Train's checkpoint_manager_snapshot.json)")

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's registered checkpoints
ORPHANS = "orphaned"  # where checkpoints Ray never registered are moved


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


def repair_run_folder(run_folder: str) -> None:
    """Before a run resumes: checkpoints the user deleted are taken out of Ray's snapshot
    (`forget_missing`) and checkpoints Ray never registered are moved aside (`move_orphans`),
    each said in a warning. Nothing is deleted."""
    for gone in forget_missing(run_folder):
        log.warning(f"{os.path.join(run_folder, gone)}: gone from the run folder; the run resumes from the newest "
                    f"checkpoint still there (Ray's record of the run before: {RAY_SNAPSHOT}.bak)")
    for moved in move_orphans(run_folder):
        log.warning(f"{moved}: moved aside, a checkpoint the run never registered (written as it was "
                    "interrupted); the run resumes from its last registered one")


def run_settings(run_folder: str) -> dict | None:
    """The config (as written, nested) the newest checkpoint of `run_folder` trained with, or
    None when it has none."""
    configs = sorted(glob.glob(os.path.join(run_folder, "checkpoint_*", CONFIG_FILE)))
    if not configs:
        return None
    with open(configs[-1]) as stream:
        return yaml.safe_load(stream) or {}


def run_method(run_folder: str) -> str | None:
    """The method the newest checkpoint of `run_folder` trained, or None when it has none."""
    settings = run_settings(run_folder)
    return None if settings is None else settings.get("method")
