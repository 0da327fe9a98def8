"""The step options `train.compile` and `train.channels_last` compute what the plain step does
(issue 16, item 2)."""

import pytest
import torch

from pipelines.config import build_method
from pipelines.train.worker import as_step_input, wrap_model
from tests.helpers.runs import tiny_config


def compare_with_plain_step(method_name: str, compile: bool = False, channels_last: bool = False,
                            dtype: torch.dtype = torch.float32, rtol: float = 1e-3) -> None:
    """Same weights, same views: loss and every gradient agree within `rtol`, and the wrapped
    model trains the method's own parameters (what checkpoints save)."""
    config = tiny_config(method_name)
    torch.manual_seed(0)
    plain = build_method(config).to(dtype)
    method = build_method(config).to(dtype)
    method.load_state_dict(plain.state_dict())
    model = wrap_model(method, world=1, device=torch.device("cpu"), compile=compile, channels_last=channels_last)
    canvases = torch.randint(0, 256, (16, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    views = [view.to(dtype) for view in plain.views(canvases)]
    torch.manual_seed(3)  # MAE draws its masks: the same draws on both sides
    loss_plain, _ = plain(views)
    loss_plain.backward()
    torch.manual_seed(3)
    loss, _ = model(as_step_input(views, channels_last))
    loss.backward()
    assert torch.allclose(loss, loss_plain, rtol=rtol / 10, atol=1e-5), (loss.item(), loss_plain.item())
    for (name, p_plain), p in zip(plain.named_parameters(), method.parameters()):
        if p_plain.grad is None:
            assert p.grad is None, name
            continue
        assert torch.allclose(p.grad, p_plain.grad, rtol=rtol, atol=rtol / 100), name


@pytest.mark.slow  # TorchInductor compiles C++ kernels: 30-60 s on 2 cores the first time
@pytest.mark.parametrize("method_name", ["simclr", "mae"])
def test_a_compiled_step_equals_the_plain_step(method_name):
    from torch._inductor import config as inductor

    # Inductor draws random numbers its own way; eager's draws here, so MAE masks the same patches.
    with inductor.patch(fallback_random=True):
        compare_with_plain_step(method_name, compile=True)


@pytest.mark.parametrize("method_name", ["simclr", "byol", "mae"])
def test_a_channels_last_step_equals_the_plain_step(method_name):
    # In float64: a small contrastive batch's gradients are ill-conditioned enough that float32
    # sums in another order differ by ~3 % (measured); float64 shows the two paths compute the same.
    compare_with_plain_step(method_name, channels_last=True, dtype=torch.float64, rtol=1e-9)
    config = tiny_config(method_name)
    method = build_method(config)
    wrap_model(method, world=1, device=torch.device("cpu"), channels_last=True)
    convolutions = [p for p in method.parameters() if p.ndim == 4]
    assert convolutions and all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)


def test_step_options_are_booleans_in_the_config():
    for key in ("train.compile", "train.channels_last"):
        with pytest.raises(ValueError, match=key):
            tiny_config(**{key: "yes"})
    assert tiny_config(**{"train.compile": True}).train.compile is True
    assert tiny_config().train.channels_last is True  # on by default: measured to pay for ResNets


@pytest.mark.parametrize("method_name", ["mae", "dino"])
def test_the_fused_adamw_takes_the_steps_of_the_default_one(method_name):
    """MAE and DINO train with `methods.base.adamw` (PyTorch's fused kernel): from the same
    weights and gradients, three steps land where the default AdamW's do."""
    config = tiny_config(method_name)
    torch.manual_seed(0)
    fused_method, plain_method = build_method(config), build_method(config)
    plain_method.load_state_dict(fused_method.state_dict())
    decay = config.optim.weight_decay
    fused = fused_method.make_optimizer(fused_method.param_groups(decay), 1e-3, config.optim)
    plain = torch.optim.AdamW(plain_method.param_groups(decay), lr=1e-3, betas=tuple(config.optim.betas))
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for _ in range(3):
        for p_fused, p_plain in zip(fused_method.parameters(), plain_method.parameters()):
            p_fused.grad = torch.randn_like(p_fused)
            p_plain.grad = p_fused.grad.clone()
        fused.step()
        plain.step()
    for p_fused, p_plain in zip(fused_method.parameters(), plain_method.parameters()):
        assert torch.allclose(p_fused, p_plain, rtol=1e-5, atol=1e-7)
