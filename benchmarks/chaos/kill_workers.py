"""Chaos check: kill a random Ray Train worker (SIGKILL, by its PID) again and again during a run
on a simulated 3-node cluster, and check that nothing is lost and little is redone.

Cluster (`cluster.simulate.SpotCluster`): a head with 1 CPU (Ray Data decodes there) and two
nodes of 1 CPU, one training worker on each. The run is SimCLR `tiny` at 16 px on the bundled
digits (1,438 training images, global batch 64, so 22 steps an epoch), checkpointing every
`--checkpoint-every` steps, with `train.max_failures` above the number of kills. A kill comes
`--every` seconds after the group last recovered (its first report after the previous kill),
so each one hits a group that is training, not one that is still starting.

Checked at the end (the script exits 1 and says which check failed):
- the run finished with its planned images: samples = total_steps x global batch;
- `metrics.jsonl` is one history: steps strictly increasing, one row per checkpoint, and the
  images seen at each row are step x global batch (nothing counted twice across restarts);
- each kill redid at most one checkpoint interval: the group resumed from the checkpoint that
  was newest when the worker died (the steps it had trained past that one are what is redone).

Prints one JSON line per kill and a summary line:

    python -m benchmarks.chaos.kill_workers --kills 5 --every 15
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time

from cluster.recovery import recovery_failures

COMMON = {"data.canvas_size": 16, "data.decode_num_cpus": 0.25, "optim.batch_size": 64,
          "train.knn_every_epochs": 0, "train.probe_size": 0}


def newest_step(folder: str) -> int:
    from pipelines.train.tracking import read_history

    history = read_history(folder)
    return int(history[-1]["step"]) if history else 0


def chaos_run(workdir: str, kills: int, every_s: float, checkpoint_every: int, epochs: int, seed: int) -> dict:
    from cluster.simulate import SpotCluster
    from methods import get_method
    from pipelines.config import build_config
    from pipelines.images.prepare import PrepareConfig, prepare
    from pipelines.train.pretrain import pretrain
    from pipelines.train.tracking import read_history

    chooser = random.Random(seed)
    sets = {**COMMON, **get_method("simclr").smoke_sets, "optim.epochs": epochs,
            "train.checkpoint_every_steps": checkpoint_every, "train.max_failures": kills + 3,
            "train.workers": 2, "train.placement_strategy": "STRICT_SPREAD"}
    config = build_config("simclr", "tiny", sets=sets)
    storage, name = os.path.join(workdir, "runs"), f"chaos-{int(time.time())}"
    folder = os.path.join(storage, name)
    events = []
    with SpotCluster(head_cpus=1, nodes=2, node_cpus=1) as cluster:
        data = os.path.join(workdir, "digits")
        if not os.path.exists(os.path.join(data, "train")):
            prepare("sample:digits", data, PrepareConfig(shard_mb=0.02, row_group_mb=0.005, overwrite=True))
        started = time.perf_counter()
        training = cluster.start(lambda: pretrain(config, f"{data}/train", storage=storage, name=name))
        cluster.wait_for(lambda: newest_step(folder) > 0, "the first report", timeout=600)
        recovered_at = time.perf_counter()
        for kill in range(kills):
            step_at_recovery = newest_step(folder)
            cluster.wait_for(lambda: time.perf_counter() - recovered_at >= every_s and newest_step(folder) > step_at_recovery,
                             f"{every_s} s of training and a new checkpoint", timeout=every_s + 600)
            pids = sorted(worker.pid for worker in cluster.training_workers())
            if not pids:
                raise RuntimeError(f"kill {kill + 1}: no live training worker")
            victim = chooser.choice(pids)
            history = read_history(folder)
            newest_at_kill, killed_group_began = int(history[-1]["step"]), history[-1].get("resumed_from_step", 0)
            killed_at, killed_wall = time.perf_counter(), time.time()
            os.kill(victim, signal.SIGKILL)

            def restarted_reports() -> list[dict]:
                """Reports of the group that replaced the killed one (a report already on its way
                when the worker died carries the old group's resumed_from_step)."""
                return [row for row in read_history(folder) if row["time"] > killed_wall
                        and row.get("resumed_from_step", 0) != killed_group_began]

            cluster.wait_for(lambda: restarted_reports(), f"a report after kill {kill + 1}", timeout=600)
            recovered_at = time.perf_counter()
            first = restarted_reports()[0]
            event = {"kill": kill + 1, "pid": victim, "at_s": round(killed_at - started, 1),
                     "newest_checkpoint_step": newest_at_kill, "resumed_from_step": first["resumed_from_step"],
                     "first_report_after": first["step"], "recovery_s": round(recovered_at - killed_at, 1)}
            events.append(event)
            print(json.dumps(event), flush=True)
        result = training.join(timeout=1800)
        wall = time.perf_counter() - started
    return {"result": result, "events": events, "history": read_history(folder), "wall_s": wall,
            "checkpoint_every": checkpoint_every}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--every", type=float, default=15, help="seconds of training between a recovery and the next kill")
    parser.add_argument("--checkpoint-every", type=int, default=4, help="train.checkpoint_every_steps")
    parser.add_argument("--epochs", type=int, default=12, help="enough for every kill to land before the end")
    parser.add_argument("--seed", type=int, default=0, help="which worker each kill picks")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="selfsup-chaos-")
    run = chaos_run(workdir, args.kills, args.every, args.checkpoint_every, args.epochs, args.seed)
    failed = recovery_failures(run)
    metrics, events = run["result"]["metrics"], run["events"]
    print(json.dumps({
        "kills": len(events), "every_s": args.every, "checkpoint_every_steps": args.checkpoint_every,
        "total_steps": metrics["total_steps"], "samples": metrics["samples"],
        "planned_samples": metrics["total_steps"] * metrics["global_batch"],
        "history_rows": len(run["history"]),
        "steps_redone_at_most": [event["newest_checkpoint_step"] + args.checkpoint_every - event["resumed_from_step"]
                                 for event in events],
        "recovery_s": [event["recovery_s"] for event in events], "wall_s": round(run["wall_s"], 1),
        "failed": failed,
    }), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
