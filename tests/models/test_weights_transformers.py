"""load_pretrained reads .safetensors files and the Hugging Face transformers Swin layout (a real model of that
library, random weights, tiny config): the same logits."""

import pytest
import torch
from safetensors.torch import save_file

from swin.models import CheckpointError, SwinTransformer, load_pretrained

transformers = pytest.importorskip("transformers")


def test_transformers_swin_safetensors_gives_the_same_logits(tmp_path):
    torch.manual_seed(0)
    config = transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=8, depths=[1, 2], num_heads=[1, 2], window_size=4, num_labels=3,
        drop_path_rate=0.0,
    )  # fmt: skip
    peer = transformers.SwinForImageClassification(config).eval()
    with torch.no_grad():  # non-trivial tables and norms
        for name, p in peer.named_parameters():
            if "relative_position_bias_table" in name or "norm" in name:
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.1)
    peer.save_pretrained(tmp_path / "hub")  # the file as published on the hub
    memory = tmp_path / "memory.safetensors"  # the library's in-memory names
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, str(memory))
    x = torch.randn(2, 3, 32, 32)
    for path in (tmp_path / "hub" / "model.safetensors", memory):
        ours = SwinTransformer(embed_dim=8, depths=(1, 2), num_heads=(1, 2), window_size=4, num_classes=3).eval()
        load_pretrained(ours, path, strict=True)
        with torch.no_grad():
            assert torch.allclose(ours(x), peer(pixel_values=x).logits, atol=1e-5), path


def test_safetensors_with_wrong_shapes_names_the_key(tmp_path):
    model = SwinTransformer(embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=4, num_classes=3)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["layers.0.blocks.0.mlp.fc1.weight"] = torch.zeros(16, 8)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"layers\.0\.blocks\.0\.mlp\.fc1\.weight.*\(16, 8\).*\(32, 8\)"):
        load_pretrained(model, path)
