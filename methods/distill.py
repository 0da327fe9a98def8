"""Distillation: a frozen pretrained encoder (the teacher) taught to a small one (the student) on
unlabeled images.

Beyer, Zhai, Royer, Markeeva, Anil, Kolesnikov. "Knowledge distillation: A good teacher is patient
and consistent", CVPR 2022: teacher and student see the *same* augmented view (consistent), over a
long schedule (patient). Without labels there is no classifier whose outputs to match, so, as
LightlyTrain's `distillation` method describes it ("What's under the Hood"), a queue of recent
teacher embeddings is the classifier: both embeddings, L2-normalised, are scored against the queue
and the student's distribution over it is pulled to the teacher's (a KL divergence, a temperature
each). The student is any backbone plus a linear projection to the teacher's width.

The teacher is any timm architecture with weights from a local file or folder (`methods/weights.py`
reads them without running code), or `random` (a seeded random init: "Random Teachers are Good
Teachers", Sarnthein et al., ICML 2023, and the tests' smoke teacher). It is frozen, in eval mode,
in bf16 and channels-last on a GPU, outside the module tree: never DDP-wrapped, never in the
optimizer or a checkpoint. `pinned` reads it once before Ray starts, refuses a misfit in one line
and records its SHA-256 and width in the run's config; each worker loads it at its first step and
checks the hash, so a resume or a node that finds a different file is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import timm
import torch
import torch.nn.functional as F
from torch import nn

from methods.backbone import small_image_stem
from methods.base import HealthScale, Method, adamw, register
from methods.checks import check_rules
from methods.distributed import gather_with_grad
from methods.views import IMAGENET_MEAN, IMAGENET_STD, ViewRecipe, ViewSpec
from methods.weights import WeightsError, file_sha256, fit_weights, model_config, read_weights, weights_file

RANDOM = "random"  # hparams.teacher_weights for a seeded random teacher
TEACHER = "hparams.teacher_weights"


class QueueDistillationLoss(nn.Module):
    """KL(p_teacher || p_student), averaged over the images, where p = softmax(e C^T / tau): an
    L2-normalised embedding `e` scored against the pseudo-classifier `C`, the L2-normalised teacher
    embeddings of this batch and of the queue (LightlyTrain's "pseudo classifier"; Beyer et al.,
    2022, distil a real classifier's outputs the same way).

    Args:
        teacher_temperature, student_temperature: softmax temperatures > 0 (the teacher's sharpens
            its targets; equal temperatures make the loss 0 when the embeddings agree).

    Inputs: `student: (n, d)` projected student embeddings, `teacher: (n, d)` teacher embeddings
    (no gradient flows into them), `classifier: (k, d)` rows already L2-normalised. Output: the
    mean KL over the n images; 0 exactly when the two distributions agree.
    """

    def __init__(self, teacher_temperature: float = 0.07, student_temperature: float = 0.07):
        super().__init__()
        for name, value in (("teacher_temperature", teacher_temperature), ("student_temperature", student_temperature)):
            if not value > 0:
                raise ValueError(f"{name}={value!r}: must be > 0")
        self.teacher_temperature, self.student_temperature = teacher_temperature, student_temperature

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
        if student.shape != teacher.shape or student.ndim != 2 or classifier.shape[1:] != student.shape[1:]:
            raise ValueError(f"student and teacher must be (n, d) and classifier (k, d), got {tuple(student.shape)}, "
                             f"{tuple(teacher.shape)} and {tuple(classifier.shape)}")
        student = F.normalize(student.float(), dim=1)
        teacher = F.normalize(teacher.detach().float(), dim=1)
        classifier = classifier.detach().float()
        target = F.log_softmax(teacher @ classifier.T / self.teacher_temperature, dim=1)
        predicted = F.log_softmax(student @ classifier.T / self.student_temperature, dim=1)
        return (target.exp() * (target - predicted)).sum(dim=1).mean()


class TeacherQueue(nn.Module):
    """A first-in-first-out queue of `size` L2-normalised teacher embeddings of width `dim`, in
    buffers (a checkpoint keeps it, so a resume scores against the same classifier). `push` adds
    the rows of a step's global batch, the same on every worker, so the queues stay equal."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("rows", torch.zeros(size, dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("next", torch.zeros((), dtype=torch.long))
        # `filled` on the host too: reading the buffer every step would be a device sync per step
        # (the loop's only one is its NaN check, docs/BENCHMARKS.md "The CUDA path").
        self.count = 0

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.count = int(self.filled)  # once, at a resume

    def contents(self) -> torch.Tensor:
        """`(filled, dim)`: the rows pushed so far (all `size` once full), in no particular order."""
        return self.rows[: self.count]

    @torch.no_grad()
    def push(self, embeddings: torch.Tensor) -> None:
        """`embeddings: (m, dim)`, normalised here; of more than `size` rows only the last are kept."""
        size = self.rows.shape[0]
        embeddings = F.normalize(embeddings.float(), dim=1)[-size:]
        positions = (self.next + torch.arange(embeddings.shape[0], device=self.rows.device)) % size
        self.rows[positions] = embeddings.to(self.rows.dtype)
        self.next.copy_((self.next + embeddings.shape[0]) % size)
        self.count = min(self.count + embeddings.shape[0], size)
        self.filled.fill_(self.count)


@dataclass
class DistillHyperparameters:
    """Args:
    teacher: the teacher's timm architecture (e.g. `vit_base_patch14_dinov2`); taken from the
        weights folder's `config.json` when empty.
    teacher_weights: a timm model folder, a `selfsup export` folder, a `.safetensors` / `.pth` /
        `.bin` file, or `random`. Every worker reads it: on a cluster, a path every node sees.
    teacher_args: `timm.create_model` arguments beyond the folder's own (e.g.
        `{"dynamic_img_size": true}` for a ViT that takes other sizes than it was trained at).
    teacher_image_size: the views are resized to this for the teacher (0: the view's own size).
    teacher_sha256, teacher_dim: pinned before the run starts (the weights' SHA-256 and the
        teacher's output width); a value given must match.
    queue_size: teacher embeddings in the pseudo-classifier's queue.
    teacher_temperature, student_temperature: the loss's softmax temperatures.
    """

    teacher: str = ""
    teacher_weights: str = ""
    teacher_args: dict = field(default_factory=dict)
    teacher_image_size: int = 0
    teacher_sha256: str = ""
    teacher_dim: int = 0
    queue_size: int = 4096
    teacher_temperature: float = 0.07
    student_temperature: float = 0.07

    def validate(self) -> None:
        check_rules("hparams", self, {
            "teacher": (self.teacher == "" or timm.is_model(self.teacher),
                        "a timm model name, or empty (the weights folder's)"),
            **{key: (isinstance(getattr(self, key), int) and not isinstance(getattr(self, key), bool)
                     and getattr(self, key) >= 0, "an integer >= 0") for key in ("teacher_image_size", "teacher_dim")},
            "queue_size": (isinstance(self.queue_size, int) and self.queue_size >= 1, "an integer >= 1"),
            **{key: (0 < getattr(self, key) <= 10, "in (0, 10]") for key in ("teacher_temperature",
                                                                            "student_temperature")},
        })


def teacher_description(hparams: DistillHyperparameters) -> tuple[str, dict, bool, dict]:
    """(architecture, `timm.create_model` arguments, whether it has selfsup's small-image stem, its
    pretrained_cfg) from the hyperparameters and the weights folder's `config.json`."""
    path = hparams.teacher_weights
    if not path:
        raise WeightsError(f"{TEACHER}: required: a timm or `selfsup export` model folder, a weights file, or "
                           f"{RANDOM!r} (a seeded random teacher)")
    folder = {} if path == RANDOM else model_config(path)
    if path != RANDOM:
        weights_file(path, TEACHER)  # a missing file or folder is named before anything else
    named, architecture = hparams.teacher, folder.get("architecture", "")
    if named and architecture and named != architecture:
        raise WeightsError(f"hparams.teacher={named!r}: {path}/config.json says its weights are {architecture!r}")
    if not (named or architecture):
        raise WeightsError(f"hparams.teacher: required with {TEACHER} {path} (no config.json names its architecture)")
    args = {**folder.get("model_args", {}), **hparams.teacher_args, "num_classes": 0}
    stem = bool(folder.get("selfsup", {}).get("small_images_stem"))
    return named or architecture, args, stem, folder.get("pretrained_cfg", {})


def build_teacher(hparams: DistillHyperparameters) -> tuple[nn.Module, str, dict]:
    """(the teacher in eval mode with no gradient, its weights' SHA-256, its pretrained_cfg)."""
    architecture, args, stem, cfg = teacher_description(hparams)
    try:
        with torch.random.fork_rng(devices=[]):  # the training RNG goes on untouched
            torch.manual_seed(0)  # a `random` teacher is the same on every worker and every resume
            model = timm.create_model(architecture, pretrained=False, **args)
    except Exception as error:  # noqa: BLE001  (timm raises TypeError, AssertionError, ...)
        raise WeightsError(f"hparams.teacher_args: timm cannot build {architecture} with {args} "
                           f"({str(error).splitlines()[0][:200] if str(error) else type(error).__name__})") from None
    model = small_image_stem(model) if stem else model
    if hparams.teacher_weights == RANDOM:
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        sha = digest.hexdigest()
    else:
        path = hparams.teacher_weights
        weights, _ = fit_weights(read_weights(path, TEACHER), model, f"{TEACHER} {path}", f"timm's {architecture}",
                                 "set hparams.teacher (and hparams.teacher_args) to what these weights were trained as")
        model.load_state_dict(weights)
        sha = file_sha256(weights_file(path, TEACHER))
    return model.eval().requires_grad_(False), sha, {**getattr(model, "pretrained_cfg", {}), **cfg}


def distill_recipe(size: int = 224) -> ViewRecipe:
    """One view, seen by teacher and student alike (Beyer et al., 2022: "consistent"): a crop of
    0.2-1 of the image, flip, and light colour jitter."""
    return ViewRecipe({"view": ViewSpec(size=size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.5,
                                        grayscale=0.1)})


@register
class Distill(Method):
    name = "distill"
    Hyperparameters = DistillHyperparameters
    lr_scaling = "linear"
    # Its healthy runs' medians, four runs so far (docs/BENCHMARKS.md, "Health on one scale per method").
    health = HealthScale(embedding_std=0.62, rankme_fraction=0.41)
    search_space = ["hparams.teacher_temperature=loguniform(0.02, 0.2)",
                    "hparams.student_temperature=loguniform(0.02, 0.2)",
                    "hparams.queue_size=choice(1024, 4096, 16384)", "optim.base_lr=loguniform(1e-4, 1e-2)"]
    smoke_sets = {"views.view.size": 16, "backbone.kwargs.channels": [8, 16, 32, 64],
                  "backbone.kwargs.stem_width": 8, "hparams.teacher": "resnet18", "hparams.teacher_weights": RANDOM,
                  "hparams.teacher_args": {"channels": [8, 16, 32, 64], "stem_width": 8}, "hparams.queue_size": 256}
    presets = {
        # The demo's student (SimCLR's `demo` network: a CIFAR-style ResNet of width 16, one block
        # per stage) at 32 px; the teacher is the user's (hparams.teacher_weights). Uncropped
        # views, the higher LR and the sharper teacher measured best on MNIST-M (docs/BENCHMARKS.md,
        # "Distillation on the MNIST-M sample").
        "tiny": {
            "backbone": {"name": "resnet18", "small_images": True,
                         "kwargs": {"channels": [16, 32, 64, 128], "stem_width": 16, "layers": [1, 1, 1, 1]}},
            "hparams": {"queue_size": 4096, "teacher_temperature": 0.03, "student_temperature": 0.1},
            "views": {"view.size": 32, "view.scale": [1.0, 1.0], "view.ratio": [1.0, 1.0]},
            "data": {"canvas_size": 32},
            "optim": {"epochs": 15, "batch_size": 64, "base_lr": 3e-2, "lr_scaling": "linear",
                      "warmup_epochs": 1, "weight_decay": 1e-4, "betas": [0.9, 0.999]},
        },
        # LightlyTrain's default: DINOv2's ViT-B/14 (timm's `vit_base_patch14_dinov2`, its folder on
        # disk) into a ResNet-50 at 224 px; the ViT takes 224 px (16 x 16 patches) by interpolating
        # its position embeddings.
        "vitb14": {
            "backbone": {"name": "resnet50"},
            "hparams": {"teacher": "vit_base_patch14_dinov2", "teacher_args": {"dynamic_img_size": True},
                        "queue_size": 16384},
            "views": {"view.size": 224},
            "data": {"canvas_size": 256},
            "optim": {"epochs": 100, "batch_size": 1024, "base_lr": 1e-3, "lr_scaling": "linear",
                      "warmup_epochs": 5, "weight_decay": 0.02, "betas": [0.9, 0.999]},
        },
    }

    @classmethod
    def default_recipe(cls, size: int = 224) -> ViewRecipe:
        return distill_recipe(size)

    @classmethod
    def pinned(cls, hparams: DistillHyperparameters, recipe: ViewRecipe) -> DistillHyperparameters:
        """Builds the teacher once: refuses weights that do not fit, and a teacher that cannot take
        the run's views (one forward of a view-sized batch), then records its hash and width."""
        teacher, sha, cfg = build_teacher(hparams)
        size = hparams.teacher_image_size or recipe.views[recipe.names[0]].size
        try:
            with torch.inference_mode():
                width = teacher(torch.zeros(1, 3, size, size)).shape[-1]
        except Exception as error:  # noqa: BLE001  (timm asserts on a size it cannot take)
            native = cfg.get("input_size", [3, "?", "?"])[-1]
            raise WeightsError(f"hparams.teacher_image_size: the teacher ({hparams.teacher or 'from config.json'}) "
                               f"cannot take {size} px views ({str(error).splitlines()[0][:160]}); set "
                               f"hparams.teacher_image_size={native} (its own), or hparams.teacher_args with "
                               "dynamic_img_size=true for a ViT") from None
        for key, found in (("teacher_sha256", sha), ("teacher_dim", width)):
            if getattr(hparams, key) and getattr(hparams, key) != found:
                raise WeightsError(f"hparams.{key}={getattr(hparams, key)!r}: {TEACHER} {hparams.teacher_weights} "
                                   f"gives {found!r} (a different teacher than the run was started with)")
        return replace(hparams, teacher_sha256=sha, teacher_dim=width)

    def __init__(self, backbone, hparams: DistillHyperparameters, recipe):
        super().__init__(backbone, hparams, recipe)
        if len(recipe.names) != 1 or recipe.views[recipe.names[0]].copies != 1:
            raise ValueError("views: distillation shows teacher and student one view of each image (one kind, 1 copy)")
        if not hparams.teacher_dim:
            raise ValueError("hparams.teacher_dim=0: the teacher is not pinned (pipelines.config.pinned_config reads "
                             "it before a run starts)")
        self.head = nn.Linear(self.backbone.num_features, hparams.teacher_dim)
        self.queue = TeacherQueue(hparams.queue_size, hparams.teacher_dim)
        self.criterion = QueueDistillationLoss(hparams.teacher_temperature, hparams.student_temperature)
        # Outside the module tree (object.__setattr__): no DDP, no optimizer, no state_dict, no .to().
        object.__setattr__(self, "_teacher", None)
        self._pending: list[torch.Tensor] = []

    def teacher_on(self, device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        """The frozen teacher on `device` (built at the first step, hash checked against the pinned
        one), and the per-channel scale and shift that turn the views' normalisation into its own."""
        if self._teacher is None:
            teacher, sha, cfg = build_teacher(self.hparams)
            if sha != self.hparams.teacher_sha256:
                raise WeightsError(f"{TEACHER} {self.hparams.teacher_weights}: its SHA-256 here is {sha[:12]}..., "
                                   f"the run pinned {self.hparams.teacher_sha256[:12]}... (the file changed, or this "
                                   "node sees another)")
            teacher = (teacher.to(device, dtype=torch.bfloat16, memory_format=torch.channels_last)
                       if device.type == "cuda" else teacher.to(device))
            mean, std = (torch.tensor(cfg.get(key, default), device=device).view(1, 3, 1, 1)
                         for key, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)))
            view_mean, view_std = (torch.tensor(v, device=device).view(1, 3, 1, 1)
                                   for v in (self.recipe.mean, self.recipe.std))
            # x_teacher = (x_view * view_std + view_mean - mean) / std
            object.__setattr__(self, "_teacher", (teacher, view_std / std, (view_mean - mean) / std))
        return self._teacher

    def teacher_embeddings(self, views: torch.Tensor) -> torch.Tensor:
        """`views: (n, 3, s, s)` normalised as the student's -> the teacher's `(n, teacher_dim)`
        float32 embeddings, without autograd (inference mode; bf16 on a GPU)."""
        teacher, scale, shift = self.teacher_on(views.device)
        images = views.float() * scale + shift
        size = self.hparams.teacher_image_size
        if size and size != images.shape[-1]:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if views.device.type == "cuda":
            images = images.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            embeddings = teacher(images)
        return embeddings.float().clone()  # a normal tensor again, usable beside autograd

    def step_input(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """[the view `(n, 3, s, s)`, the teacher's embeddings of that same view `(n, teacher_dim)`]:
        the teacher runs here, outside the DDP-wrapped (and compiled) student."""
        (view,) = self.views(batch["image"])
        return [view, self.teacher_embeddings(view)]

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`[view (n, 3, s, s), teacher (n, d)]` -> (the KL over the pseudo-classifier of this
        batch's and the queue's teacher embeddings, {"embeddings": the student's features})."""
        view, teacher = views
        features = self.backbone(view)
        current = F.normalize(teacher.float(), dim=1)
        classifier = torch.cat([current, self.queue.contents()])
        loss = self.criterion(self.head(features), current, classifier)
        self._pending.append(current)
        return loss, {"embeddings": features.detach()}

    def make_optimizer(self, groups, lr, optim):
        """AdamW: the student learns a regression onto fixed targets, which needs no LARS."""
        return adamw(groups, lr, optim.betas)

    @torch.no_grad()
    def after_step(self, step: float, total_steps: int) -> None:
        """The step's teacher embeddings, from every worker, join the queue (after the loss, so a
        batch is not in the classifier twice)."""
        if self._pending:
            self.queue.push(gather_with_grad(torch.cat(self._pending)))
            self._pending = []
