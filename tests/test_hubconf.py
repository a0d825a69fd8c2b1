"""hubconf.py: torch.hub.load from this checkout (source="local") builds the variant and loads a checkpoint."""

from pathlib import Path

import torch

from swin.models import swin_t

REPO = Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=4, num_classes=3)


def test_hub_load_local_with_weights(tmp_path):
    torch.manual_seed(0)
    reference = swin_t(**TINY).eval()
    path = tmp_path / "tiny.pth"
    torch.save({"model": reference.state_dict()}, path)  # the official release's wrapper
    model = torch.hub.load(str(REPO), "swin_t", source="local", weights=str(path), **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    fresh = torch.hub.load(str(REPO), "swin_t", source="local", weights=None, **TINY)
    assert not torch.equal(fresh.head.weight, reference.head.weight)
