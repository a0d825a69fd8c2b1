"""Swin + FPN in torchvision's Mask R-CNN / Faster R-CNN: levels, sizes, resizing, parameter count."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import FasterRCNN, MaskRCNN

from swin.models import build_swin
from swin.models.detector import SwinFPN, WeightedRoIHeads, build_detector

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4)
HEADS = dict(fpn_channels=32, representation_size=64, mask_channels=16, min_size=64, max_size=96)


def tiny_backbone():
    return build_swin("custom", **TINY, num_classes=None, out_indices=(0, 1, 2, 3))


def test_fpn_levels_have_the_swin_strides_and_one_width():
    neck = SwinFPN(tiny_backbone(), out_channels=32)
    out = neck(torch.rand(2, 3, 70, 100))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(18, 25), (9, 13), (5, 7), (3, 4), (2, 2)]
    assert {v.shape[1] for v in out.values()} == {32} and neck.out_channels == 32


def test_fpn_needs_the_dense_outputs():
    with pytest.raises(ValueError, match="out_indices"):
        SwinFPN(build_swin("custom", **TINY, num_classes=None))


@pytest.mark.parametrize("variant,params", [("swin_t", 47_798_959), ("swin_s", 69_116_863)])
def test_mask_rcnn_parameter_counts_are_the_readmes(variant, params):
    """The README's exact counts (the paper rounds them to 48M and 69M; mmdet's Swin-T Mask R-CNN: 47.8M)."""
    with torch.device("meta"):
        model = build_detector(build_swin(variant, num_classes=None, out_indices=(0, 1, 2, 3)), num_classes=80)
    count = sum(p.numel() for p in model.parameters())
    assert isinstance(model, MaskRCNN)
    assert count == params
    assert model.roi_heads.box_predictor.cls_score.out_features == 81  # + background


def test_faster_rcnn_without_masks_and_anchor_levels_checked():
    model = build_detector(tiny_backbone(), 3, masks=False, **HEADS)
    assert isinstance(model, FasterRCNN) and not isinstance(model, MaskRCNN)
    with pytest.raises(ValueError, match="one size per pyramid level"):
        build_detector(tiny_backbone(), 3, anchor_sizes=(32, 64), **HEADS)


SMALL = dict(rpn_post_nms_top_n_train=100, box_batch_size_per_image=32)


def sample_batch():
    images = [torch.rand(3, 80, 120), torch.rand(3, 40, 50)]
    masks = torch.zeros(1, 80, 120, dtype=torch.uint8)
    masks[0, 10:40, 20:60] = 1
    targets = [
        {"boxes": torch.tensor([[20.0, 10, 60, 40]]), "labels": torch.tensor([2]), "masks": masks},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
         "masks": torch.zeros(0, 40, 50, dtype=torch.uint8)},
    ]  # fmt: skip
    return images, targets


def test_training_losses_reach_the_backbone_and_keep_the_given_size():
    model = build_detector(tiny_backbone(), 3, train_resize=False, **HEADS, **SMALL).train()
    images, targets = sample_batch()
    resized, _ = model.transform(images, targets)
    assert resized.image_sizes == [(80, 120), (40, 50)]  # train_resize=False: the datamodule resized already
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert model.backbone.body.patch_embed.proj.weight.grad.abs().sum() > 0


def test_evaluation_resizes_and_maps_back_to_the_input_size():
    model = build_detector(tiny_backbone(), 3, box_score_thresh=0.0, **HEADS).eval()
    images = [torch.rand(3, 30, 40), torch.rand(3, 200, 100)]
    resized, _ = model.transform(images)
    assert resized.image_sizes == [(64, 85), (96, 48)]  # shorter side 64, longer at most 96
    with torch.no_grad():
        out = model(images)
    assert [tuple(o["masks"].shape[-2:]) for o in out] == [(30, 40), (200, 100)]
    for o, (h, w) in zip(out, [(30, 40), (200, 100)]):
        assert len(o["boxes"]) > 0
        assert o["boxes"][:, 2].max() <= w and o["boxes"][:, 3].max() <= h


def test_class_weights_weight_only_the_classifier_loss(monkeypatch):
    """The weighted heads' classifier loss is the weighted cross-entropy of the very logits and sampled labels of
    torchvision's heads (same RNG draws); every other loss and the state dict keys are torchvision's."""
    weighted = build_detector(tiny_backbone(), 3, train_resize=False, class_weights=[1.0, 4.0, 0.5], **HEADS, **SMALL)
    plain = build_detector(tiny_backbone(), 3, train_resize=False, **HEADS, **SMALL)
    plain.load_state_dict(weighted.state_dict())  # strict: the weights are not a checkpoint key
    assert isinstance(weighted.roi_heads, WeightedRoIHeads) and type(plain.roi_heads) is not WeightedRoIHeads
    seen = {}
    plain.roi_heads.box_predictor.register_forward_hook(lambda m, args, out: seen.update(logits=out[0]))
    select = plain.roi_heads.select_training_samples

    def keep_labels(*args):
        sampled = select(*args)
        seen["labels"] = torch.cat(sampled[2])
        return sampled

    monkeypatch.setattr(plain.roi_heads, "select_training_samples", keep_labels)
    images, targets = sample_batch()
    torch.manual_seed(0)
    expected = plain.train()(images, targets)
    torch.manual_seed(0)
    losses = weighted.train()(images, targets)
    assert (seen["labels"] == 2).any() and (seen["labels"] == 0).any()
    want = F.cross_entropy(seen["logits"], seen["labels"], weight=torch.tensor([1.0, 1.0, 4.0, 0.5]))
    torch.testing.assert_close(losses["loss_classifier"], want)
    assert abs(losses["loss_classifier"] - expected["loss_classifier"]) > 1e-3  # class 2 weighs 4, not 1
    for name in expected.keys() - {"loss_classifier"}:
        torch.testing.assert_close(losses[name], expected[name], msg=name)
    sum(losses.values()).backward()
    assert weighted.backbone.body.patch_embed.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"class_weights needs 3 non-negative weights .* got 2"):
        build_detector(tiny_backbone(), 3, class_weights=[1.0, 2.0], **HEADS)
