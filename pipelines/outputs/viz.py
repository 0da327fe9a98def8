"""Pictures for people: what the model will see."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw

from methods import Method, get_method
from methods.schedules import warmup_cosine
from methods.views import ViewMaker, ViewRecipe
from pipelines.config import build_config
from pipelines.evaluate.label_free import COLLAPSE_OF_HEALTHY
from pipelines.images.decode import BadImage, decode_canvas, image_bytes
from pipelines.images.shards import find_shards

CELL = 96
HEADER = 14


def first_canvases(location: str, count: int, canvas_size: int) -> np.ndarray:
    """`count` decodable images spread evenly over the first shard of a location (samples are
    sorted by class, so the first rows alone would all be one digit) as `(n, S, S, 3)` uint8."""
    shards = find_shards(location)
    values = pq.read_table(shards.files[0], columns=["image"], filesystem=shards.filesystem).column("image")
    canvases = []
    for start in np.linspace(0, len(values) - 1, num=min(len(values), count)).astype(int):
        for index in range(int(start), min(len(values), int(start) + 16)):  # skip past bad images
            try:
                canvases.append(decode_canvas(image_bytes(values[index].as_py()), canvas_size))
                break
            except BadImage:
                continue
    if not canvases:
        raise ValueError(f"{location}: no decodable image found")
    return np.stack(canvases)


def default_recipe(method: str, canvas_size: int) -> ViewRecipe:
    """The method's recipe for pictures of a `canvas_size` canvas (`Method.display_recipe`)."""
    return get_method(method).display_recipe(canvas_size)


def _cell(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image).resize((CELL, CELL), Image.Resampling.NEAREST)


@dataclass(frozen=True)
class Masking:
    """How a method that hides patches of its input (capability "reconstruct") masks a view."""

    method: type[Method]
    ratio: float
    patch: int

    def hide(self, views: torch.Tensor) -> torch.Tensor:
        """`views: (N, 3, H, W)` with the patches the method hides greyed out, drawn by the
        method's own `patch_mask` (what the encoder is left to see)."""
        n, _, height, width = views.shape
        grid = (max(1, height // self.patch), max(1, width // self.patch))
        mask = self.method.patch_mask(n, grid[0] * grid[1], self.ratio)
        pixels = torch.nn.functional.interpolate(mask.reshape(n, 1, *grid), size=(height, width), mode="nearest")
        return views * (1 - pixels) + pixels * _grey(views)


def masking_of(method: str, preset: str = "tiny") -> Masking | None:
    """The masking of a method that masks its input (MAE), from its preset; None for the others."""
    cls = get_method(method)
    if "reconstruct" not in cls.capabilities:
        return None
    config = build_config(method, preset)
    masking = cls.masking(config.hparams, config.backbone.patch_size)
    return Masking(cls, *masking) if masking else None


def augment_picture(canvases: np.ndarray, recipe: ViewRecipe, seed: int = 0,
                    masking: Masking | None = None) -> Image.Image:
    """A grid: one row per image, the original canvas then each of the recipe's views; with
    `masking`, then the first view as the encoder sees it."""
    torch.manual_seed(seed)
    maker = ViewMaker(recipe)
    views = maker(torch.from_numpy(canvases))
    columns = ["original"] + recipe.names
    if masking:
        views = [*views, masking.hide(views[0])]
        columns.append(f"masked {masking.ratio:.0%}")
    grid = Image.new("RGB", (CELL * len(columns), HEADER + CELL * len(canvases)), "white")
    draw = ImageDraw.Draw(grid)
    for col, name in enumerate(columns):
        draw.text((col * CELL + 3, 1), name, fill="black")
    shown = [(maker.denormalize(v).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8) for v in views]
    for row, canvas in enumerate(canvases):
        grid.paste(_cell(canvas), (0, HEADER + row * CELL))
        for col, view in enumerate(shown, start=1):
            grid.paste(_cell(view[row]), (col * CELL, HEADER + row * CELL))
    return grid


def mae_picture(method, canvases: np.ndarray, mask_ratios: list[float], seed: int = 0) -> Image.Image:
    """One row per image: the original, then for each mask ratio the masked input and the
    reconstruction (visible patches pasted back), like the MAE paper's masking-ratio figure."""
    torch.manual_seed(seed)
    method.eval()
    images = method.eval_images(torch.from_numpy(canvases))
    columns = [("original", images)]
    for ratio in mask_ratios:
        reconstruction, mask = method.reconstruct(images, ratio)
        columns.append((f"masked {ratio:.0%}", images * (1 - mask) + mask * _grey(images)))
        columns.append((f"recon {ratio:.0%}", reconstruction))
    shown = [(name, (method.view_maker.denormalize(x).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
             for name, x in columns]
    grid = Image.new("RGB", (CELL * len(shown), HEADER + CELL * len(canvases)), "white")
    draw = ImageDraw.Draw(grid)
    for col, (name, pictures) in enumerate(shown):
        draw.text((col * CELL + 3, 1), name, fill="black")
        for row, picture in enumerate(pictures):
            grid.paste(_cell(picture), (col * CELL, HEADER + row * CELL))
    return grid


def _grey(images: torch.Tensor) -> torch.Tensor:
    """Mid-grey in the images' normalisation, to show masked patches."""
    return torch.zeros_like(images)


# Anchors of a dark-to-bright heat map (black, purple, orange, yellow) for attention weights.
_HEAT = np.array([[0, 0, 4], [120, 28, 109], [237, 105, 37], [252, 255, 164]], dtype=np.float64)


def _heat(values: np.ndarray) -> np.ndarray:
    """`(h, w)` values scaled to [0, 1] -> `(h, w, 3)` uint8 colours."""
    span = values.max() - values.min()
    scaled = (values - values.min()) / (span if span > 0 else 1.0) * (len(_HEAT) - 1)
    low = np.floor(scaled).clip(0, len(_HEAT) - 2).astype(int)
    fraction = (scaled - low)[..., None]
    return (_HEAT[low] * (1 - fraction) + _HEAT[low + 1] * fraction).round().astype(np.uint8)


def attention_picture(method, image: np.ndarray, size: int, cell: int = 160) -> Image.Image:
    """The image, then the last block's class-token attention of every head over the patches
    (DINO paper, figure 1), and their mean. `image: (S, S, 3)` uint8; `size` is the input size
    the ViT sees (a multiple of its patch size)."""
    method.eval()
    canvas = torch.tensor(image).unsqueeze(0)
    inputs = method.eval_images(canvas)
    if inputs.shape[-1] != size:
        inputs = torch.nn.functional.interpolate(inputs, size=(size, size), mode="bilinear", antialias=True,
                                                 align_corners=False)
    maps = method.last_attention(inputs)[0].numpy()  # (heads, h, w)
    columns = [("image", image)] + [(f"head {h}", _heat(m)) for h, m in enumerate(maps)]
    columns.append(("mean", _heat(maps.mean(axis=0))))
    grid = Image.new("RGB", (cell * len(columns), HEADER + cell), "white")
    draw = ImageDraw.Draw(grid)
    for col, (name, picture) in enumerate(columns):
        draw.text((col * cell + 3, 1), name, fill="black")
        grid.paste(Image.fromarray(picture).resize((cell, cell), Image.Resampling.NEAREST), (col * cell, HEADER))
    return grid


# Collapse indicators of a method's own (DINO's teacher), drawn on a panel of their own when present.
METHOD_INDICATORS = ("teacher_entropy", "teacher_batch_entropy", "teacher_student_kl")
# Points drawn along the LR schedule's curve.
SCHEDULE_POINTS = 200


def _schedule(history: list[dict]) -> tuple[list[float], list[float]]:
    """The run's LR schedule over all its steps, from a report that carries it (warm-up included,
    which epoch-end reports never sample); empty for reports from before they carried it."""
    row = next((r for r in history if "warmup_steps" in r and "peak_lr" in r), None)
    if row is None:
        return [], []
    total = row["total_steps"]
    steps = sorted({round(total * i / SCHEDULE_POINTS) for i in range(SCHEDULE_POINTS + 1)} | {row["warmup_steps"]})
    return steps, [warmup_cosine(step, total, row["peak_lr"], row["min_lr"], row["warmup_steps"]) for step in steps]


def curves_picture(history: list[dict], out: str, title: str = "") -> list[str]:
    """Training curves of a run's reports (`metrics.jsonl` rows) over steps: loss, learning rate
    (the reported points on the run's schedule), online kNN, the label-free metrics on the probe
    set, the health indicators on the method's scale (1 = its healthy runs, with the collapse
    threshold and a red mark where a report flagged collapse) and a method's own indicators, with
    a dotted line where the run resumed. A series of few points is drawn with markers, a single
    one with its value. Writes a PNG to `out`; returns the panels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        points = [(row["step"], row[key]) for row in history if key in row]
        return [p[0] for p in points], [p[1] for p in points]

    panels = [("loss", ["loss"]), ("learning rate", ["lr"]), ("online kNN top-1", ["knn_top1"]),
              ("label-free (probe set)", ["rankme_fraction", "alignment", "uniformity"]),
              ("health (1 = the method's healthy runs)", ["spread_vs_healthy", "rank_vs_healthy"])]
    own = [k for k in METHOD_INDICATORS if any(k in row for row in history)]
    panels += [("the method's own indicators", own)] if own else []
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), squeeze=False)
    resumes = sorted({row["resumed_from_step"] for row in history if row.get("resumed_from_step")})
    for axis, (name, keys) in zip(axes[0], panels):
        if name == "learning rate":
            steps, values = _schedule(history)
            if steps:
                axis.plot(steps, values, color="grey", linewidth=1, label="schedule")
            axis.set_ylim(bottom=0)
        for key in keys:
            steps, values = series(key)
            axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
            if len(steps) == 1:
                axis.annotate(f"{values[0]:.3g}", (steps[0], values[0]), textcoords="offset points", xytext=(4, 4),
                              fontsize=8)
        if name.startswith("health"):
            axis.axhline(1.0, color="grey", linestyle="--", linewidth=1)
            axis.axhline(COLLAPSE_OF_HEALTHY, color="red", linestyle=":", linewidth=1, label="collapse below")
            flagged = [row["step"] for row in history if row.get("collapsed")]
            if flagged:
                axis.scatter(flagged, [0] * len(flagged), color="red", marker="x", zorder=3, label="collapsed")
            axis.set_ylim(bottom=0)
        if name == "learning rate":
            axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if not any(key in row for key in keys for row in history):
            axis.text(0.5, 0.5, "not reported", ha="center", va="center", transform=axis.transAxes, color="grey")
        for step in resumes:
            axis.axvline(step, color="grey", linestyle=":", linewidth=1)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("step")
        if len(axis.get_legend_handles_labels()[0]) > 1:
            axis.legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return [name for name, _ in panels]
