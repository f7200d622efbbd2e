"""ResNets with the norm injected: every model × every norm, parameter counts, init, errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from normlab.models import MODELS, build_model
from normlab.models.blocks import ResidualBlock
from normlab.norms import NORMS, REGISTRY, FilterResponseNorm2d, PerWorkerBatchNorm2d, WSConv2d, is_norm

CIFAR_HE = [f"resnet{d}" for d in (8, 20, 32, 44, 56, 110)]
TORCHVISION_TRUNK = ["resnet18", "resnet34", "resnet50", "imagenet_resnet18", "imagenet_resnet34",
                     "imagenet_resnet50", "imagenet_resnet101"]
SLOW_MODELS = {"resnet34", "resnet50", "imagenet_resnet34", "imagenet_resnet50", "imagenet_resnet101"}


def norm_for(model_name: str, norm: str) -> dict:
    """The norm as a config node; 8 groups where the He CIFAR nets' 16 channels cannot take 32."""
    node = {"name": norm}
    if "groups" in REGISTRY[norm].options and model_name in CIFAR_HE:
        node["groups"] = 8
    return node


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if is_norm(m)]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("model_name", [
    pytest.param(m, marks=pytest.mark.slow) if m in SLOW_MODELS else m for m in MODELS
])
def test_every_model_builds_and_trains_with_every_norm(model_name, norm):
    torch.manual_seed(0)
    model = build_model(model_name, 10, norm_for(model_name, norm), workers=2)
    size = 64 if model_name.startswith("imagenet_") else 32  # keep the last stage above 1×1 for instance norm
    x = torch.randn(4, 3, size, size)
    out = model(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    assert model(x[:1]).shape == (1, 10)


@pytest.mark.parametrize("model_name", CIFAR_HE + ["resnet18"])
def test_cifar_models_take_8x8_grayscale_digits(model_name):
    model = build_model(model_name, 10, "bn", in_chans=1)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def he_cifar_param_count(depth: int, num_classes: int = 10, shortcut: str = "A") -> int:
    """He et al. 2016's CIFAR ResNet with BN, counted by hand: 3×3 convs, 2 parameters per BN channel."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16  # stem
    in_ch = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += in_ch * width * 9 + 2 * width + width * width * 9 + 2 * width
            if shortcut == "B" and in_ch != width:
                total += in_ch * width + 2 * width
            in_ch = width
    return total + 64 * num_classes + num_classes


@pytest.mark.parametrize("depth, millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)])
def test_he_cifar_resnet_parameter_counts(depth, millions):
    model = build_model(f"resnet{depth}", 10, "bn")
    assert count(model) == he_cifar_param_count(depth)
    assert round(count(model) / 1e6, 2 if depth < 110 else 1) == millions


def test_pinned_parameter_counts():
    assert count(build_model("resnet20", 10, "bn")) == 269_722
    assert count(build_model("resnet56", 10, "bn")) == 853_018
    assert count(build_model("resnet20", 10, "bn", shortcut="B")) == he_cifar_param_count(20, shortcut="B")
    assert count(build_model("resnet18", 10, "bn")) == 11_173_962
    assert count(build_model("imagenet_resnet50", 1000, "bn")) == 25_557_032
    assert count(build_model("imagenet_resnet50", 1000, "gn")) == 25_557_032


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_imagenet_resnets_have_torchvisions_parameter_count(depth):
    reference = count(getattr(torchvision.models, f"resnet{depth}")())
    assert count(build_model(f"imagenet_resnet{depth}", 1000, "bn")) == reference
    assert count(build_model(f"imagenet_resnet{depth}", 1000, "gn")) == reference


def test_cifar_resnet18_is_torchvisions_with_a_3x3_stem():
    reference = count(torchvision.models.resnet18(num_classes=10)) - 64 * 3 * 7 * 7 + 64 * 3 * 3 * 3
    assert count(build_model("resnet18", 10, "bn")) == reference


@pytest.mark.parametrize("depth", [18, pytest.param(50, marks=pytest.mark.slow)])
def test_imagenet_bn_model_loads_torchvision_weights_and_computes_the_same(depth):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, f"resnet{depth}")().eval()
    model = build_model(f"imagenet_resnet{depth}", 1000, "bn").eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), reference(x))


@pytest.mark.parametrize("model_name", ["resnet20", "imagenet_resnet50"])
@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_layer_comes_from_the_registry(model_name, norm):
    model = build_model(model_name, 10, norm_for(model_name, norm), workers=4, shortcut="B") \
        if model_name == "resnet20" else build_model(model_name, 10, norm_for(model_name, norm), workers=4)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = norm_layers(model)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    if norm == "none":
        assert norms == []
        return
    assert len(norms) == len(convs)  # one norm after every conv, shortcut projections included
    assert any(".downsample." in name for name, _ in norms)
    for _, m in norms:
        if REGISTRY[norm].batch_dependent:
            assert m.workers == 4
        channels = getattr(m, "num_features", None) or getattr(m, "num_channels")
        assert channels in {16, 32, 64, 128, 256, 512, 1024, 2048}
    if norm == "bn":
        assert all(isinstance(m, PerWorkerBatchNorm2d) for _, m in norms)
    assert all(isinstance(m, WSConv2d) for m in convs) == (norm == "gn_ws")


def test_norm_channel_counts_follow_the_conv_before_them():
    model = build_model("imagenet_resnet50", 10, "gn")
    assert model.layer1[0].bn3.num_channels == 256 and model.layer1[0].downsample[1].num_channels == 256
    assert model.layer4[2].bn2.num_channels == 512 and model.layer4[2].bn2.num_groups == 32


def test_norm_activation_layers_replace_the_relu_after_them():
    model = build_model("resnet20", 10, "frn")
    block = model.layer1[0]
    assert isinstance(block.bn1, FilterResponseNorm2d) and block.bn1.apply_act
    assert isinstance(block.act1, nn.Identity) and isinstance(model.relu, nn.Identity)
    assert not block.bn2.apply_act and isinstance(block.act2, nn.ReLU)  # ReLU after the addition stays
    tv = build_model("imagenet_resnet50", 10, "evonorm_s0")
    assert tv.bn1.apply_act and isinstance(tv.relu, nn.Identity)
    assert not tv.layer1[0].downsample[1].apply_act and not tv.layer1[0].bn3.apply_act


def test_batch_independent_norms_do_not_take_workers():
    model = build_model("resnet20", 10, {"name": "gn", "groups": 4}, workers=8)
    assert not any(hasattr(m, "workers") for m in model.modules())


@pytest.mark.parametrize("model_name", ["resnet20", "resnet18", "imagenet_resnet50"])
@pytest.mark.parametrize("norm", ["bn", "gn", "frn", "none"])
def test_init_he_convs_unit_gamma_and_zero_gamma_last(model_name, norm):
    torch.manual_seed(0)
    model = build_model(model_name, 10, norm_for(model_name, norm))
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    last = {id(b.last_norm) for b in blocks}
    assert blocks
    for _, m in norm_layers(model):
        expected = 0.0 if id(m) in last else 1.0
        assert torch.all(m.weight == expected) and torch.all(m.bias == 0)
    big = max((m for m in model.modules() if isinstance(m, nn.Conv2d)), key=lambda m: m.weight.numel())
    fan_out = big.out_channels * big.kernel_size[0] * big.kernel_size[1]
    assert big.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.05)

    plain = build_model(model_name, 10, norm_for(model_name, norm), zero_init_last=False)
    assert all(torch.all(m.weight == 1) for _, m in norm_layers(plain))


def test_zero_init_last_makes_each_block_start_as_the_identity_plus_relu():
    model = build_model("resnet20", 10, "bn").eval()
    block = model.layer1[1]
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(block(x), torch.relu(x))


def test_group_norm_that_does_not_fit_names_the_layer():
    with pytest.raises(ValueError) as err:
        build_model("resnet20", 10, "gn")
    message = str(err.value)
    assert message.startswith("resnet20: the norm does not fit 7 layer(s)")  # the 16-channel stage and stem
    assert "layer1.0.bn2" in message and "groups=32 does not divide num_channels=16" in message


def test_group_size_that_does_not_fit_names_the_layer():
    with pytest.raises(ValueError, match=r"layer3\.0\.bn1.*gn: group_size=48 does not divide num_channels=64"):
        build_model("resnet20", 10, {"name": "gn", "group_size": 48})


@pytest.mark.parametrize("call, message", [
    (lambda: build_model("resnet19", 10, "bn"), r"unknown model 'resnet19'; valid models: resnet8, resnet20"),
    (lambda: build_model("resnet20", 10, "bm"), r"unknown norm 'bm'; valid norms: bn, gn"),
    (lambda: build_model("resnet20", 10, "bn", widht=32), r"resnet20: unknown option\(s\) widht=32; "
                                                          r"resnet20 takes: in_chans, shortcut, width"),
    (lambda: build_model("resnet20", 10, "bn", shortcut="C"), r"shortcut='C' is invalid; valid shortcuts: 'A'"),
    (lambda: build_model("resnet20", 10, "bn", workers=0), r"bn: workers=0 is invalid"),
    (lambda: build_model("resnet20", 10, {"name": "gn", "groups": 4, "eps": -1}), r"gn: eps=-1 is invalid"),
    (lambda: build_model("resnet20", 10, {"groups": 4}), r"norm=\{'groups': 4\} is invalid; give a registry name"),
    (lambda: build_model("resnet20", 10, {"name": "bn", "workers": 2}, workers=8),
     r"bn: workers=2 in the norm options disagrees with workers=8 given to the model"),
])
def test_bad_model_input_raises_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_channels_last_input_gives_the_same_output():
    torch.manual_seed(0)
    model = build_model("resnet20", 10, "bn", workers=2)
    x = torch.randn(4, 3, 32, 32)
    y = model(x)
    y_cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y_cl, y, atol=1e-4, rtol=1e-4)
