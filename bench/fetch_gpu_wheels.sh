#!/usr/bin/env bash
# Download the wheels the GPU image lacks into .whl/ (ignored by git, carried to the GPU machine), so that
# bench/gpu_run.sh measures the VAE decode (diffusers) and the reference's MP4 round trips (PyAV).
#
#   bench/fetch_gpu_wheels.sh [DIR]        (default DIR: .whl in the repository root)
#
# The image is assumed to hold torch, triton, transformers, numpy, pytest, safetensors, PyYAML, tqdm,
# huggingface-hub, Pillow and filelock (a torch requirement). diffusers (pure Python) also requires
# importlib_metadata, regex and requests: their wheels come along, with their own requirements (zipp;
# charset-normalizer, idna, urllib3, certifi). gpu_run.sh installs only those the image still lacks.
# Environment: PYTHON (default python3), WHEEL_PYTHON_VERSION (default 3.12, the image's Python).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$repo/.whl}
py=${PYTHON:-python3}
version=${WHEEL_PYTHON_VERSION:-3.12}
# Pinned: the versions the tests run with.
wheels=(
    diffusers==0.42.1 av==18.1.0
    importlib_metadata==10.2.0 zipp==4.1.2 regex==2026.12.2
    requests==2.34.2 charset-normalizer==3.5.3 idna==3.21 urllib3==2.8.0 certifi==2026.10.19.post1
)
mkdir -p "$dest"
"$py" -m pip download --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "${wheels[@]}"
echo "wheels for Python $version in $dest ($(du -sh "$dest" | cut -f1)); carry it with the run (it is git-ignored)"
