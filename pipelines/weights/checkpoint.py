"""Checkpoints, in one place: what a run saves for an exact resume, reading it back without
unpickling code, choosing the newest one that loads, and a method with a checkpoint's weights.
(What Ray Train keeps beside them in a run folder: pipelines/train/run_folder.py.)

A checkpoint is a folder with `state.pt` (weights, optimizer, scaler, progress, RNG states; loadable
with `torch.load(weights_only=True)`) and `config.yaml` (the complete run config). Every reader
goes through `load_state`; a damaged file and a refused one are `DataError`s with a one-line message.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile

import numpy as np
import torch
import yaml

from pipelines.config import RunConfig, build_method, config_from_dict
from pipelines.console import log
from pipelines.images.shards import DataError

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
# The layout of state.pt and config.yaml. Raise it when a change would make older code misread a
# new checkpoint, keep reading every older format (tests/fixtures/checkpoint-format-1 is one), and
# add that format's fixture (tests/fixtures/make_checkpoint.py). Checkpoints from before the
# number was written have the layout of format 1.
CHECKPOINT_FORMAT = 1


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
            "format": CHECKPOINT_FORMAT,
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
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0][:200]
        raise CheckpointRefused(f"checkpoint {path}: refused: it holds pickled objects, not only weights "
                                f"({reason})") from None
    except (RuntimeError, EOFError, OSError) as error:  # torch's zip reader reports truncation as RuntimeError
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise CheckpointDamaged(f"checkpoint {path}: damaged, cannot be read ({reason})") from None
    if not isinstance(state, dict) or "method" not in state:
        raise CheckpointDamaged(f"checkpoint {path}: not a selfsup checkpoint (no weights under 'method')")
    written = state.get("format", 1)
    if not isinstance(written, int) or written > CHECKPOINT_FORMAT:
        raise CheckpointRefused(f"checkpoint {path}: format {written!r}, written by a newer selfsup (this one reads "
                                f"formats up to {CHECKPOINT_FORMAT}); upgrade selfsup to load it")
    return state


class CheckpointNotFound(DataError):
    """A `--checkpoint` path that holds no selfsup checkpoint, or none that can be read."""


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
    try:
        method.load_state_dict((state or load_state(path))["method"])
    except RuntimeError:  # torch lists every key; the cause is the kind of checkpoint
        raise CheckpointRefused(f"--checkpoint {path}: its weights are not a {config.method} pretraining run's "
                                "(a `selfsup finetune` checkpoint? `selfsup finetune --out` exports the classifier)"
                                ) from None
    return method, config
