"""The benchmark's code paths on a tiny model and tiny inputs (a smoke test, nothing is timed against a goal)."""

import importlib
import json

import pytest
import torch

from swin.bench import backbone as bench


def test_bench_writes_report_and_plot(tmp_path):
    out = tmp_path / "bench"
    args = ["--variant", "micro", "--batch-size", "2", "--image-size", "32", "--sizes", "32,64", "--quick"]
    args += ["--modes", "infer,train", "--precisions", "fp32,bf16", "--threads", "1", "--profile", "--out", str(out)]
    bench.main(args)

    report = json.loads((out / "bench.json").read_text())
    assert report["models"] == ["ours", "timm", "torchvision"] and report["threads"] == 1
    assert [(c["mode"], c["precision"]) for c in report["cases"]] == [
        ("infer", "fp32"), ("infer", "bf16"), ("train", "fp32"), ("train", "bf16")
    ]
    for case in report["cases"]:
        assert set(case["models"]) == {"ours", "timm", "torchvision"}
        assert all(len(m["sec"]) == 2 and m["img_s"] > 0 for m in case["models"].values())
        assert set(case["ratio"]) == {"timm", "torchvision"} and all(r > 0 for r in case["ratio"].values())
        assert case["models"]["ours"]["gflop_s"] > 0
    memory = {(r["mode"], r["precision"], r["model"]) for r in report["memory"]}
    assert ("train", "fp32", "ours+checkpointing") in memory and ("infer", "bf16", "timm") in memory
    assert all(r["peak_mb"] is None or r["peak_mb"] >= 0 for r in report["memory"])
    sweep = {(r["model"], r["size"]): r for r in report["sweep"]}
    assert set(sweep) == {(m, s) for m in report["models"] for s in (32, 64)}
    assert all(sweep[(m, 32)]["per_pixel_vs_first"] == 1.0 for m in report["models"])
    assert set(report["roofline_gflop_s"]) == {"fp32", "bf16"} and report["errors"] == []
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "bench.md").read_text()
    assert report["machine"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"family {report['machine']['family']} model {report['machine']['model']}" in table
    assert "| infer bf16 |" in table and "ours ÷ torchvision" in table and "ours+checkpointing" in table
    assert set(report["profile"]) == set(report["models"]) and report["profile_case"] == "infer fp32"
    assert all(0 < row["share"] <= 1 and row["calls"] >= 1 for rows in report["profile"].values() for row in rows)
    assert all(len({row["op"] for row in rows}) == len(rows) for rows in report["profile"].values())  # one row an op


def test_missing_peer_is_skipped_with_a_note(monkeypatch):
    real = importlib.import_module

    def no_timm(name, *args):
        if name.startswith("timm"):
            raise ImportError("No module named 'timm'")
        return real(name, *args)

    monkeypatch.setattr(bench.importlib, "import_module", no_timm)
    names, notes = bench.available_models(["timm", "torchvision"])
    assert names == ["ours", "torchvision"]
    assert len(notes) == 1 and notes[0].startswith("timm skipped")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown peer 'hf'"):
        bench.available_models(["hf"])
    with pytest.raises(ValueError, match="unknown variant 'swin_x'"):
        bench.architecture("swin_x")
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "tpu"])


def test_v2_rows_compare_the_same_architecture(tmp_path):
    """ours, timm and torchvision built by the bench for a V2 variant are one model: the peers' random weights,
    loaded into ours, give their logits; and the V2 case runs for all three."""
    from swin.models.weights import load_pretrained

    arch = bench.architecture("micro_v2")
    x = torch.randn(2, 3, 32, 32)
    for peer in ("timm", "torchvision"):
        torch.manual_seed(0)
        ref = bench.BUILDERS[peer](arch, 32).eval()
        with torch.no_grad():
            for name, p in ref.named_parameters():  # post-norms start at zero: make every part count
                p.normal_(0.0, 0.3) if "logit_scale" not in name else p.uniform_(0.5, 3.0)
            for m in ref.modules():  # torchvision's V2 keeps the k third of qkv.bias at zero
                if hasattr(m, "qkv") and getattr(m.qkv, "bias", None) is not None:
                    m.qkv.bias[m.qkv.bias.numel() // 3 : 2 * m.qkv.bias.numel() // 3] = 0.0
        ours = bench.BUILDERS["ours"](arch, 32).eval()
        assert type(ours).__name__ == "SwinTransformerV2"
        load_pretrained(ours, ref.state_dict(), strict=True)
        with torch.no_grad():
            assert (ours(x) - ref(x)).abs().max() <= 1e-5
    args = ["--variant", "micro_v2", "--batch-size", "2", "--image-size", "32", "--quick", "--modes", "infer"]
    report = bench.main([*args, "--precisions", "fp32", "--sizes", "none", "--no-memory", "--out", str(tmp_path)])
    assert report["errors"] == [] and set(report["cases"][0]["ratio"]) == {"timm", "torchvision"}
