#!/usr/bin/env bash
# Download, here, the Python 3.12 wheels the GPU machine lacks into .whl/ (ignored by git; the device tool carries it).
# The machine has no network; its image holds torch, lightning, torchmetrics, timm, opencv-python-headless, numpy,
# scipy, pillow, pyyaml, tensorboard (see the device tool's KINDS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl albumentations==2.0.8 albucore==0.0.24 jsonargparse==4.53.0 docstring-parser==0.18.0 \
    typeshed-client==2.15.0 pycocotools==2.0.11 faster-coco-eval==1.8.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 stringzilla==5.3.2 simsimd==6.5.16
ls -la .whl
