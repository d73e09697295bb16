"""Encoder construction and `--weights` loading from a local file (never a download)."""
import pytest
import torch
import torchvision

from fastsynth.models import build_encoder


def test_weights_load_from_local_state_dict(tmp_path):
    torch.manual_seed(3)
    src = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    enc = build_encoder("resnet18", str(path))
    torch.testing.assert_close(enc.net.conv1.weight, src.conv1.weight)
    torch.testing.assert_close(enc.net.layer4[1].bn2.running_var, src.layer4[1].bn2.running_var)
    x = torch.randn(2, 3, 32, 32)
    src.fc = torch.nn.Identity()
    src.eval(), enc.eval()
    torch.testing.assert_close(enc(x), src(x))


def test_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_encoder("resnet18", str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable"):
        build_encoder("resnet18", str(bad))
    r50 = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), r50)
    with pytest.raises(ValueError, match="does not match resnet18"):
        build_encoder("resnet18", str(r50))
    with pytest.raises(ValueError, match="choose one of"):
        build_encoder("vgg16")
