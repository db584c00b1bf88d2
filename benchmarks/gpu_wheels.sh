#!/usr/bin/env bash
# Wheels for a lent GPU machine (benchmarks/gpu_check.sh), downloaded here into .whl/ (git-ignored).
#
# The lent machines' image has Python 3.12 with IMAGE_HAS below (and huggingface-hub, scipy, numpy, ...) and no
# network. It lacks the rest of genvs' dependencies, PKGS (tests/test_benchmarks.py checks that the two cover
# pyproject.toml's); each is downloaded at the version installed here (the one the test suite passed with) for
# CPython 3.12 on x86-64 Linux.
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE_HAS=(torch torchvision lightning timm torchmetrics safetensors rich tensorboard pillow)
PKGS=(diffusers kornia kornia_rs jsonargparse docstring_parser typeshed_client importlib_metadata lazy-importer
      lpips torch-fidelity)
mkdir -p .whl
for pkg in "${PKGS[@]}"; do
    version=$(python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$pkg") || {
        echo "gpu_wheels.sh: $pkg is not installed here; run: python3 -m pip install -e \".[test]\"" >&2
        exit 1
    }
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$pkg==$version"
done
ls .whl
