"""The GPU check: one run that measures what only a GPU shows, for docs/benchmarks.md.

1. each task's real recipe for a few optimiser steps through ``cli.py fit`` on the synthetic data at real sizes
   (classification Swin-T 224² batch 128; Mask R-CNN and Cascade Mask R-CNN Swin-T at 800×1333 batch 2; UperNet Swin-T
   512² batch 8), bf16 (``configs/trainer/bf16.yaml``): step time after warm-up, peak memory, GPU utilisation;
2. ``torch.compile`` of the classification fit (``swin.callbacks.CompileModel``);
3. a 2-process DDP classification run when the machine has two GPUs;
4. ``configs/trainer/fsdp.yaml`` with Swin-L against DDP on the same card (peak memory), and the FSDP checkpoint
   resumed under DDP;
5. the backbone benchmark (``python -m swin.bench``) for Swin-T and Swin-B against timm and torchvision, bf16,
   inference batch 64 and training batch 32, eager and compiled.

Every part is timed against ``--deadline`` (seconds): a part that would start after it is skipped with a note, and
``gpu_check.json`` / ``gpu_check.md`` in ``--out`` are rewritten after every part, so a run cut short keeps what it
measured. ``--device cpu --tiny`` runs the same flow end to end on a CPU in minutes (tiny models and images; FSDP,
which Lightning runs on CUDA only, is skipped there, and the benchmark runs eager only).

    bash scripts/gpu_check.sh --out "$OUT"                                  # on the GPU machine
    python scripts/gpu_check.py --device cpu --tiny --out runs/gpu_check    # anywhere
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY_BACKBONE = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 4}


def task_runs(tiny: bool) -> list[dict[str, Any]]:
    """The task runs: config files plus the overrides that put them on synthetic data at real (or tiny) sizes."""
    size = 64 if tiny else None

    def data(synthetic: dict[str, Any], **init_args: Any) -> dict[str, Any]:
        return {"init_args": {"synthetic": True, "synthetic_kwargs": synthetic, **init_args}}

    runs = [
        {
            "name": "classification swin_t 224² b128",
            "configs": ["classification/swin_t_imagenet1k.yaml"],
            "model": {"pretrained": None},
            "data": data(
                {"num_train": 8 if tiny else 80, "num_val": 1, "image_size": size or 256},
                image_size=size or 224, batch_size=4 if tiny else 128,
            ),
        },
        {
            "name": "mask r-cnn swin_t 800×1333 b2",
            "configs": ["detection/mask_rcnn_swin_t_coco_3x.yaml"],
            "model": {"pretrained": None, **({"min_size": 64, "max_size": 96} if tiny else {})},
            "data": data(
                {"num_train": 8 if tiny else 64, "num_val": 1, "image_size": [size or 800, size or 1333]},
                train_sizes=[size or 800], max_size=size or 1333, crop_prob=0.0, batch_size=2,
            ),
        },
        {
            "name": "upernet swin_t 512² b8",
            "configs": ["segmentation/upernet_swin_t_ade20k_160k.yaml"],
            "model": {"pretrained": None},
            "data": data(
                {"num_train": 8 if tiny else 64, "num_val": 1, "image_size": size or 512},
                crop_size=size or 512, batch_size=4 if tiny else 8,
            ),
            "trainer": {"sync_batchnorm": False},
        },
    ]
    cascade = CONFIGS / "detection" / "cascade_mask_rcnn_swin_t_coco_3x.yaml"
    if cascade.is_file():
        runs.insert(2, {**runs[1], "name": "cascade mask r-cnn swin_t 800×1333 b2",
                        "configs": ["detection/cascade_mask_rcnn_swin_t_coco_3x.yaml"]})  # fmt: skip
    if tiny:  # the same runs with tiny models and images
        for run in runs:
            run["name"] = f"{run['name'].split()[0]} [tiny]" if "cascade" not in run["name"] else "cascade [tiny]"
    return runs


class Check:
    """Runs the parts, keeps their results and writes the report after each."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p)}  # fmt: skip
        self.report: dict[str, Any] = {"machine": self.machine(), "args": vars(args), "parts": []}

    # -- running ----------------------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.args.deadline - (time.monotonic() - self.start)

    def part(self, name: str, needs: float, fn: Any) -> dict[str, Any] | None:
        """Run ``fn()`` (a dict of figures) unless fewer than ``needs`` seconds are left; record it either way."""
        entry: dict[str, Any] = {"name": name}
        if self.left() < needs:
            entry.update(status="skipped", note=f"{self.left():.0f} s left, {needs:.0f} s needed")
        else:
            began = time.monotonic()
            try:
                entry.update(status="ok", **fn())
            except Exception as err:  # noqa: BLE001 - record it, go on with the other parts
                entry.update(status="failed", note=f"{type(err).__name__}: {err}"[-2000:])
            entry["seconds"] = round(time.monotonic() - began, 1)
        print(f"[gpu_check] {name}: {entry['status']} {entry.get('note', '')}", flush=True)
        self.report["parts"].append(entry)
        self.write()
        return entry

    def run(self, cmd: list[str], log: str, timeout: float) -> None:
        with open(self.out / log, "w") as f:
            proc = subprocess.run(cmd, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=max(10.0, min(timeout, self.left())))  # fmt: skip
        if proc.returncode:
            tail = (self.out / log).read_text()[-1500:]
            raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}; {log} ends with:\n{tail}")

    def fit(self, run: dict[str, Any], tag: str, extra: dict[str, Any] | None = None, ckpt: Path | None = None,
            callbacks: list[dict[str, Any]] = ()) -> dict[str, Any]:  # fmt: skip
        """``cli.py fit`` of one task run with a StepTimer; its summary (and the run folder)."""
        args, cpu = self.args, self.args.device == "cpu"
        timer = self.out / f"{tag}.steps.json"
        trainer: dict[str, Any] = {
            "accelerator": args.device, "devices": 1, "num_nodes": 1, "strategy": "auto",
            "max_steps": args.steps, "max_epochs": -1, "limit_val_batches": 0, "num_sanity_val_steps": 0,
            "enable_progress_bar": False, "default_root_dir": str(self.out / "runs" / tag),
            "callbacks": [{"class_path": "swin.callbacks.StepTimer",
                           "init_args": {"output": str(timer), "warmup_steps": min(5, args.steps // 3)}},
                          *callbacks],
            **run.get("trainer", {}), **(extra or {}).get("trainer", {}),
        }  # fmt: skip
        # a few steps of the recipe: its schedule in epochs (warm-up, milestones) becomes a short one in steps
        schedule = {"warmup_epochs": 0.0, "warmup_steps": min(5, args.steps // 3), "milestones": []}
        model = {"init_args": {**schedule, **run.get("model", {}), **(extra or {}).get("model", {})}}
        if args.tiny:
            model["init_args"].update(backbone="custom", backbone_kwargs=TINY_BACKBONE)
        data = run["data"]
        key = hashlib.sha1(json.dumps(data["init_args"]["synthetic_kwargs"], sort_keys=True).encode()).hexdigest()[:8]
        data["init_args"].update(root=str(self.out / "data" / f"{run['configs'][0].split('/')[0]}-{key}"),
                                 num_workers=0 if cpu else 8)  # fmt: skip
        override = self.out / f"{tag}.yaml"
        override.write_text(yaml.safe_dump({"trainer": trainer, "model": model, "data": data}))
        configs = [*run["configs"], "trainer/bf16.yaml", *(extra or {}).get("configs", [])]
        cmd = [sys.executable, "cli.py", "fit", *(f"--config={CONFIGS / c}" for c in configs), f"--config={override}"]
        if ckpt is not None:
            cmd.append(f"--ckpt_path={ckpt}")
        self.run(cmd, f"{tag}.log", timeout=args.deadline)
        summary = json.loads(timer.read_text())
        summary["run_folder"] = str(self.out / "runs" / tag)
        return summary

    # -- parts ------------------------------------------------------------------------------------------------------
    def machine(self) -> dict[str, Any]:
        import torch

        info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                                "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}  # fmt: skip
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.is_file():
            names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
            info["cpu"] = names[0] if names else info["cpu"]
        if torch.cuda.is_available():
            info.update(gpus=torch.cuda.device_count(), gpu=torch.cuda.get_device_name(0))
        return info

    def tasks(self) -> None:
        for i, run in enumerate(task_runs(self.args.tiny)):
            self.part(f"fit {run['name']}", 45, lambda run=run, i=i: self.fit(run, f"task{i}"))

    def compiled(self) -> None:
        run = task_runs(self.args.tiny)[0]
        backend = "aot_eager" if self.args.tiny else "inductor"
        compile_cb = [{"class_path": "swin.callbacks.CompileModel", "init_args": {"backend": backend}}]
        self.part(f"fit {run['name']}, torch.compile ({backend})", 90,
                  lambda: self.fit(run, "compiled", callbacks=compile_cb))  # fmt: skip

    def ddp(self) -> None:
        import torch

        if self.args.device != "cuda" or torch.cuda.device_count() < 2:
            self.report["parts"].append({"name": "fit classification, DDP on 2 GPUs", "status": "skipped",
                                         "note": "the machine has fewer than two GPUs"})  # fmt: skip
            return
        run = task_runs(self.args.tiny)[0]
        extra = {"trainer": {"devices": 2, "strategy": "ddp"}}
        self.part(f"fit {run['name']}, DDP on 2 GPUs", 90, lambda: self.fit(run, "ddp2", extra))

    def fsdp(self) -> None:
        if self.args.device != "cuda":
            self.report["parts"].append({"name": "FSDP Swin-L vs DDP, resume under DDP", "status": "skipped",
                                         "note": "Lightning's FSDPStrategy runs on CUDA only"})  # fmt: skip
            return
        run = {**task_runs(False)[0], "configs": ["classification/swin_l_imagenet1k.yaml"], "name": "swin_l"}
        run["data"] = {"init_args": {**run["data"]["init_args"], "batch_size": 32,
                                     "synthetic_kwargs": {"num_train": 128, "num_val": 1, "image_size": 256}}}  # fmt: skip
        steps = {"trainer": {"max_steps": 20}}  # 640 images / 32: one epoch, which ends with last.ckpt
        fsdp = self.part("fit Swin-L FSDP (fsdp.yaml), 20 steps", 120,
                         lambda: self.fit(run, "fsdp", {**steps, "configs": ["trainer/fsdp.yaml"]}))  # fmt: skip
        self.part("fit Swin-L DDP on the same card, 20 steps", 90,
                  lambda: self.fit(run, "ddp1", {"trainer": {"max_steps": 20, "strategy": "ddp"}}))  # fmt: skip
        if fsdp and fsdp["status"] == "ok":
            ckpt = Path(fsdp["run_folder"]).glob("*/checkpoints/last.ckpt")
            self.part("resume the FSDP checkpoint under DDP, 5 more steps", 90,
                      lambda: self.fit(run, "resume", {"trainer": {"max_steps": 25, "strategy": "ddp"}},
                                       ckpt=next(ckpt)))  # fmt: skip

    def bench(self) -> None:
        args = self.args
        variants = ["micro"] if args.tiny else ["swin_t", "swin_b"]
        for variant in variants:
            for mode, batch in (("infer", 2 if args.tiny else 64), ("train", 2 if args.tiny else 32)):
                folder = self.out / f"bench-{variant}-{mode}"

                def bench(variant=variant, mode=mode, batch=batch, folder=folder) -> dict[str, Any]:
                    cmd = [sys.executable, "-m", "swin.bench", "--device", args.device, "--variant", variant,
                           "--modes", mode, "--batch-size", str(batch), "--precisions", "bf16",
                           "--sizes", "none", "--repeats", "3", "--no-memory", "--out", str(folder)]  # fmt: skip
                    cmd += ["--image-size", "32", "--quick"] if args.tiny else ["--compile", mode]
                    self.run(cmd, f"bench-{variant}-{mode}.log", timeout=args.deadline)
                    report = json.loads((folder / "bench.json").read_text())
                    return {"cases": [{"case": f"{c['mode']} {c['precision']}{' compiled' if c['compiled'] else ''}",
                                       "img_s": {m: v["img_s"] for m, v in c["models"].items()},
                                       "ratio": c["ratio"]} for c in report["cases"]]}  # fmt: skip

                self.part(f"bench {variant} {mode} batch {batch}", 60, bench)

    # -- report -----------------------------------------------------------------------------------------------------
    def write(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.report, indent=1))
        (self.out / "gpu_check.md").write_text(markdown(self.report))


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables: task runs, then benchmark cases, then skipped and failed parts."""
    m = report["machine"]
    lines = [f"`scripts/gpu_check.py` on {m.get('gpu', 'no GPU')} ({m.get('gpus', 0)} GPU), host {m['cpu']} "
             f"({m['cpus']} CPUs), torch {m['torch']}", "",
             "| run | step s (median) | img/s | peak GiB | GPU util % | wall s |", "|---|---|---|---|---|---|"]  # fmt: skip
    for p in report["parts"]:
        if p["status"] == "ok" and "step_s_median" in p:
            util = f"{p['gpu_utilisation_pct']:.0f}" if "gpu_utilisation_pct" in p else "–"
            peak = f"{p['peak_memory_gib']:.1f}" if "peak_memory_gib" in p else "–"
            lines.append(f"| {p['name']} | {p['step_s_median']:.3f} | {p['images_per_s']:.1f} | {peak} | {util} | "
                         f"{p['seconds']} |")  # fmt: skip
    cases = [(p["name"], c) for p in report["parts"] if p["status"] == "ok" for c in p.get("cases", [])]
    if cases:
        lines += ["", "| benchmark | case | img/s (ours / timm / torchvision) | ours ÷ timm | ours ÷ torchvision |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for name, c in cases:
            speeds = " / ".join(f"{c['img_s'][k]:.0f}" if k in c["img_s"] else "–" for k in ("ours", "timm", "torchvision"))
            ratios = " | ".join(f"×{c['ratio'][k]:.2f}" if k in c["ratio"] else "–" for k in ("timm", "torchvision"))
            lines.append(f"| {name} | {c['case']} | {speeds} | {ratios} |")
    other = [p for p in report["parts"] if p["status"] != "ok"]
    if other:
        lines += ["", *(f"- {p['name']}: **{p['status']}**: {p.get('note', '')}" for p in other)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models and images (a CPU check of the script)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per task run (default 30; tiny 3)")
    parser.add_argument("--deadline", type=float, default=470.0, help="seconds: parts that would start later skip")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check"))
    parser.add_argument("--parts", default="tasks,compiled,ddp,fsdp,bench", help="which parts, in this order")
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.tiny else 30)
    check = Check(args)
    for name in args.parts.split(","):
        getattr(check, name)()
    check.write()
    print(markdown(check.report))
    return check.report


if __name__ == "__main__":
    report = main()
    sys.exit(1 if any(p["status"] == "failed" for p in report["parts"]) else 0)
