"""MAE: masked autoencoders.

He, Chen, Xie, Li, Dollar, Girshick. "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022.
A timm ViT encoder sees only the visible patches of a randomly masked image (75 % masked per
sample, by argsort of uniform noise); a light decoder gets the encoded tokens plus one shared
learned mask token, unshuffled, with fixed 2-D sin-cos position embeddings, and predicts the
pixels of every patch; the loss is the MSE on the masked patches only, against per-patch
normalised pixels (`norm_pix_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from methods.base import HealthScale, LabelFreeObjective, Method, adamw, register
from methods.checks import check_rules
from methods.views import ViewRecipe, ViewSpec


def mae_recipe(size: int = 224) -> ViewRecipe:
    """One view (He et al., 2022): random resized crop 0.2-1 and flip only."""
    return ViewRecipe({"view": ViewSpec(size=size, scale=(0.2, 1.0), jitter_p=0.0, grayscale=0.0)})


def sincos_with_cls(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings `(1, 1 + H*W, dim)`; the class token's row is 0."""
    table = build_sincos2d_pos_embed(list(grid), dim)
    return torch.cat([torch.zeros(1, dim), table]).unsqueeze(0)


@dataclass
class MAEHyperparameters:
    """Args:
    mask_ratio: fraction of patches masked per sample, in (0, 1).
    decoder_dim, decoder_depth, decoder_heads: the decoder (512 / 8 / 16 at ImageNet scale).
    norm_pix_loss: targets are each patch's pixels normalised by that patch's mean and variance.
    feature_pool: `cls` token or `mean` of patch tokens for evaluation features.
    init: `reference`, the MAE code's initialisation (`initialize_weights` below), or `timm`, the
        timm ViT's own (which the reference code and lightly both replace).
    """

    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    feature_pool: str = "cls"
    init: str = "reference"

    def validate(self) -> None:
        check_rules("hparams", self, {
            "mask_ratio": (isinstance(self.mask_ratio, (int, float)) and 0 < self.mask_ratio < 1, "in (0, 1), exclusive"),
            **{key: (isinstance(getattr(self, key), int) and getattr(self, key) >= 1, "an integer >= 1")
               for key in ("decoder_dim", "decoder_depth", "decoder_heads")},
            "feature_pool": (self.feature_pool in ("cls", "mean"), "cls or mean"),
            "init": (self.init in ("reference", "timm"), "reference or timm"),
        })
        check_rules("hparams", self, {  # once both are integers >= 1
            "decoder_dim": (self.decoder_dim % self.decoder_heads == 0,
                            f"divisible by decoder_heads={self.decoder_heads}")})


@register
class MAE(Method):
    name = "mae"
    Hyperparameters = MAEHyperparameters
    lr_scaling = "linear"
    capabilities = frozenset({"reconstruct"})
    search_space = ["mask_ratio=uniform(0.5, 0.9)", "batch_size=choice(64, 128, 256)"]
    # Its healthy runs' medians (docs/BENCHMARKS.md, "Health on one scale per method"): the class token's
    # features sit in about two directions, good run or not, so the collapse flag, a share of this, cannot fire.
    health = HealthScale(embedding_std=0.18, rankme_fraction=0.019)
    # The label-free study's best metric for MAE, on two searches of the digits sample with that flag:
    # alignment, lower better (docs/FINDINGS.md, "Label-free model selection"; tests/test_tune.py).
    label_free = LabelFreeObjective("alignment", "min", spearman=0.81, trials=16)
    smoke_sets = {"views.view.size": 16, "backbone.img_size": 16, "backbone.kwargs.embed_dim": 32,
                  "backbone.kwargs.depth": 2, "backbone.kwargs.num_heads": 2}
    presets = {
        # ViT of width 96, depth 4, patch 4 on 32 px; decoder 64 x 2.
        "tiny": {
            "backbone": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4,
                         "kwargs": {"embed_dim": 96, "depth": 4, "num_heads": 3}},
            "hparams": {"mask_ratio": 0.75, "decoder_dim": 64, "decoder_depth": 2, "decoder_heads": 4},
            "views": {"view.size": 32},
            "data": {"canvas_size": 32},
            "optim": {"epochs": 20, "batch_size": 256, "base_lr": 1.5e-3, "warmup_epochs": 2,
                      "weight_decay": 0.05, "betas": [0.9, 0.95]},
        },
        # The paper: ViT-B/16, decoder 512 x 8, batch 4096, lr 1.5e-4 x B/256, 40 warmup epochs.
        "imagenet": {
            "backbone": {"name": "vit_base_patch16_224"},
            "hparams": {"mask_ratio": 0.75, "decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16},
            "views": {"view.size": 224},
            "data": {"canvas_size": 256},
            "optim": {"epochs": 800, "batch_size": 4096, "base_lr": 1.5e-4, "warmup_epochs": 40,
                      "weight_decay": 0.05, "betas": [0.9, 0.95]},
        },
    }

    @classmethod
    def default_recipe(cls, size: int = 224) -> ViewRecipe:
        return mae_recipe(size)

    @classmethod
    def masking(cls, hparams: MAEHyperparameters, patch_size: int | None) -> tuple[float, int] | None:
        return (hparams.mask_ratio, patch_size) if patch_size else None

    @classmethod
    def patch_mask(cls, n: int, patches: int, ratio: float) -> torch.Tensor:
        return cls.random_masking(torch.zeros(n, patches, 1), ratio)[1]

    def __init__(self, backbone, hparams: MAEHyperparameters, recipe):
        super().__init__(backbone, hparams, recipe)
        encoder = self.backbone
        if not isinstance(encoder, VisionTransformer) or not encoder.has_class_token:
            raise ValueError(f"backbone.name={backbone.name!r}: MAE needs a timm VisionTransformer with a class token")
        if len(recipe.names) != 1:
            raise ValueError(f"views: MAE needs one view, the recipe makes {len(recipe.names)}")
        self.grid = tuple(encoder.patch_embed.grid_size)
        self.patch = encoder.patch_embed.patch_size[0]
        width = encoder.embed_dim
        with torch.no_grad():  # fixed sin-cos position embeddings in the encoder too, as the paper
            encoder.pos_embed.copy_(sincos_with_cls(self.grid, width))
        encoder.pos_embed.requires_grad_(False)
        self.decoder_embed = nn.Linear(width, hparams.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hparams.decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("decoder_pos_embed", sincos_with_cls(self.grid, hparams.decoder_dim), persistent=False)
        self.decoder_blocks = nn.Sequential(
            *[Block(hparams.decoder_dim, hparams.decoder_heads, qkv_bias=True) for _ in range(hparams.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(hparams.decoder_dim)
        self.decoder_pred = nn.Linear(hparams.decoder_dim, self.patch**2 * 3)
        if hparams.init == "reference":
            self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The reference code's init (`MaskedAutoencoderViT.initialize_weights`), not timm's: every
        Linear and the patch projection (as a Linear) xavier-uniform with zero bias, LayerNorm 1 / 0,
        class token N(0, 0.02) (the mask token is, under either init). On MNIST-M, timm's init was
        what put lightly's MAE ahead of ours (docs/BENCHMARKS.md, "Every method by its own protocol
        on MNIST-M")."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        projection = self.backbone.patch_embed.proj.weight
        nn.init.xavier_uniform_(projection.view(projection.shape[0], -1))
        nn.init.normal_(self.backbone.cls_token, std=0.02)

    # --- pieces, as in the reference code ------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """`imgs: (N, 3, H, W)` -> `(N, L, p*p*3)`, patches in row-major order."""
        n, c, h, w = imgs.shape
        p = self.patch
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """`(N, L, p*p*3)` -> `(N, 3, H, W)`."""
        n, p = patches.shape[0], self.patch
        h, w = self.grid
        x = patches.reshape(n, h, w, p, p, 3)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, 3, h * p, w * p)

    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Keep `round(L * (1 - mask_ratio))` random tokens per sample (argsort of uniform noise).

        `x: (N, L, D)` -> visible `(N, L_keep, D)`, `mask: (N, L)` (1 = masked) in the original
        order, and `ids_restore: (N, L)` that unshuffles.
        """
        n, length, dim = x.shape
        keep = int(round(length * (1 - mask_ratio)))
        noise = torch.rand(n, length, device=x.device) if noise is None else noise
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        return visible, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """`imgs: (N, 3, H, W)` -> latent `(N, 1 + L_keep, D)`, mask `(N, L)`, ids_restore `(N, L)`."""
        encoder = self.backbone
        x = encoder.patch_embed(imgs) + encoder.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (encoder.cls_token + encoder.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = encoder.blocks(encoder.norm_pre(torch.cat([cls, x], dim=1)))
        return encoder.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent `(N, 1 + L_keep, D)` -> pixel predictions `(N, L, p*p*3)` for every patch."""
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        masks = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        tokens = torch.cat([x[:, 1:, :], masks], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], tokens], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, 1:, :]

    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """Per-patch targets `(N, L, p*p*3)`: normalised by each patch's mean/var with norm_pix_loss."""
        target = self.patchify(imgs)
        if self.hparams.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only. `pred: (N, L, p*p*3)`, `mask: (N, L)`."""
        per_patch = ((pred.float() - self.targets(imgs).float()) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    # --- the Method interface --------------------------------------------------------------
    def forward(self, views: list[torch.Tensor], noise: torch.Tensor | None = None):
        """`views: [(N, 3, H, W)]` -> (masked-patch MSE, {"embeddings": CLS of the visible tokens})."""
        imgs = views[0]
        latent, mask, ids_restore = self.forward_encoder(imgs, self.hparams.mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), {"embeddings": latent[:, 0].detach()}

    def make_optimizer(self, groups, lr, optim):
        return adamw(groups, lr, optim.betas)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder on the whole image (no masking): CLS token or mean of patch tokens."""
        tokens = self.backbone.forward_features(images)
        return tokens[:, 0] if self.hparams.feature_pool == "cls" else tokens[:, 1:].mean(dim=1)

    def encoder_model_args(self) -> dict:
        # timm pools the same way; fc_norm=False keeps the final norm where MAE trained it.
        if self.hparams.feature_pool == "cls":
            return {"global_pool": "token"}
        return {"global_pool": "avg", "fc_norm": False}

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        """For pictures: `(reconstruction, mask image)`, both `(N, 3, H, W)` in the input's
        normalisation. With norm_pix_loss the predictions are mapped back with each true patch's
        mean/var (the model never predicts absolute colour), and visible patches are pasted back."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        if self.hparams.norm_pix_loss:
            target = self.patchify(imgs)
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        patch_mask = mask.unsqueeze(-1).expand(-1, -1, self.patch**2 * 3)
        pasted = self.patchify(imgs) * (1 - patch_mask) + pred * patch_mask
        return self.unpatchify(pasted), self.unpatchify(patch_mask)
