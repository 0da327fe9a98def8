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
    """The first `count` decodable images of a shard location as `(n, S, S, 3)` uint8."""
    shards = find_shards(location)
    canvases = []
    for path in shards.files:
        table = pq.read_table(path, columns=["image"], filesystem=shards.filesystem)
        for value in table.column("image").to_pylist():
            try:
                canvases.append(decode_canvas(image_bytes(value), canvas_size))
            except BadImage:
                continue
            if len(canvases) == count:
                return np.stack(canvases)
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
