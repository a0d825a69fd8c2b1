import pytest
import torch
from torch import nn

from swin.models import build_swin
from swin.models.upernet import FCNHead, Segmentor, UperNetHead, slide_inference, tta_inference


def tiny_segmentor(num_classes: int = 3, aux: bool = True) -> Segmentor:
    backbone = build_swin(
        "custom", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4, num_classes=None,
        out_indices=(0, 1, 2, 3), drop_path_rate=0.0,
    )  # fmt: skip
    widths = backbone.out_channels
    decode = UperNetHead(widths, num_classes, channels=16)
    return Segmentor(backbone, decode, FCNHead(widths[2], num_classes, channels=8) if aux else None).eval()


def test_heads_resolution_and_outputs():
    model = tiny_segmentor(num_classes=5).train()
    image = torch.randn(2, 3, 70, 90)  # not a multiple of any stride
    features = model.backbone.forward_features(image)
    assert model.decode_head(features).shape == (2, 5, 18, 23)  # stride 4, ceil
    logits, aux = model.forward_train(image)
    assert logits.shape == aux.shape == (2, 5, 70, 90)
    model.eval()
    assert model(image).shape == (2, 5, 70, 90)
    assert tiny_segmentor(aux=False).forward_train(image)[1] is None


def test_upernet_swin_t_parameter_count_matches_paper():
    backbone = build_swin("swin_t", num_classes=None, out_indices=(0, 1, 2, 3))
    model = Segmentor(backbone, UperNetHead(backbone.out_channels, 150), FCNHead(backbone.out_channels[2], 150))
    count = sum(p.numel() for p in model.parameters())
    assert count == 59_941_862  # the README's count; the paper rounds it to 60M


def test_pyramid_pooling_uses_all_scales():
    head = UperNetHead([8, 16, 32, 64], num_classes=2, channels=4, pool_scales=(1, 2, 3, 6))
    pools = [stage[0].output_size for stage in head.ppm.stages]
    assert pools == [1, 2, 3, 6]
    assert head.ppm_bottleneck[0].in_channels == 64 + 4 * 4


def test_slide_equals_whole_when_one_window_covers_the_image():
    model = tiny_segmentor()
    image = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        whole = model(image)
        slide = slide_inference(model, image, crop_size=(64, 48), stride=(32, 16))
    torch.testing.assert_close(slide, whole)
    probs_whole = model.inference(image, mode="whole")
    probs_slide = model.inference(image, mode="slide", crop_size=(64, 48), stride=16)
    torch.testing.assert_close(probs_slide, probs_whole)


def test_slide_averages_overlaps_and_pads_small_images():
    torch.manual_seed(1)
    pixelwise = nn.Conv2d(3, 4, 1)  # per-pixel logits: any window layout must give the whole-image logits
    image = torch.randn(2, 3, 70, 50)
    with torch.no_grad():
        expected = pixelwise(image)
        for crop, stride in [((32, 24), (20, 10)), ((32, 32), (32, 32)), ((96, 80), (8, 8))]:
            torch.testing.assert_close(slide_inference(pixelwise, image, crop, stride), expected)
    seen = []
    slide_inference(lambda x: seen.append(x.shape[-2:]) or pixelwise(x), image, (96, 80), (8, 8))
    assert seen == [(96, 80)]  # the smaller image was padded to one full window


def test_flip_tta_is_mirror_symmetric_and_resizes_to_the_label():
    model = tiny_segmentor()
    image = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        probs = tta_inference(model, image, (30, 42), scales=(0.75, 1.0), flip=True)
        mirrored = tta_inference(model, image.flip(-1), (30, 42), scales=(0.75, 1.0), flip=True)
        plain = tta_inference(model, image, (30, 42), scales=(0.75, 1.0), flip=False)
    assert probs.shape == (1, 3, 30, 42)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 30, 42))
    torch.testing.assert_close(mirrored, probs.flip(-1))
    assert not torch.allclose(plain.flip(-1), tta_inference(model, image.flip(-1), (30, 42), (0.75, 1.0)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_convs"):
        FCNHead(8, 2, num_convs=0)
    with pytest.raises(ValueError, match="inference mode"):
        tiny_segmentor().inference(torch.randn(1, 3, 32, 32), mode="tiles")
    with pytest.raises(ValueError, match="positive"):
        slide_inference(nn.Identity(), torch.randn(1, 3, 8, 8), (4, 4), (0, 4))
