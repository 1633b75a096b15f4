#!/usr/bin/env bash
# The command for the GPU machine (the device tool's `run`), from the repository root. Everything does not
# fit in one call of 9 minutes; three calls, back to back while the machine is warm (.whl: benchmarks/README.md):
#
#   run(command="RUN_GPU_COMMIT=<commit> RUN_GPU_STEPS='build tests tak' bash benchmarks/run_gpu.sh", carry=[".whl"])    # correctness
#   run(command="RUN_GPU_COMMIT=<commit> RUN_GPU_STEPS='build bench_gpu' bash benchmarks/run_gpu.sh", carry=[".whl"])    # issue 2's tables
#   run(command="RUN_GPU_COMMIT=<commit> RUN_GPU_STEPS='curvature linearized methods kernels' RUN_GPU_BUDGET_S=<min(540, budget_left_s - 60)> bash benchmarks/run_gpu.sh", carry=[".whl"])
#
# (<commit>: `git rev-parse --short HEAD` of the committed tree; the tool's copy has no .git. The session's device
# time counts the machine's start and the gaps too: give the last call the budget that `status` says is left, less
# a minute, at most 540 s, so that the script's own budget, not the tool, ends it)
# Within RUN_GPU_BUDGET_S seconds (default 540, i.e. 9 minutes; at most 570, under the tool's 600). Every step has its own timeout, cut
# to what is left of the budget after the minimum kept for the later steps (MINIMUM below), and a
# step with under 10 s left is skipped:
#   1. installs the carried wheels (.whl/, open_clip and what it needs) into /tmp/site
#   build: the CUDA C++ extension of csrc/ (JIT, ninja), alone: a build killed by a step's timeout would
#      leave torch's lock file and hang every later load (stale locks are removed after each step)
#   2. python3 -m pytest -m gpu tests, then the kernel tests (not marked gpu) under the real Triton compiler
#   3. benchmarks/bench_gpu.py, one section per call (a timeout loses one section, not all)
#   4. benchmarks/bench_curvature.py, benchmarks/bench_linearized.py, benchmarks/bench_methods.py (≤ 60 s; then
#      again on T5-base, --backbone t5)
#   5. python3 -m kfac_kernels, benchmarks/saved_activations.py (what a step keeps for its backward), then
#      tests/test_compile.py (torch.compile through the ops on CUDA)
#   6. python3 -m pytest tests/test_cuda.py: the tak layer on the GPU against the CPU (curvature, training of
#      every method, evaluation); alone with RUN_GPU_STEPS=tak when the default run left it too little time
# Output, everything under $OUT (8 files, the most the device tool returns); results.md and results.json are
# merged again after every step, so a call cut short keeps what it finished:
#   results.md      summary of the steps, then every benchmark table (paste into benchmarks/RESULTS.md)
#   results.json    every benchmark JSON, by script and section
#   run.log         progress and environment;  tests.log (the tests, python3 -m kfac_kernels: its checks
#   and timings, then tests/test_cuda.py), bench_gpu.log, bench_curvature.log, bench_linearized.log, bench_methods.log:
#   each step's full output
# Knobs: RUN_GPU_BUDGET_S; RUN_GPU_STEPS (default "build tests bench_gpu curvature linearized methods kernels tak",
# which the budget cuts);
# BENCH_GPU_SECTIONS (default "quad compressed eigen embedding covariance dual elementwise correction"); PYTHON (default python3).
set -o pipefail
cd "$(dirname "$0")/.." || exit 1

OUT=${OUT:-/tmp/run_gpu_out}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/run_gpu.XXXXXX)  # the scripts' own outputs; merged into $OUT after every step
PY=${PYTHON:-python3}
BUDGET=$(( ${RUN_GPU_BUDGET_S:-540} < 570 ? ${RUN_GPU_BUDGET_S:-540} : 570 ))
STEPS=" ${RUN_GPU_STEPS:-build tests bench_gpu curvature linearized methods kernels tak} "
BENCH_GPU_SECTIONS=${BENCH_GPU_SECTIONS:-quad compressed eigen embedding covariance dual elementwise correction}
START=$SECONDS
SUMMARY="$WORK/summary.md"
printf '| step | status | seconds |\n|---|---|---:|\n' > "$SUMMARY"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}  # where the JIT build and its lock live
unset TRITON_INTERPRET KFAC_KERNELS_BACKEND  # real Triton compiler, automatic backend choice

log() { echo "[run_gpu $((SECONDS - START))s] $*" | tee -a "$OUT/run.log"; }

wants() { [[ $STEPS == *" $1 "* ]]; }

# Seconds kept for each step while the steps before it run (when that step is wanted).
ORDER=(build tests bench_gpu curvature linearized methods kernels tak)
# kernels measures no target: it gets what the others leave
declare -A MINIMUM=([build]=120 [tests]=60 [bench_gpu]=100 [curvature]=75 [linearized]=120 [methods]=60 [kernels]=0 [tak]=120)
reserved_after() {
    local after=$1 seen=0 sum=0 s
    for s in "${ORDER[@]}"; do
        if ((seen)) && wants "$s"; then sum=$((sum + MINIMUM[$s])); fi
        [[ $s == "$after" ]] && seen=1
    done
    echo $sum
}

# step GROUP NAME CAP LOGFILE CMD...: CMD with a timeout of min(CAP, budget left after the later
# groups' minimum and 15 s for merging), its output shown and appended to LOGFILE, its status
# added to the summary.
step() {
    local group=$1 name=$2 cap=$3 logfile=$4
    shift 4
    local left=$((BUDGET - (SECONDS - START) - 15 - $(reserved_after "$group")))
    local limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        log "SKIP $name: the budget of ${BUDGET}s is spent (or kept for the later steps)"
        echo "| $name | skipped: budget spent | 0 |" >> "$SUMMARY"
        return
    fi
    log "START $name (timeout ${limit}s): $*"
    echo "===== $name (timeout ${limit}s): $*" >> "$logfile"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$logfile"
    local rc=${PIPESTATUS[0]} status
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMED OUT after ${limit}s" ;;
        *) status="exit $rc" ;;
    esac
    rm -f "$TORCH_EXTENSIONS_DIR"/*/lock  # a build killed by the timeout leaves it; steps run one at a time
    log "END $name: $status ($((SECONDS - t0))s)"
    echo "| $name | $status | $((SECONDS - t0)) |" >> "$SUMMARY"
    merge > /dev/null  # a call cut short keeps what it finished
}

# merge: the tables and JSON of $WORK written so far into $OUT/results.md and $OUT/results.json
merge() {
    WORK="$WORK" OUT="$OUT" SECTIONS="$BENCH_GPU_SECTIONS" STEPS="$STEPS" "$PY" - << 'EOF' 2>&1 | tee -a "$OUT/run.log"
import json, os
from pathlib import Path

work, out = Path(os.environ["WORK"]), Path(os.environ["OUT"])
steps = os.environ["STEPS"].split()
parts = [("bench_gpu", f"bench_gpu_{s}", "bench_gpu", s) for s in os.environ["SECTIONS"].split()] * ("bench_gpu" in steps)
parts += [(f"bench_{step}", step, f"bench_{step}", None) for step in ("curvature", "linearized", "methods") if step in steps]
parts += [("bench_methods_t5", "methods_t5", "bench_methods_t5", None)] * ("methods" in steps)
md = ["# GPU run (benchmarks/run_gpu.sh)", "", (work / "summary.md").read_text(), ""]
data = {}
for script, folder, stem, section in parts:
    what = script + (f" --only {section}" if section else "")
    path = work / folder / f"{stem}.md"
    if path.exists():
        md += [path.read_text(), ""]
    else:
        md += [f"**{what}: no table** (failed, timed out, skipped or not run yet; see {script}.log)", ""]
    js = work / folder / f"{stem}.json"
    if js.exists():
        entry = json.loads(js.read_text())
        if section:
            data.setdefault(script, {})[section] = entry
        else:
            data[script] = entry
(out / "results.md").write_text("\n".join(md))
(out / "results.json").write_text(json.dumps(data, indent=1))
print(f"results.md: {sum(1 for _ in (out / 'results.md').open())} lines; results.json: {sorted(data)}")
EOF
}

# ---------------------------------------------------------------- environment
log "budget ${BUDGET}s; steps:$STEPS; work folder $WORK"
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
    log "installing the carried wheels: $(cd .whl && echo *.whl)"
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tee -a "$OUT/run.log"; then
        export PYTHONPATH=/tmp/site
    else
        log "WARNING: installing the wheels failed: open_clip rows fall back or fail"
    fi
else
    log "no .whl/ folder: open_clip is missing (bench_curvature falls back to a torch-module ViT; the fast path of bench_linearized cannot run)"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's kfac_kernels and tak, no install needed
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$PY" - << 'EOF' 2>&1
import importlib, platform, torch
from tak._compat import ensure_torchvision_importable
ensure_torchvision_importable()  # as the tests and benchmarks do (a no-op where torchvision matches torch)
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
for name in ("triton", "timm", "transformers", "open_clip"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} ({m.__file__})")
    except Exception as e:
        print(f"{name}: NOT importable ({type(e).__name__}: {e})")
EOF
    echo "commit: ${RUN_GPU_COMMIT:-$(git rev-parse --short HEAD 2> /dev/null || echo "unknown (no .git here; set RUN_GPU_COMMIT)")}"
} | tee -a "$OUT/run.log"

# ---------------------------------------------------------------- the CUDA extension
if wants build; then
    step build "build csrc/ (cuda_ext.load)" 240 "$OUT/tests.log" "$PY" -c \
        "import time; t = time.time(); from kfac_kernels import cuda_ext; cuda_ext.load(); print(f'built or loaded in {time.time() - t:.0f} s')"
fi

# ---------------------------------------------------------------- tests
XDIST=()
"$PY" -c "import xdist" 2> /dev/null && XDIST=(-n 8)  # pytest-xdist: Triton compiles in parallel
if wants tests; then
    step tests "pytest -m gpu" 150 "$OUT/tests.log" "$PY" -m pytest -p no:cacheprovider -q -m gpu "${XDIST[@]}" \
        --ignore=tests/test_cuda.py tests  # test_cuda.py: the last step
    step tests "pytest kernel tests (real Triton)" 150 "$OUT/tests.log" "$PY" -m pytest -p no:cacheprovider -q "${XDIST[@]}" -m "not gpu" \
        tests/test_quadratic.py tests/test_covariance.py tests/test_dual_linear.py tests/test_dual_attention.py \
        tests/test_dual_elementwise.py tests/test_correction.py
fi

# ---------------------------------------------------------------- benchmarks
if wants bench_gpu; then
    for section in $BENCH_GPU_SECTIONS; do
        step bench_gpu "bench_gpu --only $section" 75 "$OUT/bench_gpu.log" \
            "$PY" benchmarks/bench_gpu.py --only "$section" --out "$WORK/bench_gpu_$section"
    done
fi
if wants curvature; then
    step curvature "bench_curvature" 120 "$OUT/bench_curvature.log" "$PY" benchmarks/bench_curvature.py --out "$WORK/curvature"
fi
if wants linearized; then
    step linearized "bench_linearized" 150 "$OUT/bench_linearized.log" "$PY" benchmarks/bench_linearized.py --out "$WORK/linearized"
fi
if wants methods; then
    step methods "bench_methods" 90 "$OUT/bench_methods.log" "$PY" benchmarks/bench_methods.py --out "$WORK/methods"
    step methods "bench_methods --backbone t5" 60 "$OUT/bench_methods.log" "$PY" benchmarks/bench_methods.py \
        --backbone t5 --out "$WORK/methods_t5"
fi
if wants kernels; then  # into tests.log: $OUT holds at most 8 files
    step kernels "python -m kfac_kernels" 45 "$OUT/tests.log" "$PY" -m kfac_kernels
    step kernels "saved_activations" 45 "$OUT/tests.log" "$PY" benchmarks/saved_activations.py --layers 12 --batch 128
    step kernels "pytest tests/test_compile.py (torch.compile, CUDA)" 120 "$OUT/tests.log" "$PY" -m pytest -p no:cacheprovider -q \
        tests/test_compile.py
fi
if wants tak; then
    step tak "pytest tests/test_cuda.py" 240 "$OUT/tests.log" "$PY" -m pytest -p no:cacheprovider -q "${XDIST[@]}" tests/test_cuda.py
fi

# ---------------------------------------------------------------- results.md, results.json
log "merging the outputs into $OUT/results.md and $OUT/results.json"
merge
rm -rf "$WORK"
log "done in $((SECONDS - START))s; files in \$OUT: $(cd "$OUT" && echo *)"
