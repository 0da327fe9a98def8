"""Pictures for people: what the model will see."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw

from pipelines.decode import BadImage, decode_canvas, image_bytes
from pipelines.shards import find_shards
from pipelines.views import RECIPES, ViewMaker, ViewRecipe

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
    """The method's recipe sized for a canvas: full-size views, DINO locals at 96/224 of it."""
    if method == "dino":
        return RECIPES["dino"](canvas_size, max(4, round(canvas_size * 96 / 224)), 4)
    return RECIPES[method](canvas_size)


def _cell(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image).resize((CELL, CELL), Image.Resampling.NEAREST)


def augment_picture(canvases: np.ndarray, recipe: ViewRecipe, seed: int = 0) -> Image.Image:
    """A grid: one row per image, the original canvas then each of the recipe's views."""
    torch.manual_seed(seed)
    maker = ViewMaker(recipe)
    views = maker(torch.from_numpy(canvases))
    columns = ["original"] + recipe.names
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
