"""Using the encoder: timm-loadable export, embeddings with Ray Data, training curves."""

import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch

from pipelines.cli import main
from pipelines.images.shards import find_shards
from pipelines.outputs.viz import first_canvases
from pipelines.weights.checkpoint import load_checkpoint
from tests.helpers.corpus import bad_images, good_images, write_shards
from tests.helpers.runs import LEARNS, tiny_config


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def real_images(method, location, count=16):
    """Decoded test images as the encoder sees them in evaluation: `(N, 3, s, s)`."""
    return method.eval_images(torch.from_numpy(first_canvases(location, count, 16)))


def test_exported_vit_loads_in_timm_with_the_checkpoint_features(digits, mae_run, tmp_path, capsys):
    out, _ = digits
    folder = str(tmp_path / "vit")
    assert main(["export", "--checkpoint", mae_run["checkpoint"], "--out", folder]) == 0
    result = last_json(capsys)
    method, _ = load_checkpoint(mae_run["checkpoint"])
    method.eval()
    images = real_images(method, f"{out}/test")
    with torch.no_grad():
        expected = method.features(images)
        by_folder = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        by_overlay = timm.create_model(result["architecture"], pretrained=True, **result["model_args"],
                                       pretrained_cfg_overlay=dict(file=f"{folder}/model.safetensors")).eval()
        for model in (by_folder, by_overlay):
            assert torch.allclose(model(images), expected, atol=1e-5)
    width = LEARNS["mae"][1]["backbone.kwargs.embed_dim"]
    assert expected.shape == (len(images), width) and result["feature_dim"] == width
    data = timm.data.resolve_data_config({}, model=by_folder)  # the preprocessing travels with it
    assert data["input_size"] == (3, 16, 16) and data["crop_pct"] == 1.0
    assert tuple(data["mean"]) == pytest.approx(method.recipe.mean)
    keys = set(by_folder.state_dict())
    assert not any(k.startswith(("decoder", "mask_token")) for k in keys)  # the encoder alone

    # Exporting over a previous export needs --overwrite.
    assert main(["export", "--checkpoint", mae_run["checkpoint"], "--out", folder]) == 2
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")]) == 2


def test_exported_small_image_resnet_loads_with_the_printed_recipe(digits, one_epoch_run, tmp_path, capsys):
    import safetensors.torch

    out, _ = digits
    storage, _ = one_epoch_run
    folder = str(tmp_path / "resnet")
    # A run folder is accepted: its latest checkpoint is exported.
    assert main(["export", "--checkpoint", f"{storage}/again", "--out", folder]) == 0
    result = last_json(capsys)
    assert result["load"].startswith("import ") and "model = timm.create_model" in result["load"]
    scope = {}
    exec(result["load"], scope)  # the line a user pastes, into a fresh interpreter's namespace
    method, _ = load_checkpoint(result["checkpoint"])
    method.eval()
    images = real_images(method, f"{out}/test")
    with torch.no_grad():
        assert torch.allclose(scope["model"].eval()(images), method.features(images), atol=1e-5)
    weights = safetensors.torch.load_file(f"{folder}/model.safetensors")
    assert not any(k.startswith("head") for k in weights)  # SimCLR's projection head stays behind
    assert weights["conv1.weight"].shape[-1] == 3  # the small-image stem
    with pytest.raises(RuntimeError, match="size mismatch"):  # why the recipe exists
        timm.create_model(f"local-dir:{folder}", pretrained=True)


@pytest.mark.parametrize("method_name, sets", [
    ("simclr", {"backbone.small_images": False}),  # a ResNet timm builds as is
    ("dino", {"backbone.kwargs.depth": 2}),
])
def test_export_round_trip_without_training(tmp_path, method_name, sets):
    """Checkpoints written directly: a standard-stem ResNet loads with timm's own call, and DINO
    exports its teacher (made to differ from the student here), not the student."""
    from pipelines.config import build_method
    from pipelines.outputs.export import export_encoder
    from pipelines.weights.checkpoint import save_checkpoint

    config = tiny_config(method_name, **sets)
    method = build_method(config)
    with torch.no_grad():
        for parameter in method.parameters():
            parameter.add_(torch.randn_like(parameter), alpha=0.05)
    method.eval()
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    save_checkpoint(str(checkpoint), method, optimizer, torch.amp.GradScaler(enabled=False),
                    {"epoch": 1, "step": 3, "step_in_epoch": 0}, config)
    result = export_encoder(str(checkpoint), str(tmp_path / "export"), onnx=True)
    model = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    trained = model.pretrained_cfg["input_size"]
    assert model.pretrained_cfg.get("test_input_size", trained) == trained  # one size, the one it trained at
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(images), method.features(images), atol=1e-5)
    # The ONNX file, run by onnxruntime on a batch size it was not traced with, gives the same features.
    import onnxruntime

    session = onnxruntime.InferenceSession(result["onnx"]["path"], providers=["CPUExecutionProvider"])
    onnx_features = session.run(None, {"images": images[:3].numpy()})[0]
    with torch.no_grad():
        assert np.allclose(onnx_features, method.features(images[:3]).numpy(), atol=1e-4)
        if method_name == "dino":
            assert not torch.allclose(model(images), method.backbone(images), atol=1e-3)
    assert result["max_feature_difference"] <= 1e-5
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json"):  # shareable: not safetensors' own 0600
        assert os.stat(tmp_path / "export" / name).st_mode & 0o777 == 0o666 & ~umask


def test_embed_writes_one_row_per_image_with_its_id(digits, one_epoch_run, tmp_path, capsys):
    out, summary = digits
    storage, _ = one_epoch_run
    target = tmp_path / "embeddings"
    assert main(["embed", "--checkpoint", f"{storage}/again", "--data", f"{out}/test", "--out", str(target),
                 "--batch-size", "64"]) == 0
    result = last_json(capsys)
    test_rows = summary["splits"]["test"]["images"]
    assert result["rows"] == test_rows and result["bad_skipped"] == 0 and result["dimension"] == 64
    table = pq.read_table(target)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == test_rows
    shard_files = find_shards(f"{out}/test").files
    assert set(ids) == set(pq.read_table(shard_files, columns=["id"]).column("id").to_pylist())
    assert table.schema.field("embedding").type.list_size == 64
    # The embedding of a record is its checkpoint features, whatever actor or batch it went through.
    method, config = load_checkpoint(result["checkpoint"])
    method.eval()
    from pipelines.images.decode import decode_canvas, image_bytes

    rows = pq.read_table(shard_files[0], columns=["id", "image", "label"]).slice(0, 5).to_pylist()
    canvases = np.stack([decode_canvas(image_bytes(r["image"]), config.data.canvas_size) for r in rows])
    with torch.no_grad():
        expected = method.features(method.eval_images(torch.from_numpy(canvases))).numpy()
    position = {record_id: i for i, record_id in enumerate(ids)}
    embeddings = table.column("embedding")
    labels, hashes = table.column("label").to_pylist(), table.column("content_hash").to_pylist()
    for row, want in zip(rows, expected):
        got = np.asarray(embeddings[position[row["id"]]].as_py(), dtype=np.float32)
        assert np.allclose(got, want, atol=1e-4)
        assert labels[position[row["id"]]] == row["label"]
        # what `selfsup curate` groups exact duplicates by: a hash of the record's own bytes
        assert hashes[position[row["id"]]] == hashlib.blake2b(image_bytes(row["image"]), digest_size=16).hexdigest()
    assert json.loads((target / "_embeddings.json").read_text())["rows"] == test_rows

    # Corrupt images are skipped and counted; every good one gets its row.
    good, bad = list(good_images().values()), list(bad_images().values())
    write_shards(tmp_path / "mixed", good + bad)
    assert main(["embed", "--checkpoint", result["checkpoint"], "--data", str(tmp_path / "mixed"),
                 "--out", str(tmp_path / "mixed_embeddings")]) == 0
    mixed = last_json(capsys)
    assert mixed["rows"] == len(good) and mixed["bad_skipped"] == len(bad)
    written = pq.read_table(tmp_path / "mixed_embeddings").column("id").to_pylist()
    assert sorted(written) == sorted(f"r{i}" for i in range(len(good)))
    # Shards without ids have nothing to carry into the rows: refused with one line.
    (tmp_path / "no_ids").mkdir()
    pq.write_table(pa.table({"image": good}), tmp_path / "no_ids" / "part.parquet")
    assert main(["embed", "--checkpoint", result["checkpoint"], "--data", str(tmp_path / "no_ids"),
                 "--out", str(tmp_path / "no_ids_embeddings")]) == 2
    assert "no `id` column" in capsys.readouterr().err
    # An output that already holds embeddings is not overwritten by accident.
    assert main(["embed", "--checkpoint", result["checkpoint"], "--data", str(tmp_path / "mixed"),
                 "--out", str(tmp_path / "mixed_embeddings")]) == 2


def test_curves_picture_from_a_finished_run(one_epoch_run, tmp_path, capsys):
    from PIL import Image

    from pipelines.train.tracking import read_history

    storage, _ = one_epoch_run
    picture = tmp_path / "curves.png"
    assert main(["viz", "curves", "--run", f"{storage}/again", "--out", str(picture)]) == 0
    result = last_json(capsys)
    history = read_history(f"{storage}/again")
    assert result["reports"] == len(history) >= 1
    assert all(0 < row["rankme_fraction"] <= 1 for row in history)  # the label-free panel has its data
    assert result["panels"] == ["loss", "learning rate", "online kNN top-1", "label-free (probe set)",
                                "health (1 = the method's healthy runs)"]
    # the health panel and the LR schedule have their data
    assert all(row["spread_vs_healthy"] > 0 and row["rank_vs_healthy"] > 0 for row in history)
    assert all(row["peak_lr"] >= row["lr"] >= row["min_lr"] and row["warmup_steps"] >= 0 for row in history)
    width, height = Image.open(picture).size
    assert width > 4 * height / 2 and height > 200
    assert main(["viz", "curves", "--run", str(tmp_path), "--out", str(picture)]) == 2
