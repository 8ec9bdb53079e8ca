#!/usr/bin/env bash
# Proves and measures the CUDA path in one command, in at most 8 minutes on one GPU: exactness
# against the CPU, generator throughput (eager, CUDA graphs, torch.compile), the whole pipeline per
# photo, HTTP at 32 clients, the GPU JPEG codec, a 720p clip through the clip flow, and a TensorRT
# engine where its wheels are installed. bench/gpu/__init__.py's docstring lists the sections.
#
#   bench/gpu.sh           # on a GPU machine; exits 3 at once if CUDA is not available
#   bench/gpu.sh --dry     # (or GPU_DRY=1) every section on the CPU with tiny sizes, in seconds
#
# Writes under $OUT when set, else bench/results/gpu/: gpu.json (or gpu-dry.json), the console
# output as gpu.log (gpu-dry.log), nvidia-smi.txt, and the HTTP server's log. The JSON is rewritten
# after every section, so a run cut short keeps what it measured.
#
# Python: $PYTHON, else .venv/bin/python, else python3. It needs a CUDA build of torch, the project's
# dependencies (pip install -e .), httpx, and scikit-image and matplotlib for the photos; optional, as
# their sections say: torchvision (nvJPEG), triton (torch.compile), tensorrt and the onnx extra (TensorRT).
set -euo pipefail

cd "$(dirname "$0")/.."

dry=${GPU_DRY:-0}
for arg in "$@"; do
    case $arg in
        --dry) dry=1 ;;
        -h | --help)
            sed -n '2,16p' "$0"
            exit 0
            ;;
        *)
            echo "usage: bench/gpu.sh [--dry]" >&2
            exit 2
            ;;
    esac
done

out=${OUT:-bench/results/gpu}
mkdir -p "$out"
python=${PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi

args=(--out "$out")
suffix=""
if [[ $dry == 1 ]]; then
    args+=(--dry)
    suffix="-dry"
else
    # Loudly, before anything is built: the numbers would mean nothing on a CPU.
    if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "error: CUDA was requested but is not available to $python; bench/gpu.sh --dry runs on the CPU" >&2
        exit 3
    fi
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
    fi
fi

# python -m bench.gpu keeps its sections within 420 s (imports and set-up come on top) and skips what
# would not fit; this is the backstop, within the 8 minutes.
limit=$([[ $dry == 1 ]] && echo 170 || echo 460)
status=0
timeout --kill-after=10 "$limit" "$python" -m bench.gpu "${args[@]}" 2>&1 | tee "$out/gpu$suffix.log" || status=$?
if [[ $status == 124 || $status == 137 ]]; then
    echo "error: python -m bench.gpu ran past ${limit} s and was stopped; $out/gpu$suffix.json has what it finished" >&2
fi
exit "$status"
