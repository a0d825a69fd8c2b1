"""The benchmark's onnxruntime peers on the micro variant: exported models that give the eager logits, timed in
the CPU fp32 inference case only; skipped with a note without onnxruntime (nothing is timed against a goal)."""

import importlib
import json

import pytest
import torch

from swin.bench import backbone as bench

pytest.importorskip("onnxruntime")


@pytest.mark.slow  # two ONNX exports and a timed case: ~40 s on 2 shared cores
def test_ort_peers_run_in_the_infer_fp32_case_only(tmp_path):
    out = tmp_path / "bench"
    peers = "torchvision,ours-ort,torchvision-ort"
    bench.main(["--variant", "micro", "--batch-size", "2", "--image-size", "32", "--sizes", "32", "--quick",
                "--modes", "infer,train", "--precisions", "fp32", "--threads", "1", "--peers", peers,
                "--no-memory", "--out", str(out)])  # fmt: skip
    report = json.loads((out / "bench.json").read_text())
    assert report["models"] == ["ours", "torchvision", "ours-ort", "torchvision-ort"] and report["errors"] == []
    infer, train = report["cases"]
    assert set(infer["models"]) == set(report["models"]) and set(infer["ratio"]) == set(report["models"][1:])
    assert all(m["img_s"] > 0 for m in infer["models"].values())
    assert set(train["models"]) == {"ours", "torchvision"}
    assert {r["model"] for r in report["sweep"]} == {"ours", "torchvision"}
    assert "ours ÷ ours-ort" in (out / "bench.md").read_text()


def test_ort_model_gives_the_eager_logits():
    arch = bench.architecture("micro")
    torch.manual_seed(0)
    model = bench.BUILDERS["ours"](arch, 32).eval()
    ort_model = bench.OrtModel(model, 32)
    x = torch.randn(3, 3, 32, 32)  # another batch than the export's
    with torch.inference_mode():
        assert (ort_model(x) - model(x)).abs().max() <= 1e-4


def test_ort_peers_skipped_without_onnxruntime(monkeypatch):
    real = importlib.import_module

    def no_ort(name, *args):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real(name, *args)

    monkeypatch.setattr(bench.importlib, "import_module", no_ort)
    names, notes = bench.available_models(["torchvision", "ours-ort", "torchvision-ort"])
    assert names == ["ours", "torchvision"]
    assert [n.split(":")[0] for n in notes] == ["ours-ort skipped", "torchvision-ort skipped"]
