"""`data.decode: gpu` on CPU: the routing in the decode tasks, the device decode and its Pillow
fallback, the bad-image accounting and the refusal without CUDA. The same functions run with
device="cuda" on a GPU worker (benchmarks/performance/gpu_check.py)."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch
from PIL import Image

import pipelines.images.device_decode as device_decode
from pipelines.cli import main
from pipelines.images.decode import ROUTE_CANVAS, ROUTE_JPEG, decode_canvas, jpeg_orientation, route_records
from pipelines.images.device_decode import decode_jpegs, device_canvases
from pipelines.images.ingest import IngestConfig, image_dataset, iter_canvas_batches
from tests.helpers.corpus import bad_images, encode, good_images, rgb_image, write_shards

CPU = torch.device("cpu")


def quadrants(width: int = 96, height: int = 64) -> Image.Image:
    """Four flat colours: any wrong flip or turn moves a colour to another corner."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[: height // 2, : width // 2] = (230, 30, 30)
    pixels[: height // 2, width // 2 :] = (30, 230, 30)
    pixels[height // 2 :, : width // 2] = (30, 30, 230)
    pixels[height // 2 :, width // 2 :] = (230, 230, 30)
    return Image.fromarray(pixels)


def batch_of(table) -> dict:
    """`route_records`' table as the numpy batch `iter_batches` hands the worker."""
    columns = table.to_pydict()
    return {key: np.array(values, dtype=object if key in ("encoded", "id") else None) for key, values in columns.items()}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_device_canvas_matches_pillow_for_every_exif_orientation(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(quadrants(), "JPEG", quality=95, exif=exif)
    assert jpeg_orientation(data, 10**8) == orientation
    table, bad = route_records([data], ["q"], 32, 10**8)
    assert not bad and table.column("route").to_pylist() == [ROUTE_JPEG]
    canvases, bad = device_canvases(batch_of(table), 32, CPU, 10**8)
    expected = decode_canvas(data, 32).astype(np.int16)
    difference = np.abs(canvases[0].numpy().astype(np.int16) - expected)
    assert not bad and canvases.shape == (1, 32, 32, 3) and canvases.dtype == torch.uint8
    assert difference.mean() < 4, f"orientation {orientation}: mean difference {difference.mean():.1f}"
    upright = device_decode.fit_canvas(decode_jpegs([data], CPU)[0], 32).numpy().astype(np.int16)
    if orientation != 1:  # the check above can fail: ignoring the orientation is far off
        assert np.abs(upright - expected).mean() > 20


def test_routing_keeps_jpegs_encoded_decodes_the_rest_and_drops_the_bad():
    images = {**good_images(), **bad_images()}
    names = list(images)
    table, bad = route_records([images[n] for n in names], names, 16, 10**7)
    routes = dict(zip(table.column("id").to_pylist(), table.column("route").to_pylist()))
    # A truncated JPEG's header reads fine: the device finds out (test below).
    assert {n for n, r in routes.items() if r == ROUTE_JPEG} == {"rgb.jpg", "truncated.jpg"}
    assert {n for n, r in routes.items() if r == ROUTE_CANVAS} == set(good_images()) - {"rgb.jpg"}  # CMYK too
    assert dict(bad).keys() == {"corrupt.png", "empty.png", "text.jpg", "bomb.png"}
    assert "decompression bomb" in dict(bad)["bomb.png"]
    for row, name in enumerate(table.column("id").to_pylist()):
        if routes[name] == ROUTE_CANVAS:  # Pillow's canvas, byte for byte
            assert table.column("encoded")[row].as_py() == decode_canvas(images[name], 16).tobytes()


def test_a_jpeg_over_the_pixel_limit_goes_to_pillow_which_names_it():
    data = encode(rgb_image(3, (64, 64)), "JPEG")
    assert jpeg_orientation(data, 64 * 64) == 1 and jpeg_orientation(data, 64 * 64 - 1) is None
    _, bad = route_records([data], ["big"], 16, 64 * 64 - 1)
    assert bad and "decompression bomb" in bad[0][1]


def test_one_bad_jpeg_does_not_cost_its_batch():
    good = encode(rgb_image(4, (48, 40)), "JPEG")
    decoded = decode_jpegs([good, bad_images()["truncated.jpg"], good], CPU)
    assert decoded[1] is None and decoded[0].shape == decoded[2].shape == (3, 40, 48)


def test_jpeg_the_device_refuses_is_decoded_by_pillow_or_counted_with_its_id(monkeypatch):
    good = encode(rgb_image(5, (40, 30)), "JPEG")
    truncated = bad_images()["truncated.jpg"]
    png = encode(rgb_image(6, (30, 40)))
    table, bad = route_records([good, truncated, png, good], ["a", "b", "c", "d"], 16, 10**8)
    assert not bad
    # The device refuses the first JPEG too (as nvJPEG does a coding it lacks): Pillow decodes it.
    real = device_decode.decode_jpegs
    monkeypatch.setattr(device_decode, "decode_jpegs", lambda jpegs, device: [None, *real(jpegs[1:], device)])
    canvases, bad = device_canvases(batch_of(table), 16, CPU, 10**8)
    assert len(bad) == 1 and bad[0][0] == "b" and bad[0][1].startswith("corrupt image")
    assert len(canvases) == 3  # a, c, d in order
    assert np.array_equal(canvases[0].numpy(), decode_canvas(good, 16))  # Pillow's own canvas
    assert np.array_equal(canvases[1].numpy(), decode_canvas(png, 16))


def test_a_pass_decoded_on_the_device_keeps_full_batches_and_counts_every_bad_image(ray_session, tmp_path):
    good = [encode(rgb_image(seed, (40, 30)), "JPEG") for seed in range(40)]
    others = [encode(rgb_image(100 + seed, (30, 40))) for seed in range(8)]  # PNGs: Pillow in the tasks
    broken = [bad_images()["truncated.jpg"]] * 3 + [b"not an image"] * 2  # 3 found on the device
    values = good + others + broken
    order = np.random.default_rng(0).permutation(len(values))
    write_shards(tmp_path / "mixed", [values[i] for i in order], rows_per_shard=9)
    config = IngestConfig(canvas_size=16, shuffle_buffer=0, max_bad_fraction=0.5, decode="gpu")
    dataset, log = image_dataset(str(tmp_path / "mixed"), config, jpeg_on_device=True)
    batches = list(iter_canvas_batches(dataset, 8, log, config, CPU, drop_last=False))
    sizes = [len(b["image"]) for b in batches]
    assert sum(sizes) == 48 and set(sizes[:-1]) == {8}  # 5 gaps filled by the next rows
    summary = ray.get(log.summary.remote())
    assert (summary["seen"], summary["bad"]) == (53, 5)
    bad_ids = {example["id"] for example in summary["bad_examples"]}
    assert bad_ids == {f"r{row}" for row, i in enumerate(order) if i >= 48}
    cpu = IngestConfig(canvas_size=16, shuffle_buffer=0, max_bad_fraction=0.5, shuffle_files=False)
    cpu_dataset, cpu_log = image_dataset(str(tmp_path / "mixed"), cpu)
    assert sum(len(b["image"]) for b in iter_canvas_batches(cpu_dataset, 8, cpu_log, cpu)) == 48


def test_decode_setting_is_checked():
    with pytest.raises(ValueError, match=r"data.decode='tpu': must be cpu or gpu"):
        IngestConfig(decode="tpu").validate()


def test_gpu_decode_is_refused_before_ray_without_gpu_workers_or_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = ["pretrain", "--method", "simclr", "--data", str(tmp_path / "none"), "--set", "data.decode=gpu"]
    assert main(base) == 2
    assert "data.decode=gpu: the workers train on CPU (no --gpus-per-worker)" in capsys.readouterr().err
    assert main([*base, "--gpus-per-worker", "1"]) == 2
    assert "data.decode=gpu: this machine has no CUDA device; use data.decode=cpu" in capsys.readouterr().err
