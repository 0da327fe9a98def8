"""lightly's side of `peer_lightly.py`: pretrain one method with lightly's own recipe on our
backbone, and save the encoder's weights. Run by `peer_lightly.py` in a process of its own, with
lightly imported from the folder that script installed it into (never this project's
dependencies).

The recipe per method is lightly's: the model, heads, loss, optimizer and momentum schedule of its
`examples/pytorch/<method>.py`, the transforms at 32 px as lightly's CIFAR-10 benchmark sets them
(no blur; DINO without local crops), lightly's plain PyTorch loop and DataLoader. What is ours,
for an equal budget: the backbone (built from our run's config, so the same architecture and
init), the images (our decoded canvases of the same shards), the epochs and the batch size. MAE's
decoder is ours too (lightly's example has 8 blocks of width 512: several times the encoder's
cost on a CPU).

    python -m benchmarks.research.lightly_side --config RUN_CONFIG.json --data TRAIN --out FOLDER
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipelines.config import build_method, config_from_dict
from pipelines.images.decode import decode_canvas


class ShardImages(torch.utils.data.Dataset):
    """The training shards' images as PIL images of the run's canvas size, in memory (the sample
    is 4,000 images), each passed through lightly's transform."""

    def __init__(self, location: str, canvas_size: int, transform):
        files = sorted(glob.glob(os.path.join(location, "*.parquet")))
        blobs = [b for f in files for b in pq.read_table(f, columns=["image"]).column("image").to_pylist()]
        self.images = [Image.fromarray(decode_canvas(b, canvas_size)) for b in blobs]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images[index])


def simclr(backbone, features: int, epochs: int, batch_size: int):
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform

    head = SimCLRProjectionHead(features, 512, 128)
    model = torch.nn.ModuleDict({"backbone": backbone, "head": head})
    criterion = NTXentLoss()

    def step(views, epoch):
        return criterion(*(head(backbone(view).flatten(1)) for view in views))

    return (model, SimCLRTransform(input_size=32, gaussian_blur=0.0), torch.optim.SGD(model.parameters(), lr=0.06),
            step, backbone)


def byol(backbone, features: int, epochs: int, batch_size: int):
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform
    from lightly.utils.scheduler import cosine_schedule

    projection, prediction = BYOLProjectionHead(features, 1024, 256), BYOLPredictionHead(256, 1024, 256)
    target_backbone, target_projection = copy.deepcopy(backbone), copy.deepcopy(projection)
    deactivate_requires_grad(target_backbone)
    deactivate_requires_grad(target_projection)
    model = torch.nn.ModuleDict({"backbone": backbone, "projection": projection, "prediction": prediction})
    criterion = NegativeCosineSimilarity()

    def step(views, epoch):
        momentum = cosine_schedule(epoch, epochs, 0.996, 1)
        update_momentum(backbone, target_backbone, m=momentum)
        update_momentum(projection, target_projection, m=momentum)
        x0, x1 = views
        p0, p1 = (prediction(projection(backbone(x).flatten(1))) for x in (x0, x1))
        with torch.no_grad():
            z0, z1 = (target_projection(target_backbone(x).flatten(1)) for x in (x0, x1))
        return 0.5 * (criterion(p0, z1) + criterion(p1, z0))

    transform = BYOLTransform(view_1_transform=BYOLView1Transform(input_size=32, gaussian_blur=0.0),
                              view_2_transform=BYOLView2Transform(input_size=32, gaussian_blur=0.0))
    return model, transform, torch.optim.SGD(model.parameters(), lr=0.06), step, backbone


def dino(backbone, features: int, epochs: int, batch_size: int):
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import DINOTransform
    from lightly.utils.scheduler import cosine_schedule

    head = DINOProjectionHead(features, 512, 64, 2048, freeze_last_layer=1)
    teacher_backbone, teacher_head = copy.deepcopy(backbone), DINOProjectionHead(features, 512, 64, 2048)
    deactivate_requires_grad(teacher_backbone)
    deactivate_requires_grad(teacher_head)
    model = torch.nn.ModuleDict({"backbone": backbone, "head": head})
    criterion = DINOLoss(output_dim=2048, warmup_teacher_temp_epochs=5)

    def step(views, epoch):
        momentum = cosine_schedule(epoch, epochs, 0.996, 1)
        update_momentum(backbone, teacher_backbone, m=momentum)
        update_momentum(head, teacher_head, m=momentum)
        with torch.no_grad():
            teacher_out = [teacher_head(teacher_backbone(view).flatten(1)) for view in views[:2]]
        student_out = [head(backbone(view).flatten(1)) for view in views]
        return criterion(teacher_out, student_out, epoch=epoch)

    def after_backward(epoch):
        head.cancel_last_layer_gradients(current_epoch=epoch)

    step.after_backward = after_backward
    transform = DINOTransform(global_crop_size=32, n_local_views=0, gaussian_blur=(0, 0, 0))
    # The teacher is the encoder DINO evaluates (the paper's and our choice).
    return model, transform, torch.optim.Adam(model.parameters(), lr=0.001), step, teacher_backbone


def mae(backbone, features: int, epochs: int, batch_size: int, decoder: tuple[int, int, int] = (64, 2, 4)):
    from lightly.models import utils
    from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM
    from lightly.transforms import MAETransform

    encoder = MaskedVisionTransformerTIMM(vit=backbone)
    patch = backbone.patch_embed.patch_size[0]
    width, depth, heads = decoder
    head = MAEDecoderTIMM(num_patches=backbone.patch_embed.num_patches, patch_size=patch, embed_dim=backbone.embed_dim,
                          decoder_embed_dim=width, decoder_depth=depth, decoder_num_heads=heads)
    model = torch.nn.ModuleDict({"encoder": encoder, "decoder": head})
    criterion = torch.nn.MSELoss()

    def step(views, epoch):
        images = views[0]
        sequence = encoder.sequence_length
        idx_keep, idx_mask = utils.random_token_mask(size=(images.shape[0], sequence), mask_ratio=0.75)
        encoded = encoder.encode(images=images, idx_keep=idx_keep)
        tokens = utils.repeat_token(head.mask_token, (images.shape[0], sequence))
        tokens = utils.set_at_index(tokens, idx_keep, head.embed(encoded).type_as(tokens))
        predicted = head.predict(utils.get_at_index(head.decode(tokens), idx_mask))
        target = utils.get_at_index(utils.patchify(images, patch), idx_mask - 1)  # no class token in the patches
        return criterion(predicted, target)

    return model, MAETransform(input_size=32), torch.optim.AdamW(model.parameters(), lr=1.5e-4), step, backbone


RECIPES = {"simclr": simclr, "byol": byol, "dino": dino, "mae": mae}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="our run's config (JSON): backbone, epochs, batch")
    parser.add_argument("--data", required=True, help="training shards")
    parser.add_argument("--out", required=True, help="folder for model.safetensors")
    parser.add_argument("--loader-workers", type=int, default=1)
    args = parser.parse_args()

    import lightly
    import safetensors.torch

    with open(args.config) as f:
        config = config_from_dict(json.load(f))
    epochs, batch_size = config.optim.epochs, config.optim.batch_size
    backbone = build_method(config).backbone  # our architecture, at its random init
    features = backbone.num_features
    model, transform, optimizer, step, encoder = RECIPES[config.method](backbone, features, epochs, batch_size)
    images = ShardImages(args.data, config.data.canvas_size, transform)
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.loader_workers, persistent_workers=args.loader_workers > 0)
    model.train()
    start, losses = time.perf_counter(), []
    for epoch in range(epochs):
        total, seen, epoch_start = 0.0, 0, time.perf_counter()
        for views in loader:
            loss = step(views, epoch)
            loss.backward()
            if hasattr(step, "after_backward"):
                step.after_backward(epoch)
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item()
            seen += len(views[0])
        losses.append(total / len(loader))
        rate = seen / (time.perf_counter() - epoch_start)  # the last epoch's, as our runs report
        print(f"lightly {config.method} epoch {epoch}: loss {losses[-1]:.4f}", flush=True)
    seconds = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    weights = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    safetensors.torch.save_file(weights, os.path.join(args.out, "model.safetensors"))
    print(json.dumps({"lightly": lightly.__version__, "lightly_file": lightly.__file__, "method": config.method,
                      "epochs": epochs, "batch_size": batch_size, "loop_minutes": round(seconds / 60, 2),
                      "images_per_second": round(rate, 1), "first_loss": round(losses[0], 4),
                      "last_loss": round(losses[-1], 4), "weights": args.out, "threads": torch.get_num_threads(),
                      "numpy": np.__version__}))


if __name__ == "__main__":
    main()
