"""Cascade Mask R-CNN: per-stage targets, boxes passed between stages, loss weights, averaged scores, sizes."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from swin.models import build_swin
from swin.models.cascade import STAGE_IOUS, STAGE_STDS, CascadeRCNN, build_cascade

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4)
HEADS = dict(fpn_channels=32, representation_size=64, mask_channels=16, min_size=64, max_size=96, train_resize=False)
SMALL = dict(rpn_post_nms_top_n_train=60, rpn_post_nms_top_n_test=40, box_batch_size_per_image=32)


def tiny_cascade(num_classes=3, **kwargs):
    backbone = build_swin("custom", **TINY, num_classes=None, out_indices=(0, 1, 2, 3))
    return build_cascade(backbone, num_classes, **HEADS, **{**SMALL, **kwargs})


def sample_batch():
    images = [torch.rand(3, 80, 96), torch.rand(3, 64, 64)]
    masks = torch.zeros(2, 80, 96, dtype=torch.uint8)
    masks[0, 10:40, 20:60] = 1
    masks[1, 45:75, 50:90] = 1
    targets = [
        {"boxes": torch.tensor([[20.0, 10, 60, 40], [50, 45, 90, 75]]), "labels": torch.tensor([2, 1]), "masks": masks},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
         "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)},
    ]  # fmt: skip
    return images, targets


def decode(deltas, boxes, stds):
    """The R-CNN delta parametrisation written out (mmdet's DeltaXYWHBBoxCoder, means 0), deltas (N, 4)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    d = deltas * torch.tensor(stds)
    dw, dh = d[:, 2].clamp(max=math.log(1000 / 16)), d[:, 3].clamp(max=math.log(1000 / 16))
    cx, cy, w, h = cx + d[:, 0] * w, cy + d[:, 1] * h, w * dw.exp(), h * dh.exp()
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


def by_label(deltas, labels):
    return deltas.view(len(deltas), -1, 4)[torch.arange(len(deltas)), labels - 1]


def clip(boxes, height, width):
    return torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                        boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], 1)  # fmt: skip


@pytest.mark.parametrize("variant, paper", [("swin_t", 86e6), ("swin_s", 107e6), ("swin_b", 145e6)])
def test_parameter_counts_are_the_papers_within_one_percent(variant, paper):
    with torch.device("meta"):
        model = build_cascade(build_swin(variant, num_classes=None, out_indices=(0, 1, 2, 3)), num_classes=80)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - paper) / paper < 0.01, count
    stages = model.roi_heads.stages
    assert len(stages) == 3 and all(s.box_predictor.bbox_pred.out_features == 4 * 80 for s in stages)  # per class
    assert all(sum(isinstance(m, nn.BatchNorm2d) for m in s.box_head.modules()) == 4 for s in stages)
    assert all(s.mask_head is not None for s in stages)


def test_stages_have_the_official_thresholds_stds_and_sync_batchnorm_under_ddp():
    model = tiny_cascade()
    heads = model.roi_heads
    assert [s.iou_threshold for s in heads.stages] == list(STAGE_IOUS) == [0.5, 0.6, 0.7]
    assert [s.box_coder.weights for s in heads.stages] == [tuple(1 / v for v in s) for s in STAGE_STDS]
    assert heads.stage_loss_weights == (1.0, 0.5, 0.25)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == 12
    assert tiny_cascade(class_agnostic=True).roi_heads.stages[0].box_predictor.bbox_pred.out_features == 4


@pytest.mark.parametrize("stage_index", [0, 1, 2])
def test_each_stage_takes_positives_at_its_own_iou(stage_index):
    heads = tiny_cascade(box_batch_size_per_image=512).roi_heads
    gt = torch.tensor([[20.0, 20, 60, 60]])
    ious = torch.tensor([0.45, 0.55, 0.65, 0.75, 0.95])
    shifts = 40 * (1 - ious) / (1 + ious)  # a 40-px box moved right by d overlaps (40 - d) / (40 + d)
    proposals = gt.repeat(len(ious), 1) + torch.stack([shifts, 0 * shifts, shifts, 0 * shifts], 1)
    samples = heads.sample(heads.stages[stage_index], [proposals], [{"boxes": gt, "labels": torch.tensor([3])}])
    kept = samples["boxes"][0]
    assert len(kept) == len(ious) + 1 and samples["is_gt"][0].sum() == 1  # all kept, the ground truth added
    for box, label, is_gt in zip(kept, samples["labels"][0], samples["is_gt"][0]):
        iou = 1.0 if is_gt else float(ious[torch.isclose(proposals, box).all(1)][0])
        assert int(label) == (3 if iou >= STAGE_IOUS[stage_index] - 1e-6 else 0), (iou, stage_index)


def capture(module, store):
    return module.register_forward_hook(lambda m, args, out: store.append((args, out)))


def test_inference_refines_boxes_through_the_stages_and_averages_the_logits():
    torch.manual_seed(0)
    model = tiny_cascade(box_score_thresh=0.0, box_nms_thresh=1.0, box_detections_per_img=10_000, masks=False).eval()
    for stage in model.roi_heads.stages:  # larger deltas, so that refinement moves the boxes visibly
        nn.init.normal_(stage.box_predictor.bbox_pred.weight, std=0.05)
    pooled, predicted = [], []
    capture(model.roi_heads.box_roi_pool, pooled)
    for stage in model.roi_heads.stages:
        capture(stage.box_predictor, predicted)
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        (out,) = model([image])
    assert len(pooled) == len(predicted) == 3
    boxes = [args[1][0] for args, _ in pooled]
    for i in range(2):
        logits, deltas = predicted[i][1]
        expected = clip(decode(by_label(deltas, logits[:, 1:].argmax(1) + 1), boxes[i], STAGE_STDS[i]), 64, 64)
        torch.testing.assert_close(boxes[i + 1], expected, rtol=1e-4, atol=1e-3)
        assert not torch.allclose(boxes[i + 1], boxes[i], atol=1e-2)
    logits = [out_[0] for _, out_ in predicted]
    averaged = F.softmax(torch.stack(logits).mean(0), -1)[:, 1:].flatten()  # mmdet: mean of logits, then softmax
    torch.testing.assert_close(out["scores"].sort(descending=True).values, averaged.sort(descending=True).values)
    probs = torch.stack([F.softmax(x, -1) for x in logits]).mean(0)[:, 1:].flatten()
    assert not torch.allclose(averaged.sort().values, probs.sort().values)
    model.roi_heads.score_mode = "probs"
    with torch.no_grad():
        (out,) = model([image])
    torch.testing.assert_close(out["scores"].sort(descending=True).values, probs.sort(descending=True).values)
    # the final boxes: the last stage's regression of its input boxes, per class
    last_deltas = predicted[-1][1][1].view(-1, 3, 4)
    final = torch.stack([clip(decode(last_deltas[:, k], boxes[2], STAGE_STDS[2]), 64, 64) for k in range(3)], 1)
    for box, label in zip(out["boxes"][:50], out["labels"][:50]):
        assert torch.isclose(final[:, label - 1], box, atol=1e-3).all(1).any()


def test_training_passes_each_stages_detached_refined_boxes_to_the_next():
    torch.manual_seed(0)
    model = tiny_cascade().train()
    heads = model.roi_heads
    samples_seen, refined_seen = [], []
    sample, refine = heads.sample, heads.refine

    def spy_sample(stage, proposals, targets):
        samples_seen.append(([p.clone() for p in proposals], sample(stage, proposals, targets)))
        return samples_seen[-1][1]

    def spy_refine(stage, samples, logits, deltas, shapes):
        refined_seen.append((logits.detach(), deltas.detach(), refine(stage, samples, logits, deltas, shapes)))
        return refined_seen[-1][2]

    heads.sample, heads.refine = spy_sample, spy_refine
    images, targets = sample_batch()
    losses = model(images, targets)
    assert len(samples_seen) == 3 and len(refined_seen) == 2
    for i, (logits, deltas, refined) in enumerate(refined_seen):
        samples = samples_seen[i][1]
        labels = torch.cat(samples["labels"])
        labels = torch.where(labels > 0, labels, logits[:, 1:].argmax(1) + 1)  # background: best foreground class
        expected = decode(by_label(deltas, labels), torch.cat(samples["boxes"]), STAGE_STDS[i])
        expected = expected.split([len(b) for b in samples["boxes"]])
        for img, (boxes, is_gt, image) in enumerate(zip(expected, samples["is_gt"], images)):
            want = clip(boxes[~is_gt], *image.shape[-2:])
            torch.testing.assert_close(refined[img], want, rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(samples_seen[i + 1][0][img], refined[img])  # the next stage's proposals
            assert not refined[img].requires_grad
    sum(losses.values()).backward()
    assert model.backbone.body.patch_embed.proj.weight.grad.abs().sum() > 0


def test_stage_losses_are_weighted_one_half_quarter():
    images, targets = sample_batch()
    model = tiny_cascade().train()
    unweighted = copy.deepcopy(model)
    unweighted.roi_heads.stage_loss_weights = (1.0, 1.0, 1.0)
    torch.manual_seed(1)
    weighted_losses = model(images, targets)
    torch.manual_seed(1)
    plain = unweighted(images, targets)
    assert {f"loss_{k}_s{i}" for k in ("cls", "box", "mask") for i in range(3)} < set(plain)
    for name, value in plain.items():
        weight = {"_s1": 0.5, "_s2": 0.25}.get(name[-3:], 1.0)
        torch.testing.assert_close(weighted_losses[name], weight * value, msg=name)
    assert plain["loss_box_s0"] > 0 and plain["loss_mask_s2"] > 0


def test_class_weights_weight_each_stages_classification_loss(monkeypatch):
    images, targets = sample_batch()
    weights = torch.tensor([1.0, 0.5, 3.0, 2.0])  # background first
    model = tiny_cascade(class_weights=weights[1:].tolist()).train()
    logits, labels = [], []
    for stage in model.roi_heads.stages:
        capture(stage.box_predictor, logits)
        with torch.no_grad():
            stage.box_predictor.cls_score.bias[2] = 5.0  # RoIs of class 2 lose far less than the others
    sample = model.roi_heads.sample
    monkeypatch.setattr(model.roi_heads, "sample", lambda *args: labels.append(s := sample(*args)) or s)
    plain = tiny_cascade()
    plain.load_state_dict(model.state_dict())  # strict: the weights are not a checkpoint key
    torch.manual_seed(1)
    losses = model(images, targets)
    torch.manual_seed(1)
    expected = plain.train()(images, targets)
    for i, ((_, (stage_logits, _)), samples) in enumerate(zip(logits, labels)):
        stage_labels = torch.cat(samples["labels"])
        assert (stage_labels > 0).any()
        want = F.cross_entropy(stage_logits, stage_labels, weight=weights) * (1.0, 0.5, 0.25)[i]
        torch.testing.assert_close(losses[f"loss_cls_s{i}"], want)
        assert abs(losses[f"loss_cls_s{i}"] - expected[f"loss_cls_s{i}"]) > 1e-4
        torch.testing.assert_close(losses[f"loss_box_s{i}"], expected[f"loss_box_s{i}"])
    with pytest.raises(ValueError, match="class_weights needs 3 non-negative weights"):
        tiny_cascade(class_weights=[1.0, -1.0, 1.0])


def test_masks_average_the_three_mask_heads():
    model = tiny_cascade(box_detections_per_img=5).eval()
    outputs = []
    for stage in model.roi_heads.stages:
        capture(stage.mask_predictor, outputs)
    with torch.no_grad():
        features = model.backbone(torch.rand(1, 3, 64, 64))
        proposals = [torch.tensor([[4.0, 4, 40, 40], [20, 10, 60, 50], [0, 0, 64, 64]])]
        (det,) = model.roi_heads(features, proposals, [(64, 64)])[0]
    index = torch.arange(len(det["labels"]))
    expected = torch.stack([out[index, det["labels"]].sigmoid() for _, out in outputs]).mean(0)
    torch.testing.assert_close(det["masks"][:, 0], expected)


def test_bad_input_is_refused():
    images, targets = sample_batch()
    model = tiny_cascade().train()
    with pytest.raises(ValueError, match="masks"):
        model(images, [{k: v for k, v in t.items() if k != "masks"} for t in targets])
    bad = copy.deepcopy(targets)
    bad[0]["boxes"][0] = torch.tensor([30.0, 10, 30, 40])
    with pytest.raises(AssertionError, match="positive height and width"):  # torchvision's check (Mask R-CNN too)
        model(images, bad)
    with pytest.raises(ValueError, match="one entry per stage"):
        tiny_cascade(stage_ious=(0.5, 0.6))
    with pytest.raises(ValueError, match="score_mode"):
        tiny_cascade(score_mode="mean")
    assert isinstance(model, CascadeRCNN)
