#!/usr/bin/env bash
# bash scripts/build_wheelhouse.sh [DIR]   (default DIR: .whl, ignored by git)
#
# Wheels for an offline GPU/TPU host (Python 3.12, manylinux x86_64) whose image
# has jax, flax, optax, orbax-checkpoint and numpy but lacks what this project
# needs besides: scann, gin-config, tensorflow-datasets, array-record and their
# small dependencies. Install them there, without touching the image's own
# packages, with:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
# (etils is left out on purpose: the host's own version is used.)
set -euo pipefail
dir="${1:-.whl}"
mkdir -p "$dir"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
packages=(
  scann==1.4.2 gin-config==0.5.0 tensorflow-datasets==4.9.10 array-record==0.8.6
  dm-tree==0.1.10 simple-parsing==0.1.9 docstring-parser==0.18.0 immutabledict==4.3.1
  tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 protobuf==7.36.2
  toml==0.10.2 termcolor==3.3.0 importlib_resources==7.1.0 tensorboardX==2.6.5
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$dir" "${packages[@]}"
# promise has no wheel on PyPI: build a pure-Python one here.
python3 -m pip wheel -q --no-deps -w "$dir" promise==2.3
ls -1 "$dir"
du -sh "$dir"
