#!/usr/bin/env bash
# One-command, idempotent set-up of the mmconv2former stack into the active
# Python environment (a venv, conda env or the system Python: whichever
# `${PYTHON:-python3}` is).
#
#   bash tools/setup_env.sh            # install what is missing, then self-check
#   MMCONV2FORMER_EXTRAS="pose" bash tools/setup_env.sh   # only some optional extras
#
# What it does, and why:
#   1. keeps an installed torch + torchvision pair when it imports and is new
#      enough; otherwise installs the pair pinned in requirements/torch.txt;
#   2. installs mmcv 2.1.0 with compiled ops. mmdet 3.3.0 / mmseg 1.2.2 refuse
#      mmcv>=2.2 and PyPI has no 2.1.0 wheel for current torch, so it is built
#      from the sdist. The built wheel is cached outside the checkout, keyed by
#      mmcv, torch, Python and machine, and its version carries a local label
#      (2.1.0+torch2.14.1...) so that a build made against another torch is
#      never mistaken for this one (pip's own cache keys by sdist only);
#   3. installs mmengine, mmdet, mmsegmentation, mmpretrain and the test tools
#      from requirements/, then this package in editable mode;
#   4. installs the optional extras named in $MMCONV2FORMER_EXTRAS (default: all
#      three), so that their tests run instead of skipping:
#        deploy  ONNX export tools (requirements/deploy.txt);
#        pose    mmpose 1.3.2 (requirements/pose.txt) with xtcocotools compiled
#                against the installed numpy (the PyPI wheel is built for numpy
#                1.x and fails under numpy 2), without chumpy, which nothing
#                imports;
#        action  mmaction2 1.2.0 (requirements/action.txt), from a wheel built
#                from its sdist without the DRN localizer whose files the
#                release lacks (open-mmlab/mmaction2#2714), cached like mmcv's;
#   5. runs a self-check (imports, an mmcv RoIAlign op, this checkout being the
#      installed mmconv2former, the extras) and says what failed.
# A second run finds everything in place and takes seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
MMCV_VERSION=2.1.0
CACHE_DIR="${MMCONV2FORMER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmconv2former}"
PIP=("$PY" -m pip --disable-pip-version-check -q)
export PIP_ROOT_USER_ACTION=ignore

say() { printf '[setup_env] %s\n' "$*"; }
die() { printf '[setup_env] ERROR: %s\n' "$*" >&2; exit 1; }

"$PY" -c 'import sys; assert sys.version_info >= (3, 8)' 2>/dev/null \
  || die "$PY is missing or older than Python 3.8; set PYTHON=/path/to/python3.11"

# ---------------------------------------------------------------- 0. already done?
# A stamp records the requirement files, this script, the checkout and the
# Python it was set up for; when nothing changed and the stack still imports
# (compiled mmcv ops included), stop here. Checks run from / so that they see
# what is installed, not a package that happens to sit in the current directory.
STAMP_DIR="$CACHE_DIR/stamps"
STAMP_KEY="$( { cat "$ROOT"/requirements/*.txt "$ROOT/setup.py" "${BASH_SOURCE[0]}"; echo "$ROOT"; \
  "$PY" -c 'import sys; print(sys.prefix, sys.version)'; } | sha256sum | cut -c1-16)"
EXTRAS="${MMCONV2FORMER_EXTRAS-deploy pose action}"
# What must import for each extra to count as installed.
extra_modules() {
  case "$1" in
    deploy) echo onnx onnxruntime;; pose) echo mmpose.models xtcocotools._mask;; action) echo mmaction.models;;
    *) die "unknown extra '$1' in MMCONV2FORMER_EXTRAS (deploy, pose, action)";;
  esac
}
EXTRA_MODULES="$(for extra in $EXTRAS; do extra_modules "$extra" || exit 1; done)" || exit 1
has_extra() { case " $EXTRAS " in *" $1 "*) return 0;; esac; return 1; }
STAMP_KEY="$( { echo "$STAMP_KEY" $EXTRAS; } | sha256sum | cut -c1-16)"
if [ -f "$STAMP_DIR/$STAMP_KEY" ] && (cd / && "$PY" - "$ROOT" $EXTRA_MODULES) <<'PYCHECK' 2>/dev/null
import importlib, os.path as osp, sys
import mmconv2former, mmdet, mmseg, mmpretrain  # noqa: F401
from mmcv.ops import roi_align  # noqa: F401  (loads the compiled ops)
assert osp.dirname(osp.dirname(osp.abspath(mmconv2former.__file__))) == sys.argv[1]
for name in sys.argv[2:]:  # the extras' modules
    importlib.import_module(name)
PYCHECK
then
  say "already set up for this checkout and Python (stamp $STAMP_KEY); nothing to do"
  exit 0
fi

# ---------------------------------------------------------------- 1. torch
torch_fits() {
  "$PY" - <<'EOF' 2>/dev/null
import torch, torchvision
from packaging.version import Version
assert Version(torch.__version__.split('+')[0]) >= Version('2.1')
torchvision.ops.nms  # fails when torchvision was built for another torch
torchvision.ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
EOF
}
"${PIP[@]}" install "setuptools<81" wheel packaging ninja >/dev/null \
  || die "could not install the build tools (setuptools<81, wheel, ninja)"
if torch_fits; then
  say "keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  say "installing torch + torchvision from requirements/torch.txt"
  "${PIP[@]}" install -r "$ROOT/requirements/torch.txt" \
    || die "torch/torchvision install failed (see pip's message above)"
  torch_fits || die "torch and torchvision are installed but do not work together"
fi
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)')"

# ---------------------------------------------------------------- 2. mmcv
"${PIP[@]}" install -r "$ROOT/requirements/runtime.txt" || die "mmengine install failed"
# PEP 440 local label: letters, digits and dots only.
LOCAL_LABEL="torch$(printf '%s' "$TORCH_VERSION" | tr -c 'A-Za-z0-9.\n' '.')"
WANT_MMCV="${MMCV_VERSION}+${LOCAL_LABEL}"
installed_mmcv() {
  "$PY" -c 'import importlib.metadata as m; print(m.version("mmcv"))' 2>/dev/null || true
}
if [ "$(installed_mmcv)" = "$WANT_MMCV" ]; then
  say "mmcv $WANT_MMCV already installed"
else
  KEY="$("$PY" -c 'import platform, sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}")')"
  WHEEL_DIR="$CACHE_DIR/wheels/mmcv-$MMCV_VERSION/$LOCAL_LABEL-$KEY"
  WHEEL="$(ls "$WHEEL_DIR"/mmcv-*.whl 2>/dev/null | head -n 1 || true)"
  if [ -z "$WHEEL" ]; then
    say "building mmcv $MMCV_VERSION with CPU ops against torch $TORCH_VERSION (15-25 minutes on 2 cores, once)"
    # mmcv's setup.py imports pkg_resources, which setuptools>=81 no longer has;
    # installing torch can pull a newer setuptools in (torch needs >=77.0.3), so
    # pin it again right before the build.
    "${PIP[@]}" install "setuptools<81" >/dev/null && "$PY" -c 'import pkg_resources' 2>/dev/null \
      || die "mmcv $MMCV_VERSION's setup.py needs pkg_resources: could not install setuptools<81"
    BUILD="$(mktemp -d)"
    trap 'rm -rf "$BUILD"' EXIT
    "${PIP[@]}" download --no-deps --no-binary :all: --no-build-isolation \
      "mmcv==$MMCV_VERSION" -d "$BUILD" || die "could not download the mmcv $MMCV_VERSION sdist"
    tar -xzf "$BUILD"/mmcv-"$MMCV_VERSION".tar.gz -C "$BUILD"
    SRC="$BUILD/mmcv-$MMCV_VERSION"
    # torch>=2.14's headers use C++20; mmcv 2.1.0 hard-codes -std=c++17.
    if "$PY" -c 'import torch, sys; from packaging.version import Version as V; sys.exit(V(torch.__version__.split("+")[0]) < V("2.10"))'; then
      sed -i "s/-std=c++17/-std=c++20/g" "$SRC/setup.py"
    fi
    # Record the torch it was built against in the wheel's version.
    sed -i "s/version=get_version(),/version=get_version() + '+$LOCAL_LABEL',/" "$SRC/setup.py"
    grep -q "+$LOCAL_LABEL" "$SRC/setup.py" || die "could not patch mmcv's setup.py version (layout changed?)"
    mkdir -p "$WHEEL_DIR"
    # FORCE_CUDA=0 unless the caller asks for CUDA ops on a GPU machine.
    ( cd "$SRC" && MMCV_WITH_OPS=1 FORCE_CUDA="${FORCE_CUDA:-0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "$PY" -m pip --disable-pip-version-check wheel --no-deps --no-build-isolation \
        --no-cache-dir -w "$BUILD/dist" . ) > "$BUILD/build.log" 2>&1 \
      || { tail -n 40 "$BUILD/build.log" >&2; die "mmcv build failed (last 40 lines of the log above)"; }
    cp "$BUILD"/dist/mmcv-*.whl "$WHEEL_DIR"/
    WHEEL="$(ls "$WHEEL_DIR"/mmcv-*.whl | head -n 1)"
    say "cached $WHEEL"
  else
    say "using cached $WHEEL"
  fi
  "${PIP[@]}" install --no-deps --force-reinstall "$WHEEL" || die "could not install $WHEEL"
  # mmcv's own runtime dependencies (opencv, addict, yapf, ...).
  "${PIP[@]}" install "$WHEEL" || die "could not install mmcv's dependencies"
fi

# ---------------------------------------------------------------- 3. mm stack, tests, package
"${PIP[@]}" install -r "$ROOT/requirements/mminstall.txt" -r "$ROOT/requirements/tests.txt" \
  || die "installing the OpenMMLab stack failed (see pip's message above)"
[ "$(installed_mmcv)" = "$WANT_MMCV" ] \
  || die "pip replaced the mmcv build (now $(installed_mmcv)); rerun this script"
"${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT" || die "installing mmconv2former failed"

# ---------------------------------------------------------------- 4. optional extras
if has_extra deploy; then
  "${PIP[@]}" install -r "$ROOT/requirements/deploy.txt" \
    || die "installing the ONNX tools (requirements/deploy.txt) failed"
fi
if has_extra pose; then
  # A wheel built for numpy 1.x (PyPI's 1.14.3, or one in pip's cache) fails
  # to import under numpy 2: compile xtcocotools against the numpy installed
  # here, without build isolation (which would build against another numpy).
  if ! (cd / && "$PY" -c 'import xtcocotools._mask' 2>/dev/null); then
    say "building xtcocotools against numpy $("$PY" -c 'import numpy; print(numpy.__version__)')"
    "${PIP[@]}" install cython >/dev/null || die "could not install cython (xtcocotools' build needs it)"
    "${PIP[@]}" install --no-deps --no-build-isolation --no-binary xtcocotools --no-cache-dir \
      --force-reinstall "xtcocotools>=1.14.3" || die "building xtcocotools from source failed"
  fi
  "${PIP[@]}" install --no-deps --no-build-isolation -r "$ROOT/requirements/pose.txt" \
    || die "installing mmpose (requirements/pose.txt) failed"
fi
if has_extra action; then
  "${PIP[@]}" install --no-deps -r "$ROOT/requirements/action.txt" \
    || die "installing mmaction2 (requirements/action.txt) failed"
  ACTION_IMPORT="$(cd / && "$PY" -c 'import mmaction.models' 2>&1 || true)"
  if [[ "$ACTION_IMPORT" == *"mmaction.models.localizers.drn"* ]]; then
    MMACTION_VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("mmaction2").split("+")[0])')"
    MMACTION_DIR="$CACHE_DIR/wheels/mmaction2-$MMACTION_VERSION+nodrn"
    MMACTION_WHEEL="$(ls "$MMACTION_DIR"/mmaction2-*.whl 2>/dev/null | head -n 1 || true)"
    if [ -z "$MMACTION_WHEEL" ]; then
      say "building mmaction2 $MMACTION_VERSION without the DRN localizer its release lacks"
      ABUILD="$(mktemp -d)"
      "${PIP[@]}" download --no-deps --no-binary :all: "mmaction2==$MMACTION_VERSION" -d "$ABUILD" \
        || die "could not download the mmaction2 $MMACTION_VERSION sdist"
      tar -xzf "$ABUILD/mmaction2-$MMACTION_VERSION.tar.gz" -C "$ABUILD"
      ASRC="$ABUILD/mmaction2-$MMACTION_VERSION"
      sed -i -e '/^from \.drn\.drn import DRN$/d' -e "s/, 'DRN'\]/]/" "$ASRC/mmaction/models/localizers/__init__.py"
      sed -i "s/version=get_version(),/version=get_version() + '+nodrn',/" "$ASRC/setup.py"
      { ! grep -q DRN "$ASRC/mmaction/models/localizers/__init__.py" && grep -q "+nodrn" "$ASRC/setup.py"; } \
        || die "could not patch the mmaction2 sdist (layout changed?)"
      ( cd "$ASRC" && "$PY" -m pip --disable-pip-version-check -q wheel --no-deps --no-build-isolation \
          -w "$ABUILD/dist" . ) || die "building the mmaction2 wheel failed"
      mkdir -p "$MMACTION_DIR" && cp "$ABUILD"/dist/mmaction2-*.whl "$MMACTION_DIR"/
      rm -rf "$ABUILD"
      MMACTION_WHEEL="$(ls "$MMACTION_DIR"/mmaction2-*.whl | head -n 1)"
    fi
    "${PIP[@]}" install --no-deps --force-reinstall "$MMACTION_WHEEL" || die "could not install $MMACTION_WHEEL"
  fi
fi

# ---------------------------------------------------------------- 5. self-check
(cd / && "$PY" - "$ROOT" $EXTRA_MODULES) <<'EOF' || die "self-check failed: see the message above"
import importlib, os.path as osp, sys
failed = []
names = ['torch', 'torchvision', 'mmengine', 'mmcv', 'mmdet', 'mmseg', 'mmpretrain', 'mmconv2former']
for name in names + sys.argv[2:]:  # then the extras' modules
    try:
        importlib.import_module(name)
        version = getattr(importlib.import_module(name.split('.')[0]), '__version__', '?')
        print(f'  {name:18s} {version}')
    except Exception as exc:  # report every failure, not only the first
        failed.append(f'import {name}: {type(exc).__name__}: {exc}')
try:
    import torch
    from mmcv.ops import roi_align
    feats = torch.arange(64.).view(1, 1, 8, 8)
    rois = torch.tensor([[0., 0., 0., 4., 4.]])
    out = roi_align(feats, rois, (2, 2), 1.0, 0, 'avg', True)
    assert out.shape == (1, 1, 2, 2) and torch.isfinite(out).all()
    print('  mmcv.ops.roi_align ok')
except Exception as exc:
    failed.append(f'mmcv compiled ops: {type(exc).__name__}: {exc}')
try:
    import mmconv2former
    where = osp.dirname(osp.dirname(osp.abspath(mmconv2former.__file__)))
    if where != sys.argv[1]:
        failed.append(f'mmconv2former imports from {where}, not this checkout {sys.argv[1]}')
except Exception as exc:
    failed.append(f'mmconv2former: {type(exc).__name__}: {exc}')
if failed:
    print('\n'.join(failed), file=sys.stderr)
    sys.exit(1)
EOF
mkdir -p "$STAMP_DIR" && touch "$STAMP_DIR/$STAMP_KEY"
say "ready"
