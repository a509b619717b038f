#!/usr/bin/env bash
# A folder of wheels from which an offline GPU node installs what
# tools/analysis/gpu_benchmark.py needs besides torch: mmengine (which
# `import mmconv2former` needs) and, unless the node has it, timm (the
# ConvNeXt-T peer). Run it on a machine with internet access; copy the folder
# to the node with the checkout. docs/gpu_benchmark.md gives the whole procedure.
#
#   bash tools/analysis/make_wheelhouse.sh [DIR] [--full] [--timm] [--python-version 3.12]
#
# Default (lean): mmengine and the small pure-Python packages it imports that
# GPU images seldom carry (addict, yapf, termcolor, platformdirs), without
# their dependencies. The node must already have numpy, pyyaml, rich,
# packaging and OpenCV (opencv-python or opencv-python-headless), as PyTorch
# images usually do. Install there with
#   pip install --no-index --no-deps --find-links DIR mmengine addict yapf termcolor platformdirs
#
# --full: mmengine with all its dependencies (numpy, opencv-python,
# matplotlib, ...; about 100 MB) as binary wheels for the node's Python
# (--python-version, default 3.12) on x86-64 Linux. Install there with
#   pip install --no-index --find-links DIR mmengine
#
# --timm: also timm, for a node that has neither timm nor mmpretrain (with
# --full, its dependencies too; lean, the node must have torchvision, pyyaml,
# huggingface_hub and safetensors).
set -euo pipefail

dir=wheelhouse
full=0
timm=0
python_version=3.12
while [ $# -gt 0 ]; do
    case "$1" in
        --full) full=1 ;;
        --timm) timm=1 ;;
        --python-version) python_version="$2"; shift ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) dir="$1" ;;
    esac
    shift
done

# The mmengine version the package pins (requirements/runtime.txt).
root="$(cd "$(dirname "$0")/../.." && pwd)"
mmengine="$(grep -E '^mmengine' "$root/requirements/runtime.txt" || echo mmengine)"
mkdir -p "$dir"

if [ "$full" = 1 ]; then
    # Binary wheels for the node's interpreter and platform, dependencies included.
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        platforms+=(--platform "$p")
    done
    packages=("$mmengine")
    [ "$timm" = 1 ] && packages+=(timm)
    python3 -m pip download --dest "$dir" --only-binary=:all: --python-version "$python_version" \
        --implementation cp "${platforms[@]}" "${packages[@]}"
else
    # All of these are pure-Python wheels (py3-none-any): any interpreter fits.
    packages=("$mmengine" addict yapf termcolor platformdirs)
    [ "$timm" = 1 ] && packages+=(timm)
    python3 -m pip download --dest "$dir" --no-deps --only-binary=:all: "${packages[@]}"
fi
echo "wheels in $dir:"
ls -1 "$dir"
