"""The whole-training-step benchmark on tiny inputs (CPU; nothing is timed against a goal): both sides are one
function with as many parameters, the first step changes every parameter that got a gradient on both sides, and
the report holds what it claims."""

import json
import math

import pytest
import torch

from swin.bench import main as bench_main
from swin.bench import task as bench


def check_sides(task: str, sides: dict, size: tuple[int, int], first: dict[str, tuple]) -> None:
    """Assert that the freshly built sides compute the same; watch their first optimiser step (fills, per side,
    the parameters before it, whether each got a non-zero gradient, the parameters after it)."""
    ours, peer = sides["ours"].task, sides["peer"].task
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in peer.parameters())
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        if task == "detection":  # the FPN levels (the heads are torchvision's on both sides)
            a, b = ours.model.eval().backbone(x), peer.model.eval().backbone(x)
            assert list(a) == list(b) and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
        else:
            torch.testing.assert_close(ours.model.eval()(x), peer.model.eval()(x), atol=1e-4, rtol=1e-4)
    for name, side in sides.items():
        side.task.train()
        params = list(side.task.parameters())
        before, graded = [p.detach().clone() for p in params], []

        def pre(*_, params=params, graded=graded) -> None:  # drop path may skip a whole block of one image
            graded.extend(p.grad is not None and bool(p.grad.any()) for p in params[len(graded) :])

        def post(*_, name=name, params=params, before=before, graded=graded) -> None:
            first.setdefault(name, (before, graded, [p.detach().clone() for p in params]))

        side.optimizer.register_step_pre_hook(pre)
        side.optimizer.register_step_post_hook(post)

@pytest.mark.parametrize(
    "task, options",
    [
        ("classification", ["--precisions", "fp32", "--no-profile"]),  # + the memory probe
        ("detection", ["--precisions", "bf16", "--no-memory", "--no-profile"]),
        ("segmentation", ["--precisions", "bf16,fp32", "--no-memory"]),  # + the profile
    ],
)
def test_task_step(task, options, tmp_path, monkeypatch):
    built, build = {}, bench.build_sides

    def build_and_check(task, size, device, names=bench.SIDES):
        sides = build(task, size, device, names)
        check_sides(task, sides, size, built)
        return sides

    monkeypatch.setattr(bench, "build_sides", build_and_check)
    bench_main(["--task", task, "--quick", "--repeats", "1", *options, "--out", str(tmp_path)])

    for name in bench.SIDES:
        before, graded, after = built[name]
        assert sum(graded) >= 0.8 * len(graded), f"{name}: {sum(graded)} of {len(graded)} tensors got a gradient"
        unchanged = sum(g and torch.equal(b, a) for b, g, a in zip(before, graded, after))
        assert unchanged == 0, f"{name}: {unchanged} tensors with a gradient kept their values in the first step"

    report = json.loads((tmp_path / "bench.json").read_text())
    batch, size = bench.QUICK_SIZES[task]
    assert report["errors"] == [] and report["task"] == task
    assert (report["batch"], report["size"]) == (batch, list(size))
    assert report["params"]["ours"] == report["params"]["peer"] > 0
    assert [c["precision"] for c in report["cases"]] == options[1].split(",")
    for case in report["cases"]:
        for side in case["sides"].values():
            assert len(side["sec"]) == 1 and min(side["sec"]) > 0 and math.isfinite(side["loss"])
        ours, peer = case["sides"]["ours"]["median"], case["sides"]["peer"]["median"]
        assert case["speedup"] == pytest.approx(peer / ours)
        if task == "detection":  # the mask head pooled the sampled positives (the generated objects among them)
            assert min(case["mask_rois"].values()) >= 1 and "Mask-head RoIs" in (tmp_path / "bench.md").read_text()
    if "--no-memory" in options:
        assert report["memory"] == []
    else:
        assert {(r["precision"], r["side"]) for r in report["memory"]} == {("fp32", s) for s in bench.SIDES}
        assert all(r["peak_mb"] is None or r["peak_mb"] >= 0 for r in report["memory"])
    if "--no-profile" in options:
        assert report["profile"] == {}
    else:
        assert set(report["profile"]) == set(bench.SIDES)
        assert all(0 < r["share"] <= 1 and r["calls"] >= 1 for rows in report["profile"].values() for r in rows)
    table = (tmp_path / "bench.md").read_text()
    assert f"family {report['machine']['family']} model {report['machine']['model']}" in table
    assert f"| {report['cases'][0]['precision']} |" in table
