"""Backbones, MLP heads and the final.pt loader (pipeline.models)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from pipeline.models import build_backbone, load_backbone, mlp, uses_cifar_stem
from pipeline.params import BACKBONES

pytestmark = pytest.mark.usefixtures("one_thread")

EXPECTED_FEAT_DIM = {"resnet_small": 8 * 16, "resnet18": 512, "resnet50": 2048}




@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_output_shape_and_feat_dim(name):
    torch.manual_seed(0)
    net, feat_dim = build_backbone(name, image_size=32)
    assert feat_dim == EXPECTED_FEAT_DIM[name]
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, feat_dim)
    assert torch.isfinite(out).all()


def test_resnet_small_width_sets_feat_dim():
    for width in (4, 32):
        net, feat_dim = build_backbone("resnet_small", image_size=16, width=width)
        assert feat_dim == 8 * width
        assert net(torch.randn(2, 3, 16, 16)).shape == (2, 8 * width)


def test_unknown_backbone_names_the_allowed_values():
    with pytest.raises(ValueError, match="resnet18"):
        build_backbone("vit_tiny", image_size=32)


def test_stem_choice_rule():
    assert uses_cifar_stem(32) and uses_cifar_stem(64)
    assert not uses_cifar_stem(96)
    assert uses_cifar_stem(96, True) and not uses_cifar_stem(32, False)


def _last_stage_size(net: nn.Module, size: int) -> int:
    """Spatial size of layer4's output for a size×size input."""
    seen = {}

    def record(module, inputs, output):
        seen["hw"] = output.shape[-1]

    handle = net.layer4.register_forward_hook(record)
    net.eval()
    with torch.no_grad():
        net(torch.randn(1, 3, size, size))
    handle.remove()
    return seen["hw"]


@pytest.mark.parametrize("name", ["resnet18", "resnet_small"])
def test_cifar_and_standard_stem(name):
    cifar, _ = build_backbone(name, image_size=32)                 # auto: CIFAR stem at 32 px
    standard, _ = build_backbone(name, image_size=96)              # auto: standard stem at 96 px
    forced, _ = build_backbone(name, image_size=32, cifar_stem=False)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    for net in (standard, forced):
        assert net.conv1.kernel_size == (7, 7) and net.conv1.stride == (2, 2)
        assert isinstance(net.maxpool, nn.MaxPool2d)
    # CIFAR stem keeps resolution (32 → 4 after three stride-2 stages); the standard one divides it by 4 first
    assert _last_stage_size(cifar, 32) == 4
    assert _last_stage_size(forced, 32) == 1


@pytest.mark.parametrize("name,block,last_bn", [("resnet_small", BasicBlock, "bn2"),
                                                ("resnet18", BasicBlock, "bn2"),
                                                ("resnet50", Bottleneck, "bn3")])
def test_zero_init_residual(name, block, last_bn):
    net, _ = build_backbone(name, image_size=32)
    blocks = [m for m in net.modules() if isinstance(m, block)]
    assert blocks
    for b in blocks:
        assert torch.count_nonzero(getattr(b, last_bn).weight) == 0
        assert torch.count_nonzero(b.bn1.weight) > 0


def test_zero_init_block_is_identity_at_init():
    net, _ = build_backbone("resnet_small", image_size=16, width=8)
    blk = net.layer1[0]                       # stride 1, 8 → 8 channels: no downsample
    assert blk.downsample is None
    x = torch.relu(torch.randn(2, 8, 8, 8))
    torch.testing.assert_close(blk(x), x)


def test_mlp_layout():
    head = mlp(16, 32, 8, num_layers=3, last_bn=True)
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU,
                     nn.Linear, nn.BatchNorm1d]
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(16, 32), (32, 32), (32, 8)]
    assert all(l.bias is None for l in linears)                 # every Linear is followed by BN
    head2 = mlp(16, 32, 8, num_layers=2, last_bn=False)
    assert isinstance(head2[-1], nn.Linear) and head2[-1].bias is not None
    assert head2(torch.randn(4, 16)).shape == (4, 8)
    single = mlp(16, 32, 8, num_layers=1)
    assert len(single) == 1 and single[0].in_features == 16
    with pytest.raises(ValueError, match="num_layers"):
        mlp(16, 32, 8, num_layers=0)


def _final_pt(name="resnet_small", width=8, image_size=16, cifar_stem=True, **extra):
    torch.manual_seed(1)
    net, feat_dim = build_backbone(name, image_size, width, cifar_stem)
    # make the weights distinguishable from a fresh init (zero-init BNs, running stats)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    net.train()
    net(torch.randn(4, 3, image_size, image_size))           # moves BN running statistics
    ckpt = {"backbone": net.state_dict(), "backbone_name": name, "width": width, "cifar_stem": cifar_stem,
            "image_size": image_size, "feat_dim": feat_dim, "method": "simclr", "variant": "augself",
            "lambda": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3, "params_hash": "abc"}
    ckpt.update(extra)
    return net.eval(), ckpt


def test_load_backbone_round_trip(tmp_path):
    net, ckpt = _final_pt()
    path = tmp_path / "final.pt"
    torch.save(ckpt, path)
    x = torch.randn(3, 3, 16, 16)
    for source in (path, str(path), ckpt):
        loaded, meta = load_backbone(source)
        assert not loaded.training
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
        assert "backbone" not in meta
        assert meta["method"] == "simclr" and meta["feat_dim"] == 64 and meta["params_hash"] == "abc"


def test_load_backbone_accepts_ddp_and_compile_prefixes():
    net, ckpt = _final_pt()
    ckpt["backbone"] = {f"module._orig_mod.{k}": v for k, v in ckpt["backbone"].items()}
    loaded, _ = load_backbone(ckpt)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_load_backbone_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_backbone(tmp_path / "nope.pt")


def test_load_backbone_rejects_foreign_files(tmp_path):
    garbage = tmp_path / "final.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="final.pt"):
        load_backbone(garbage)
    resumable = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "optimizer": {}, "step": 3}, resumable)
    with pytest.raises(ValueError, match=r"checkpoint\.pt: not a final\.pt.*backbone_name"):
        load_backbone(resumable)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ValueError, match="tensor.pt: not a final.pt"):
        load_backbone(tensor)


@pytest.mark.parametrize("change,match", [
    ({"width": 16}, "feat_dim 64 does not match"),                    # weights of width 8, meta says 16
    ({"cifar_stem": False}, "do not fit backbone 'resnet_small'"),    # 3×3 stem weights, 7×7 expected
    ({"backbone_name": "resnet18", "feat_dim": 512}, "do not fit backbone 'resnet18'"),
    ({"backbone_name": "vit"}, "unknown backbone_name 'vit'"),
])
def test_load_backbone_mismatch_names_the_file(tmp_path, change, match):
    _, ckpt = _final_pt()
    ckpt.update(change)
    path = tmp_path / "final.pt"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=match) as err:
        load_backbone(path)
    assert str(path) in str(err.value)

