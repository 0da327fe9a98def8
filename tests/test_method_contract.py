"""The Method contract (methods/base.py) is checked when a class registers, not on a worker: a
method that lacks a piece fails at import with one line naming the class and what is missing."""

import dataclasses

import pytest
import torch

from methods import METHODS
from methods.base import Method, MethodContractError, checked_groups, contract_problems, register, set_weight_decay
from methods.simclr import SimCLR
from methods.views import ViewRecipe, ViewSpec


@dataclasses.dataclass
class Nothing:
    def validate(self) -> None:
        pass


def method_class(**overrides) -> type:
    """A small method that keeps the contract, with `overrides` as its class body's changes."""
    body = {
        "__module__": __name__, "name": "tiny_test_method", "Hyperparameters": Nothing, "presets": {"tiny": {}},
        "default_recipe": classmethod(lambda cls, size=224: ViewRecipe({"view": ViewSpec(size=size)})),
        "forward": lambda self, views: (views[0].mean(), {"embeddings": views[0].flatten(1)}),
        "make_optimizer": lambda self, groups, lr, optim: torch.optim.SGD(groups, lr=lr),
        **overrides,
    }
    return type("Made", (Method,), {key: value for key, value in body.items() if value is not ...})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_keeps_the_contract(name):
    assert contract_problems(METHODS[name]) == []


def test_a_method_that_keeps_the_contract_registers():
    cls = method_class()
    try:
        assert register(cls) is cls and METHODS["tiny_test_method"] is cls
    finally:
        METHODS.pop("tiny_test_method", None)


@pytest.mark.parametrize("overrides, says", [
    ({"make_optimizer": ...}, "does not implement make_optimizer"),
    ({"forward": ..., "default_recipe": ...}, "does not implement default_recipe, forward"),
    ({"name": "Bad Name"}, "must be a lowercase identifier"),
    ({"name": "simclr"}, "name 'simclr' is already methods.simclr.SimCLR"),
    ({"Hyperparameters": dict}, "Hyperparameters must be a dataclass with validate()"),
    ({"lr_scaling": "cubic"}, "lr_scaling='cubic' must be linear or sqrt"),
    ({"presets": {"imagenet": {}}}, "presets must hold `tiny`"),
    ({"default_preset": "best"}, "default_preset='best' is not one of its presets"),
    ({"capabilities": frozenset({"reconstruct"})}, "capability 'reconstruct' needs masking, patch_mask, reconstruct"),
    ({"capabilities": frozenset({"telepathy"})}, "capability 'telepathy' is unknown"),
    ({"sync_bn": True}, "sync_bn is read from the hyperparameters"),
])
def test_a_broken_method_fails_to_register_in_one_line(overrides, says):
    with pytest.raises(MethodContractError) as raised:
        register(method_class(**overrides))
    message = str(raised.value)
    assert says in message and "\n" not in message and message.startswith(f"{__name__}.Made: ")
    assert "tiny_test_method" not in METHODS


def test_sync_bn_is_the_hyperparameters_field():
    recipe = SimCLR.default_recipe(16)
    small = {"channels": (8, 16, 32, 64), "stem_width": 8}
    from methods.backbone import BackboneConfig

    backbone = BackboneConfig(name="resnet18", small_images=True, kwargs=small)
    assert SimCLR(backbone, SimCLR.Hyperparameters(sync_bn=True), recipe).sync_bn is True
    assert SimCLR(backbone, SimCLR.Hyperparameters(), recipe).sync_bn is False


def test_optimizer_groups_carry_the_tag_weight_decay_schedules_rely_on():
    layer = torch.nn.Linear(3, 2)
    groups = checked_groups(Method.param_groups(layer, 0.05))
    assert [g["group"] for g in groups] == ["decay", "no_decay"]
    with pytest.raises(MethodContractError, match=r"param_groups\(\)\[0\] must hold params and a group tag"):
        checked_groups([{"params": list(layer.parameters()), "weight_decay": 0.05}])
    optimizer = torch.optim.AdamW(groups, lr=0.1)
    set_weight_decay(optimizer, 0.4)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.4, 0.0]  # biases keep none
