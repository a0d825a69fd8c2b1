"""RetinaNet and FCOS on Swin + FPN P3-P7: the levels they read, their anchors, and one training step."""

import pytest
import torch
from torchvision.models.detection import FCOS, RetinaNet

from swin.models import build_swin
from swin.models.singlestage import build_fcos, build_retinanet

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4)
SMALL = dict(fpn_channels=32, min_size=64, max_size=96, train_resize=False)


def backbone(out_indices=(1, 2, 3)):
    return build_swin("custom", **TINY, num_classes=None, out_indices=out_indices)


def test_retinanet_reads_p3_to_p7_with_p6_from_c5():
    model = build_retinanet(backbone(), 3, **SMALL)
    assert isinstance(model, RetinaNet)
    x = torch.rand(1, 3, 128, 128)
    levels = model.backbone(x)
    assert list(levels) == ["0", "1", "2", "p6", "p7"]
    assert [v.shape[-1] for v in levels.values()] == [128 // s for s in (8, 16, 32, 64, 128)]
    assert model.backbone.fpn.extra_blocks.p6.in_channels == 16 * 8  # C5, as mmdet's add_extra_convs="on_input"
    sizes = model.anchor_generator.sizes
    assert len(sizes) == 5 and sizes[0] == (32, 40, 50)  # 3 scales per octave
    assert model.head.classification_head.num_classes == 3  # labels 1..3 shifted to torchvision's 0..2


def test_fcos_points_follow_the_strides_and_bad_setups_are_refused():
    model = build_fcos(backbone(), 3, **SMALL)
    assert isinstance(model, FCOS) and model.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    with pytest.raises(ValueError, match="out_indices"):
        build_fcos(backbone((0, 1, 2, 3)), 3, **SMALL)
    with pytest.raises(ValueError, match="P3..P7"):
        build_retinanet(backbone(), 3, anchor_sizes=(32, 64), **SMALL)


@pytest.mark.parametrize("builder", [build_retinanet, build_fcos])
def test_a_training_step_reaches_the_backbone_and_eval_gives_boxes(builder):
    model = builder(backbone(), 3, anchor_sizes=(8, 16, 32, 64, 128), **SMALL).train()
    images = [torch.rand(3, 64, 96), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[10.0, 8, 50, 40]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]  # fmt: skip
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.backbone.body.patch_embed.proj.weight.grad.abs().sum() > 0
    model.eval().score_thresh = 0.0
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4 and set(out[0]["labels"].tolist()) == {1, 2, 3}
