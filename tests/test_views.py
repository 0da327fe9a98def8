import pytest
import torch

from methods import METHODS
from methods.dino import dino_recipe
from methods.mae import mae_recipe
from methods.simclr import simclr_recipe
from methods.views import ViewMaker

RECIPE_CASES = {
    "simclr": (simclr_recipe(24), [(24, 24)] * 2),
    "dino": (dino_recipe(24, 12, 3), [(24, 24)] * 2 + [(12, 12)] * 3),
    "mae": (mae_recipe(24), [(24, 24)]),
}


def canvases(n=8, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("method", sorted(RECIPE_CASES))
def test_recipe_shapes_dtypes_ranges(method):
    recipe, sizes = RECIPE_CASES[method]
    maker = ViewMaker(recipe)
    views = maker(canvases())
    assert len(views) == len(recipe.names) == len(sizes)
    for view, size in zip(views, sizes):
        assert view.shape == (8, 3, *size) and view.dtype == torch.float32
        assert torch.isfinite(view).all()
        shown = maker.denormalize(view)
        assert shown.min() >= 0 and shown.max() <= 1
        # normalised with ImageNet statistics: [0, 1] maps into about [-2.2, 2.7]
        assert view.min() >= -2.2 and view.max() <= 2.7


@pytest.mark.parametrize("method", sorted(METHODS))
def test_random_parameters_differ_per_sample(method):
    recipe = METHODS[method].default_recipe(24)
    same = canvases(1).repeat(8, 1, 1, 1)
    torch.manual_seed(0)
    view = ViewMaker(recipe)(same)[0]
    distinct = {tuple(v.flatten()[:64].tolist()) for v in view}
    assert len(distinct) > 1


@pytest.mark.parametrize("method", sorted(METHODS))
def test_seeded_views_are_reproducible(method):
    recipe = METHODS[method].default_recipe(24)
    maker, batch = ViewMaker(recipe), canvases()
    torch.manual_seed(7)
    first = maker(batch)
    torch.manual_seed(7)
    again = maker(batch)
    torch.manual_seed(8)
    other = maker(batch)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_views_stay_on_the_batch_device():
    batch = canvases()
    assert all(v.device == batch.device for v in ViewMaker(simclr_recipe(16))(batch))


def test_overrides_reach_every_field_and_are_validated():
    recipe = dino_recipe(24, 12, 8).with_overrides({"local.copies": 2, "global1.blur": 0.0, "std": [0.5] * 3})
    assert recipe.names == ["global1", "global2", "local", "local"]
    assert recipe.views["global1"].blur == 0.0 and recipe.std == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="views.local.scale"):
        dino_recipe().with_overrides({"local.scale": [0.5, 0.1]})
    with pytest.raises(ValueError, match="views.view.nope: unknown"):
        simclr_recipe().with_overrides({"view.nope": 1})
    with pytest.raises(ValueError, match="views.view.blur"):
        simclr_recipe().with_overrides({"view.blur": 1.5})


def test_wrong_input_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        ViewMaker(mae_recipe(16))(torch.zeros(2, 3, 16, 16))


def test_mix_blends_each_view_with_another_image_of_the_batch():
    """Only crop-free ops, so the mixture can be checked pixel by pixel against the inputs."""
    recipe = simclr_recipe(16).with_overrides({"view.scale": [1.0, 1.0], "view.ratio": [1.0, 1.0], "view.flip": 0.0,
                                               "view.jitter_p": 0.0, "view.grayscale": 0.0, "view.blur": 0.0,
                                               "view.mix": 0.4})
    maker = ViewMaker(recipe)
    batch = canvases(16, 16)
    plain = batch.permute(0, 3, 1, 2).float() / 255
    torch.manual_seed(0)
    first, second = (maker.denormalize(v) for v in maker(batch))
    for view in (first, second):
        # each row is (1 - w) * own + w * partner, with w in [0, 0.4] and some partner of the batch
        for row in range(16):
            best = []
            for partner in range(16):
                towards = plain[partner] - plain[row]
                weight = ((view[row] - plain[row]) * towards).sum() / towards.pow(2).sum().clamp_min(1e-12)
                best.append(((view[row] - plain[row] - weight * towards).abs().max().item(), weight.item()))
            error, weight = min(best)
            assert error < 2e-3 and -1e-3 <= weight <= 0.4 + 1e-3
    assert not torch.allclose(first, second)  # each view draws its own partners and weights
    assert (first - plain).abs().amax(dim=(1, 2, 3)).gt(0.01).sum() >= 12  # most rows are mixed
    with pytest.raises(ValueError, match="views.view.mix=0.7"):
        simclr_recipe(16).with_overrides({"view.mix": 0.7})


@pytest.mark.parametrize("batch_copies", [True, False])
def test_every_copy_of_every_image_draws_its_own_parameters(batch_copies):
    """DINO's local crops, made in one batched call or one call per copy: 8 copies of one image,
    4 local views each, are 32 different crops (Kornia draws per sample; a batched call must not
    share a draw between the copies of an image)."""
    recipe = dino_recipe(24, 12, 4)
    same = canvases(1).repeat(8, 1, 1, 1)
    torch.manual_seed(0)
    local = ViewMaker(recipe, batch_copies=batch_copies)(same)[2:]
    assert len(local) == 4 and all(view.shape == (8, 3, 12, 12) for view in local)
    crops = {tuple(view[i].flatten().tolist()) for view in local for i in range(8)}
    assert len(crops) == 32


def test_batched_copies_are_the_per_copy_distribution():
    """The two paths draw the same distribution: over many copies of one image, the mean and the
    spread of the local crops agree (what differs is only which draw lands in which copy)."""
    recipe = dino_recipe(24, 12, 8)
    same = canvases(1).repeat(256, 1, 1, 1)
    stats = {}
    for batch_copies in (True, False):
        torch.manual_seed(0)
        local = torch.stack(ViewMaker(recipe, batch_copies=batch_copies)(same)[2:])  # (8, 256, 3, 12, 12)
        per_crop = local.mean(dim=(2, 3, 4))
        stats[batch_copies] = (per_crop.mean().item(), per_crop.std().item())
    (mean_b, std_b), (mean_p, std_p) = stats[True], stats[False]
    assert abs(mean_b - mean_p) < 0.05 and abs(std_b - std_p) < 0.1 * std_p


def test_copies_are_batched_on_cpu_only_for_small_views(monkeypatch):
    from methods import views as views_module

    calls = []
    make = views_module._ViewKind.make
    monkeypatch.setattr(views_module._ViewKind, "make",
                        lambda self, images, copies, batched: calls.append((copies, batched)) or make(self, images, copies, batched))
    ViewMaker(dino_recipe(96, 24, 4))(canvases(2, 96))
    assert calls == [(1, False), (1, False), (4, True)]  # 96 px globals per copy, 24 px locals batched
