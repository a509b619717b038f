#!/usr/bin/env bash
# Everything a lent GPU machine should run for the GPU work, as one command
# that fits one device call (at most about 8 minutes, the machine's start-up
# not counted, so that a 15-minute device budget leaves room to start again
# and rerun something shorter) and leaves its logs in OUTDIR:
#   1. mmengine and its small pure-Python needs from ./wheelhouse (made on a
#      connected machine by tools/analysis/make_wheelhouse.sh), installed
#      into a folder of their own;
#   2. tools/dev/depthwise_conv_probe.py: the depthwise convolutions per
#      direction, cuDNN against PyTorch's kernel and the Triton candidate;
#   3. tools/analysis/gpu_benchmark.py: correctness, where the time goes, and
#      the speed and memory table;
#   4. the CUDA-only tests (tests/test_gpu_paths.py -k cuda), never run
#      elsewhere, in what time is left (CUDA_TESTS_TIMEOUT).
# Each step runs whatever the one before it did; the logs and JSON files are
# written as they go, so a run stopped from outside leaves what it measured.
#
#   bash tools/dev/gpu_session.sh OUTDIR           # on the GPU machine
#   bash tools/dev/gpu_session.sh OUTDIR --cpu     # every step at tiny shapes on a CPU, first
#
# Budgets: PROBE_BUDGET (default 60 s, the probe's checks and timings),
# BENCHMARK_BUDGET (default 280 s, the benchmark's own time guard) and
# CUDA_TESTS_TIMEOUT (default 70 s), with hard limits 40 s past the first two:
# about 7 minutes in a normal run, 8.5 at most; give the device call a
# timeout of 520 s.
set -uo pipefail
out=${1:?usage: gpu_session.sh OUTDIR [--cpu]}
cpu=0
[ "${2:-}" = "--cpu" ] && cpu=1
cd "$(dirname "$0")/../.."
mkdir -p "$out"
site=$(mktemp -d)
status=0

if [ ! -d wheelhouse ]; then
    echo "no ./wheelhouse: run bash tools/analysis/make_wheelhouse.sh wheelhouse on a connected machine" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" --find-links wheelhouse \
    mmengine addict yapf termcolor platformdirs || exit 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE

{ date -u; nvidia-smi 2>&1 || echo "no nvidia-smi"; python3 -c 'import torch; print(torch.__version__,
torch.version.cuda, torch.backends.cudnn.version())'; } > "$out/machine.txt"

if [ $cpu = 1 ]; then
    TRITON_INTERPRET=1 python3 tools/dev/depthwise_conv_probe.py --device cpu --tiny \
        --json "$out/depthwise.json" 2>&1 | tee "$out/depthwise.log" || status=1
    python3 tools/analysis/gpu_benchmark.py --device cpu --tiny --json "$out/gpu_benchmark.json" 2>&1 \
        | tee "$out/gpu_benchmark.log" || status=1
else
    # Each tool keeps to its budget; the hard limits behind them (budget + 40 s)
    # only stop one that a single long compilation carried past it.
    probe_budget=${PROBE_BUDGET:-60}
    benchmark_budget=${BENCHMARK_BUDGET:-280}
    rm -f "$out/depthwise.json"  # the gate below reads this run's, or none
    timeout $((probe_budget + 40)) python3 tools/dev/depthwise_conv_probe.py --budget "$probe_budget" \
        --json "$out/depthwise.json" 2>&1 | tee "$out/depthwise.log" || status=1
    # The benchmark times depthwise_impl='triton' only if the probe found the
    # package's own block shapes correct and none raised: a kernel that
    # faults can leave its process's GPU context unusable, and with it the
    # rest of the run.
    triton_flag=""
    if ! python3 -c 'import json, sys; sys.exit(not json.load(open(sys.argv[1])).get("triton_default_ok"))' \
            "$out/depthwise.json" 2>/dev/null; then
        triton_flag="--no-triton"
        echo "# the probe did not pass the package's Triton kernels: gpu_benchmark.py runs with --no-triton" \
            | tee -a "$out/depthwise.log"
    fi
    timeout $((benchmark_budget + 40)) python3 tools/analysis/gpu_benchmark.py --budget "$benchmark_budget" \
        $triton_flag --json "$out/gpu_benchmark.json" 2>&1 | tee "$out/gpu_benchmark.log" || status=1
fi
# (On a CPU these skip: the command itself is what --cpu checks.) -v prints
# each test's result as it ends, so a run the timeout stops still says which passed.
timeout "${CUDA_TESTS_TIMEOUT:-70}" python3 -m pytest -v -p no:cacheprovider -rs tests/test_gpu_paths.py \
    -k cuda 2>&1 | tee "$out/cuda_tests.log" || status=1
rm -rf "$site"
exit $status
