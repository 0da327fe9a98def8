"""The papers' findings, one command each, on the MNIST-M sample (docs/FINDINGS.md).

    python -m benchmarks.research.findings composition     # SimCLR §3 / Fig. 5: pairs of augmentations
    python -m benchmarks.research.findings temperature     # SimCLR Fig. 9 / Table 5: temperature x batch
    python -m benchmarks.research.findings batch-steps     # SimCLR Fig. 9: batch size at a fixed number of steps
    python -m benchmarks.research.findings mask-ratio      # MAE Fig. 5: mask ratio x norm-pix targets
    python -m benchmarks.research.findings dino-centering  # DINO §5.3 / Fig. 7: centering and sharpening
    python -m benchmarks.research.findings dino-stability  # 30 epochs of DINO `tiny`: does it drift?

Each cell is a run of the method's `tiny` preset with the cell's settings, trained in memory by
`recipe_probe.probe` (the method's own views, loss, optimizer and schedule; no Ray), scored by kNN
and a linear probe on the sample's test split. A cell's result is kept in `--work` (one JSON file
per cell), so an interrupted grid resumes and `--shard K/N` splits a grid over N processes; the
last step of every invocation prints the table and draws the picture into `--pictures` from the
cells done so far.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import torch

from benchmarks.research.recipe_probe import probe

# SimCLR cells share a recipe that trains in ~40 s an epoch on one CPU thread: batch 64 (more steps
# in the same minutes; docs/BENCHMARKS.md), ResNet blocks 1-1-1-1, no flips (digits are not
# mirror-symmetric) and no batch mixing (the paper has none).
SIMCLR_BASE = {"optim.batch_size": 64, "backbone.kwargs.layers": [1, 1, 1, 1], "views.view.flip": 0.0,
               "views.view.mix": 0.0}
# Each transformation on its own, as `views.view` settings; absent ones are off.
TRANSFORMS = {
    "crop": {"views.view.scale": [0.2, 1.0], "views.view.ratio": [0.75, 4 / 3]},
    "colour": {"views.view.jitter_p": 0.8, "views.view.jitter": [0.8, 0.8, 0.8, 0.2]},
    "grayscale": {"views.view.grayscale": 0.5},
    "blur": {"views.view.blur": 0.5, "views.view.blur_sigma": [0.1, 1.0]},
    "none": {},
}
ALL_OFF = {"views.view.scale": [1.0, 1.0], "views.view.ratio": [1.0, 1.0], "views.view.jitter_p": 0.0,
           "views.view.grayscale": 0.0, "views.view.blur": 0.0}


def composition_key(first: str, second: str) -> str:
    """The cell that runs a pair: our pipeline applies its transformations in one fixed order
    (crop, colour, grayscale, blur), so a pair is a set, X+X and X+none are X alone, none+none
    is no augmentation at all."""
    chosen = [name for name in TRANSFORMS if name in (first, second) and name != "none"]
    return "+".join(chosen) or "none"


def composition_cells(epochs: int) -> list[tuple[str, str, dict]]:
    names, cells = list(TRANSFORMS), {}
    for i, first in enumerate(names):
        for second in names[i:]:
            key = composition_key(first, second)
            sets = {**SIMCLR_BASE, **ALL_OFF, **TRANSFORMS[first], **TRANSFORMS[second], "optim.epochs": epochs}
            cells.setdefault(key, (key, "simclr", sets))
    return list(cells.values())


def temperature_cells(epochs: int) -> list[tuple[str, str, dict]]:
    # The best pair of the composition grid on this sample (grayscale + blur; cropping hurts here).
    base = {**SIMCLR_BASE, **ALL_OFF, **TRANSFORMS["grayscale"], **TRANSFORMS["blur"], "optim.epochs": epochs}
    return [(f"t{t}-b{b}", "simclr", {**base, "hparams.temperature": t, "optim.batch_size": b})
            for b in (64, 256) for t in (0.1, 0.2, 0.5, 1.0)]


def batch_steps_cells(epochs: int) -> list[tuple[str, str, dict]]:
    """Batch 64, 128 and 256 for the same number of optimizer steps (~180, and the same warm-up
    steps): `epochs` is batch 64's, the larger batches run 2x and 4x as many epochs. The temperature
    grid compares batches at equal epochs, where the small batch takes 4x the steps; here the
    negatives per step differ, and with them the square-root-scaled LR and the passes over the
    data (a larger batch at equal steps sees each image more often)."""
    base = {**SIMCLR_BASE, **ALL_OFF, **TRANSFORMS["grayscale"], **TRANSFORMS["blur"], "hparams.temperature": 0.2}
    return [(f"b{b}-e{epochs * b // 64}", "simclr", {**base, "optim.batch_size": b, "optim.epochs": epochs * b // 64,
                                                     "optim.warmup_epochs": b / 64})
            for b in (64, 128, 256)]


def mask_ratio_cells(epochs: int) -> list[tuple[str, str, dict]]:
    return [(f"m{m}-{'norm' if norm else 'raw'}", "mae", {"hparams.mask_ratio": m, "hparams.norm_pix_loss": norm,
                                                        "optim.epochs": epochs, "optim.warmup_epochs": 1})
            for norm in (True, False) for m in (0.25, 0.5, 0.75, 0.9)]


def dino_centering_cells(epochs: int) -> list[tuple[str, str, dict]]:
    # Without sharpening the teacher's temperature equals the student's (0.1), as in the paper.
    no_sharpening = {"hparams.teacher_temp": 0.1, "hparams.warmup_teacher_temp": 0.1}
    return [(name, "dino", {"optim.epochs": epochs, **sets}) for name, sets in
            (("both", {}), ("centering-only", no_sharpening), ("sharpening-only", {"hparams.centering": False}))]


def dino_stability_cells(epochs: int) -> list[tuple[str, str, dict]]:
    # One knob at a time against the preset: the paper's learning rate (the preset's is 4x it),
    # a softer teacher, weight decay
    # held at its start instead of rising to 0.4, the paper's slower teacher.
    return [(name, "dino", {"optim.epochs": epochs, **sets}) for name, sets in
            (("base-lr-5e-4", {"optim.base_lr": 5e-4}),
             ("teacher-temp-0.03", {"hparams.teacher_temp": 0.03, "hparams.warmup_teacher_temp": 0.03}),
             ("teacher-temp-0.04", {"hparams.teacher_temp": 0.04, "hparams.warmup_teacher_temp": 0.04}),
             ("preset", {}), ("weight-decay-end-0.04", {"hparams.weight_decay_end": 0.04}),
             ("teacher-momentum-0.996", {"hparams.teacher_momentum": 0.996}))]


EXPERIMENTS = {
    "composition": (composition_cells, 4),
    "temperature": (temperature_cells, 3),
    "batch-steps": (batch_steps_cells, 3),
    "mask-ratio": (mask_ratio_cells, 10),
    "dino-centering": (dino_centering_cells, 3),
    "dino-stability": (dino_stability_cells, 30),
}


def cell_path(work: str, experiment: str, name: str) -> str:
    return os.path.join(work, experiment, re.sub(r"[^A-Za-z0-9.+-]", "_", name) + ".json")


def run_cells(experiment: str, cells, work: str, shard: tuple[int, int], knn_every: int, rows_per_epoch: int) -> None:
    for index, (name, method, sets) in enumerate(cells):
        path = cell_path(work, experiment, name)
        if index % shard[1] != shard[0] or os.path.exists(path):
            continue
        print(f"[findings] {experiment} {name}: {method} {json.dumps(sets)}", file=sys.stderr, flush=True)
        result = probe(method, sets, knn_every=knn_every, rows_per_epoch=rows_per_epoch,
                       on_row=lambda row: print(json.dumps(row), file=sys.stderr, flush=True))
        result.update(cell=name, method=method, sets=sets)
        print(json.dumps({k: result[k] for k in ("cell", "knn", "linear", "train_seconds")}), flush=True)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as handle:
            json.dump(result, handle)
        os.replace(path + ".tmp", path)


def load_cells(experiment: str, cells, work: str) -> dict[str, dict]:
    done = {}
    for name, _, _ in cells:
        path = cell_path(work, experiment, name)
        if os.path.exists(path):
            with open(path) as handle:
                done[name] = json.load(handle)
    return done


# --- tables and pictures ---------------------------------------------------------------------
def report_composition(done: dict, pictures: str) -> None:
    import matplotlib.pyplot as plt

    names = list(TRANSFORMS)
    grid = torch.full((len(names), len(names)), float("nan"))
    for i, first in enumerate(names):
        for j, second in enumerate(names):
            key = composition_key(first, second)
            if key in done:
                grid[i, j] = done[key]["knn"]
    print("| first \\ second | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for i, first in enumerate(names):
        print(f"| {first} | " + " | ".join("—" if math.isnan(v) else f"{v:.3f}" for v in grid[i].tolist()) + " |")
    figure, axis = plt.subplots(figsize=(5.2, 4.4))
    image = axis.imshow(grid.numpy(), cmap="viridis")
    axis.set_xticks(range(len(names)), names, rotation=30)
    axis.set_yticks(range(len(names)), names)
    axis.set_xlabel("second transformation")
    axis.set_ylabel("first transformation")
    for i in range(len(names)):
        for j in range(len(names)):
            if not math.isnan(grid[i, j]):
                bright = grid[i, j] > torch.nanmean(grid)
                axis.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="black" if bright else "white",
                          fontsize=8)
    figure.colorbar(image, label="kNN top-1")
    axis.set_title("SimCLR on MNIST-M: pairs of augmentations", fontsize=10)
    _save(figure, pictures, "composition.png")


def report_temperature(done: dict, pictures: str) -> None:
    import matplotlib.pyplot as plt

    print("| batch | temperature | kNN | linear |\n|---:|---:|---:|---:|")
    figure, axis = plt.subplots(figsize=(5, 3.6))
    for batch in (64, 256):
        rows = sorted((r["sets"]["hparams.temperature"], r) for r in done.values() if r["sets"]["optim.batch_size"] == batch)
        for temperature, r in rows:
            print(f"| {batch} | {temperature} | {r['knn']:.3f} | {r['linear']:.3f} |")
        if rows:
            axis.plot([t for t, _ in rows], [r["knn"] for _, r in rows], marker="o", label=f"batch {batch}, kNN")
            axis.plot([t for t, _ in rows], [r["linear"] for _, r in rows], marker="s", linestyle="--",
                      label=f"batch {batch}, linear")
    axis.set_xscale("log")
    axis.set_xlabel("temperature")
    axis.set_ylabel("top-1")
    axis.legend(fontsize=8)
    axis.set_title("SimCLR on MNIST-M: temperature and batch")
    _save(figure, pictures, "temperature.png")


def report_batch_steps(done: dict, pictures: str) -> None:
    import matplotlib.pyplot as plt

    print("| batch | epochs | steps | kNN | linear |\n|---:|---:|---:|---:|---:|")
    rows = sorted((r["sets"]["optim.batch_size"], r) for r in done.values())
    for batch, r in rows:
        epochs = r["sets"]["optim.epochs"]
        print(f"| {batch} | {epochs} | {r['history'][-1]['step']} | {r['knn']:.3f} | {r['linear']:.3f} |")
    figure, axis = plt.subplots(figsize=(5, 3.6))
    axis.plot([b for b, _ in rows], [r["knn"] for _, r in rows], marker="o", label="kNN")
    axis.plot([b for b, _ in rows], [r["linear"] for _, r in rows], marker="s", linestyle="--", label="linear")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("batch size (same number of steps)")
    axis.set_ylabel("top-1")
    axis.legend(fontsize=8)
    axis.set_title("SimCLR on MNIST-M: batch size at fixed steps")
    _save(figure, pictures, "batch_steps.png")


def report_mask_ratio(done: dict, pictures: str) -> None:
    import matplotlib.pyplot as plt

    print("| targets | mask ratio | kNN | linear |\n|---|---:|---:|---:|")
    figure, axis = plt.subplots(figsize=(5, 3.6))
    for norm in (True, False):
        rows = sorted((r["sets"]["hparams.mask_ratio"], r) for r in done.values() if r["sets"]["hparams.norm_pix_loss"] == norm)
        label = "norm-pix" if norm else "raw pixels"
        for ratio, r in rows:
            print(f"| {label} | {ratio} | {r['knn']:.3f} | {r['linear']:.3f} |")
        if rows:
            axis.plot([m for m, _ in rows], [r["linear"] for _, r in rows], marker="o", label=f"{label}, linear")
            axis.plot([m for m, _ in rows], [r["knn"] for _, r in rows], marker="s", linestyle="--", label=f"{label}, kNN")
    axis.set_xlabel("mask ratio")
    axis.set_ylabel("top-1")
    axis.legend(fontsize=8)
    epochs = sorted({r["sets"]["optim.epochs"] for r in done.values()})
    axis.set_title(f"MAE on MNIST-M: mask ratio ({'/'.join(map(str, epochs))} epochs)")
    _save(figure, pictures, "mask_ratio.png")


DINO_CURVES = ("loss", "teacher_entropy", "teacher_batch_entropy", "teacher_student_kl", "embedding_std")


def report_dino(done: dict, pictures: str, name: str, title: str) -> None:
    import matplotlib.pyplot as plt

    ln_k = None
    print("| run | final loss | teacher entropy / ln K | batch entropy / ln K | KL | embedding std | kNN | linear | warned at epoch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    figure, axes = plt.subplots(1, len(DINO_CURVES) + 1, figsize=(3.2 * (len(DINO_CURVES) + 1), 3))
    for run, r in done.items():
        ln_k = math.log(r["sets"].get("hparams.out_dim", 1024))
        history, last = r["history"], r["history"][-1]
        flagged = warnings_today(r)
        print(f"| {run} | {last['loss']:.3f} | {last['teacher_entropy'] / ln_k:.3f} | {last['teacher_batch_entropy'] / ln_k:.3f} "
              f"| {last['teacher_student_kl']:.3f} | {last['embedding_std']:.3f} | {r['knn']:.3f} | {r['linear']:.3f} "
              f"| {'; '.join(flagged) or '—'} |")
        epochs = [h["epoch"] for h in history]
        for axis, key in zip(axes, DINO_CURVES):
            scale = ln_k if "entropy" in key else 1.0
            axis.plot(epochs, [h[key] / scale for h in history], label=run)
            axis.set_title(key + (" / ln K" if "entropy" in key else ""), fontsize=9)
        knn = [(h["epoch"], h["knn"]) for h in history if "knn" in h]
        axes[-1].plot([e for e, _ in knn], [k for _, k in knn], marker="o", label=run)
        axes[-1].set_title("kNN top-1", fontsize=9)
    for axis in axes:
        axis.set_xlabel("epoch")
    axes[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    _save(figure, pictures, name)
    for run, r in done.items():
        knn = [h["knn"] for h in r["history"] if "knn" in h]
        losses = {round(h["epoch"]): h["loss"] for h in r["history"] if float(h["epoch"]).is_integer()}
        if knn and 5 in losses:
            print(f"{run}: loss epoch 5 {losses[5]:.3f} -> end {r['history'][-1]['loss']:.3f}; "
                  f"kNN best {max(knn):.3f} -> end {knn[-1]:.3f}")


def warnings_today(result: dict) -> list[str]:
    """The DINO warnings the current `diagnose` gives when the run's reports are replayed through
    it (a cell keeps the flags of the code it ran with): "epoch E: collapse|drift (which way)"."""
    import logging

    from pipelines.config import build_config, build_method

    method = build_method(build_config("dino", "tiny", sets=result["sets"]))
    logging.getLogger("selfsup").disabled = True
    out, previous, collapsed = [], "", False
    try:
        for row in result["history"]:
            flags = method.diagnose(row)
            if flags["collapsed"] and not collapsed:
                out.append(f"{row['epoch']:g}: collapse")
            if method.drift_warned and method.drift_warned != previous:
                out.append(f"{row['epoch']:g}: drifting {method.drift_warned}")
            previous, collapsed = method.drift_warned, bool(flags["collapsed"])
    finally:
        logging.getLogger("selfsup").disabled = False
    return out


def _save(figure, pictures: str, name: str) -> None:
    os.makedirs(pictures, exist_ok=True)
    figure.tight_layout()
    figure.savefig(os.path.join(pictures, name), dpi=90)
    print(f"picture: {os.path.join(pictures, name)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--epochs", type=int, help="epochs per cell (default: the experiment's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shard", default="0/1", help="K/N: run every N-th cell from the K-th")
    parser.add_argument("--work", default="runs/findings", help="one JSON file per finished cell")
    parser.add_argument("--pictures", default="docs/findings")
    parser.add_argument("--report-only", action="store_true", help="table and picture from the cells done")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    make_cells, default_epochs = EXPERIMENTS[args.experiment]
    cells = make_cells(args.epochs or default_epochs)
    dino = args.experiment.startswith("dino")
    if not args.report_only:
        shard = tuple(int(x) for x in args.shard.split("/"))
        run_cells(args.experiment, cells, args.work, shard, knn_every=1 if dino else 0,
                  rows_per_epoch=4 if args.experiment == "dino-centering" else 1)
    done = load_cells(args.experiment, cells, args.work)
    if args.experiment == "composition":
        report_composition(done, args.pictures)
    elif args.experiment == "temperature":
        report_temperature(done, args.pictures)
    elif args.experiment == "batch-steps":
        report_batch_steps(done, args.pictures)
    elif args.experiment == "mask-ratio":
        report_mask_ratio(done, args.pictures)
    elif args.experiment == "dino-centering":
        report_dino(done, args.pictures, "dino_centering.png", "DINO on MNIST-M: centering and sharpening")
    else:
        report_dino(done, args.pictures, "dino_stability.png", "DINO tiny on MNIST-M, 30 epochs")


if __name__ == "__main__":
    main()
