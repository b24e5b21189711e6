#!/usr/bin/env bash
# The GPU path, run for real in one bounded command (docs/gpu.md has the results and the device call):
#
#   bash scripts/gpu_check.sh                        # every step; Markdown report + log under $OUT
#   GPU_STEPS="setup tests" GPU_TESTS="tests/test_gpu_path.py tests/test_new.py" bash scripts/gpu_check.sh
#
# Steps (GPU_STEPS, run in the order given; by default setup tests kmeans trt train):
#   setup   carried wheels (WHEELS/*.whl) -> pip --target SITE; libKMCUDA built from its sdist
#           (WHEELS/libKMCUDA-*.tar.gz) in the background; versions of everything involved
#   tests   the suite's GPU tests (GPU_TESTS: pytest files or node ids)
#   kmeans  `lutnn kmeans-bench`: every engine on the same calibration rows of a converted DeiT-Tiny
#   train   teacher + LUT retraining with AMP (bf16) on CUDA, the LUT retraining under `torchrun
#           --nproc_per_node=1` (NCCL) and on the CPU, then `train.py --resume`; step times from the history files
#   trt     tensorrt_op.py dense + LUT at each batch size in TRT_BATCHES, and eager latency on the device
# Without CUDA every step still runs (tests skip, CPU numbers, one-line errors): that is the dry run.
# Each step is time-boxed and the whole script stops starting steps after BUDGET_S seconds.
set -u
export PYTHONUNBUFFERED=1 LUTNN_NO_PROGRESS=1

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PY:-python3}
OUT=${OUT:-$ROOT/gpu_check_out}
WHEELS=${WHEELS:-$ROOT/.gpu/whl}
SITE=${SITE:-/tmp/gpu_check_site}
WORK=${WORK:-/tmp/gpu_check_work}
BUDGET_S=${BUDGET_S:-300}
GPU_STEPS=${GPU_STEPS:-setup tests kmeans trt train}
GPU_TESTS=${GPU_TESTS:-tests/test_gpu_path.py tests/test_tensorrt_op.py tests/test_train.py::test_resume_continues_exactly \
tests/test_kmeans_calibrate.py::test_auto_on_a_gpu_without_kmcuda_warns_in_one_line}
KMEANS_CONFIG=${KMEANS_CONFIG:-configs/deit_tiny_digits.yaml}
KMEANS_ENGINE_S=${KMEANS_ENGINE_S:-40}
# full DeiT-Tiny (patch 16, 224x224, 12 blocks), random weights; digits upsampled as calibration input
KMEANS_SET=${KMEANS_SET:-data.image_size=224 model.kwargs.img_size=224 model.kwargs.patch_size=16 data.train_limit=512}
TRAIN_CONFIG=${TRAIN_CONFIG:-configs/deit_tiny_digits.yaml}
# two epochs: the first of a process includes CUDA warm-up, the second is the step time to compare
TRAIN_SET=${TRAIN_SET:-teacher.epochs=2 train.epochs=2 init.backend=torch log.plot=false}
TRT_MODEL=${TRT_MODEL:-deit_tiny_patch16_224}
TRT_BATCHES=${TRT_BATCHES:-1 32}
TRT_REPEATS=${TRT_REPEATS:-50}

mkdir -p "$OUT" "$WORK" "$SITE"
REPORT=$OUT/gpu_report.md
LOG=$OUT/gpu_check.log
: >"$LOG"
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
DEADLINE=$((SECONDS + BUDGET_S))
SUMMARY=()
CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>>"$LOG" || echo 0)
DEV=$([ "$CUDA" = 1 ] && echo cuda || echo cpu)

md() { printf '%s\n' "$@" >>"$REPORT"; }
record() { SUMMARY+=("| $1 | $2 | $3 | $4 |"); echo "[gpu_check] $1: $2 ($3 s) $4"; }
sets() { for s in $1; do printf -- '--set\n%s\n' "$s"; done; }

# run NAME LIMIT CMD...: time-boxed (LIMIT or what is left of the budget), output appended to the log
# and kept in $WORK/NAME.out; returns the command's status (124: timed out).
run() {
    local name=$1 limit=$2 left=$((DEADLINE - SECONDS)) rc t0=$SECONDS
    shift 2
    ((limit > left)) && limit=$left
    if ((limit < 5)); then
        echo "budget spent" >"$WORK/$name.out"
        return 125
    fi
    echo "=== $name (limit ${limit}s): $*" >>"$LOG"
    timeout -k 5 "$limit" "$@" >"$WORK/$name.out" 2>&1
    rc=$?
    cat "$WORK/$name.out" >>"$LOG"
    echo "=== $name: rc=$rc in $((SECONDS - t0))s" >>"$LOG"
    return $rc
}

status_of() { case $1 in 0) echo ok ;; 124 | 137) echo "timed out" ;; 125) echo "not run (budget)" ;; *) echo "failed (rc $1)" ;; esac; }

# ------------------------------------------------------------------------------------------ setup
build_kmcuda() {  # libKMCUDA from its sdist with the local nvcc; the .so lands in $SITE
    local sdist src arch inc pyinc npinc pids=() f rc=0
    export PATH=$PATH:${CUDA_HOME:-/usr/local/cuda}/bin
    sdist=$(ls "$WHEELS"/libKMCUDA-*.tar.gz 2>/dev/null | head -1)
    [ -n "$sdist" ] || { echo "no libKMCUDA sdist in $WHEELS"; return 3; }
    command -v nvcc >/dev/null || { echo "nvcc not found"; return 3; }
    rm -rf "$WORK/kmcuda" && mkdir -p "$WORK/kmcuda" && tar -xzf "$sdist" -C "$WORK/kmcuda" --strip-components=1
    src=$WORK/kmcuda
    # python.cc writes `else if PyTuple_Check(x) {`, which compiled only while CPython's macro had parentheses
    sed -i 's/else if PyTuple_Check(init_obj) {/else if (PyTuple_Check(init_obj)) {/' "$src/python.cc"
    arch=$($PY -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))" 2>/dev/null || echo 90)
    inc=$(dirname "$(find "${CUDA_HOME:-/usr/local/cuda}/include" $($PY -c "import nvidia; print(*nvidia.__path__)" 2>/dev/null) \
        -maxdepth 3 -name curand_kernel.h 2>/dev/null | head -1)")
    pyinc=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
    npinc=$($PY -c "import numpy; print(numpy.get_include())")
    [ -f "$pyinc/Python.h" ] || { echo "Python.h not found in $pyinc (no Python headers)"; return 3; }
    echo "nvcc $(nvcc --version | tail -2 | head -1); sm_$arch; curand headers: $inc; $pyinc"
    cd "$src" || return 3
    for f in kmeans knn transpose; do
        nvcc -O3 -std=c++17 -arch=sm_$arch -Xcompiler -fPIC,-fopenmp -DCUDA_ARCH=$arch -D_MWAITXINTRIN_H_INCLUDED \
            -D_FORCE_INLINES -I"$inc" -c $f.cu -o $f.o &
        pids+=($!)
    done
    for f in kmcuda python; do
        g++ -O3 -std=c++17 -fPIC -fopenmp -DCUDA_ARCH=$arch -I"${CUDA_HOME:-/usr/local/cuda}/include" -I"$pyinc" \
            -I"$npinc" -c $f.cc -o $f.o &
        pids+=($!)
    done
    for f in "${pids[@]}"; do wait "$f" || rc=1; done
    ((rc == 0)) || { echo "compilation failed"; return 1; }
    nvcc -shared -Xcompiler -fopenmp -o libKMCUDA.so ./*.o && cp libKMCUDA.so "$SITE/" && echo "built $SITE/libKMCUDA.so"
}

step_setup() {
    local n rc
    n=$(ls "$WHEELS"/*.whl 2>/dev/null | wc -l)
    if ((n > 0)); then
        run pip 90 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$WHEELS"/*.whl
        rc=$?
        record "setup: wheels" "$(status_of $rc)" "-" "$n wheels from $WHEELS into $SITE"
    else
        record "setup: wheels" "none" "-" "no wheels in $WHEELS"
    fi
    # the CUDA build runs while the tests do (it is CPU work); the kmeans step waits for it
    export -f build_kmcuda
    export WHEELS WORK SITE PY
    (run kmcuda 180 bash -c build_kmcuda; echo $? >"$WORK/kmcuda.rc") &
    KMCUDA_PID=$!
    run versions 90 $PY - <<'EOF'
import importlib, importlib.util, platform, subprocess, torch

def ver(mod):
    if importlib.util.find_spec(mod) is None:
        return "not installed"
    try:
        return getattr(importlib.import_module(mod), "__version__", "importable")
    except Exception as err:  # report why, e.g. a wheel built for another torch/CUDA
        return f"import fails: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"

def cmd(*args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"n/a ({err})"

rows = [("python", platform.python_version()), ("torch", torch.__version__), ("torch CUDA", torch.version.cuda),
        ("cuDNN", torch.backends.cudnn.version()), ("NCCL", ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "-")]
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    rows += [("GPU", f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"),
             ("driver", cmd("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"))]
else:
    rows += [("GPU", "none visible to torch")]
rows += [("nvcc", cmd("nvcc", "--version").splitlines()[-1] if cmd("nvcc", "--version") else "not found")]
rows += [(m, ver(m)) for m in ("numpy", "timm", "faiss", "torch_tensorrt", "tensorrt", "thop")]
print("| component | version |\n|---|---|")
print("\n".join(f"| {k} | {v} |" for k, v in rows))
EOF
    rc=$?
    md "## 1. Setup and versions" "" "$(cat "$WORK/versions.out")" ""
    record "setup: versions" "$(status_of $rc)" "-" "GPU: $(grep '^| GPU' "$WORK/versions.out" | cut -d'|' -f3 | xargs)"
}

wait_kmcuda() {  # the kmcuda build's outcome, and which engine `auto` picks with or without it
    local rc probe reason
    [ -n "${KMCUDA_PID:-}" ] || return 0
    wait "$KMCUDA_PID"
    KMCUDA_PID=
    rc=$(cat "$WORK/kmcuda.rc" 2>/dev/null || echo 1)
    reason=$(grep -m3 -E "error|Error|not found|failed|budget" "$WORK/kmcuda.out" | head -3 | tr '\n' ' ')
    run kmcuda_probe 60 $PY - <<'EOF'
import warnings

import numpy as np

import lutnn
from lutnn.kmeans import available_backends, resolve_backend

try:
    from libKMCUDA import kmeans_cuda

    c, a = kmeans_cuda(np.random.default_rng(0).random((20000, 8), dtype=np.float32), 16, seed=0, verbosity=0)
    print(f"kmcuda smoke: centroids {c.shape}, {len(set(a.tolist()))} clusters used")
except Exception as err:
    print(f"kmcuda smoke: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    engine = resolve_backend("auto")
print(f"available engines: {available_backends()}; auto -> {engine}")
print("auto warning: " + ("; ".join(str(w.message) for w in caught) or "none"))
EOF
    probe=$?
    md "### libKMCUDA 6.2.3 from the sdist (nvcc, sm_XY of this GPU)" "" '```' "$(tail -5 "$WORK/kmcuda.out")" \
        "$(cat "$WORK/kmcuda_probe.out")" '```' ""
    record "setup: kmcuda build" "$(status_of "$rc")" "-" "${reason:-$(grep -m1 'kmcuda smoke' "$WORK/kmcuda_probe.out")}"
    record "setup: auto engine" "$(status_of $probe)" "-" "$(grep -m1 'auto ->' "$WORK/kmcuda_probe.out" | sed 's/.*auto -> //') / $(grep -m1 'auto warning' "$WORK/kmcuda_probe.out")"
}

# ------------------------------------------------------------------------------------------ tests
step_tests() {
    local rc t0=$SECONDS line
    # shellcheck disable=SC2086
    run tests 150 $PY -m pytest -q -rs -p no:cacheprovider $GPU_TESTS
    rc=$?
    line=$(grep -E "(passed|failed|error|skipped)" "$WORK/tests.out" | grep -E " in [0-9.]+s" | tail -1)
    md "## 2. GPU tests" "" "\`pytest -q -rs $GPU_TESTS\`" "" '```' \
        "$(grep -E '^(SKIPPED|FAILED|ERROR|XFAIL)|passed|failed' "$WORK/tests.out" | tail -30)" '```' ""
    if ((rc != 0 && rc != 124)); then md '<details><summary>failure output</summary>' "" '```' "$(tail -80 "$WORK/tests.out")" '```' '</details>' ""; fi
    record "tests" "$(status_of $rc)" $((SECONDS - t0)) "${line:-no pytest summary}"
}

# ------------------------------------------------------------------------------------------ kmeans
step_kmeans() {  # one process per engine, each time-boxed: a slow engine cannot cost the others their numbers
    local rc t0=$SECONDS engines="torch faiss" e last notes=()
    wait_kmcuda
    grep -q "kmcuda smoke: centroids" "$WORK/kmcuda_probe.out" 2>/dev/null && engines="torch kmcuda faiss"
    mapfile -t extra < <(sets "$KMEANS_SET")
    md "## 3. k-means engines on the same calibration rows" "" \
        "\`lutnn kmeans-bench --config $KMEANS_CONFIG --set device=$DEV $(printf '%s ' "${extra[@]}")--backends ENGINE\`," \
        "one process per engine ($KMEANS_ENGINE_S s each at most). Each captures the same rows (same seed, weights and" \
        "batches; the bracketed random-prototype error, a function of the rows, matches across engines). torch runs on" \
        "the model's device, faiss on the CPU, kmcuda on the GPU from host arrays; times include host<->device copies," \
        "and the first layer's its warm-up." ""
    for e in $engines; do
        run "kmeans_$e" "$KMEANS_ENGINE_S" env -u LUTNN_NO_PROGRESS $PY -m lutnn kmeans-bench --config "$KMEANS_CONFIG" \
            --set device=$DEV --set output_dir="$WORK/kmeans_run" "${extra[@]}" --backends "$e" --output "$WORK/kmeans_$e.md"
        rc=$?
        if [ -s "$WORK/kmeans_$e.md" ]; then
            md "### $e" "" "$(cat "$WORK/kmeans_$e.md")" ""
            notes+=("$(grep -m1 'total / mean' "$WORK/kmeans_$e.md" | tr -d '*' | awk -F'|' -v e="$e" '{printf "%s %s s, error %s", e, $6, $7}')")
        else  # the last progress bar says how far it got (layer i of n)
            last=$(tr '\r' '\n' <"$WORK/kmeans_$e.out" | grep -E 'k-means \(|calibration|Error' | tail -1 | cut -c1-120)
            md "### $e" "" "$(status_of $rc) after $KMEANS_ENGINE_S s; last progress: \`${last:-none}\`" ""
            notes+=("$e $(status_of $rc): ${last:-no progress}")
        fi
    done
    record "kmeans" "$(printf '%s\n' "${notes[@]}" | grep -q 'timed out\|failed' && echo 'see notes' || echo ok)" \
        $((SECONDS - t0)) "$(printf '%s; ' "${notes[@]}")"
}

# ------------------------------------------------------------------------------------------ train
step_train() {
    local rc t0=$SECONDS amp=$WORK/train_amp ddp=$WORK/train_ddp cpu=$WORK/train_cpu notes=() pg=gloo
    [ "$DEV" = cuda ] && pg=NCCL
    mapfile -t extra < <(sets "$TRAIN_SET")
    rm -rf "$amp" "$ddp" "$cpu"
    run train_amp 120 $PY pipeline.py --config "$TRAIN_CONFIG" --set device=$DEV --set output_dir="$amp" "${extra[@]}"
    rc=$?
    notes+=("AMP: $(status_of $rc)")
    if [ -f "$amp/prototypes.safetensors" ]; then
        # the same teacher and prototypes: LUT retraining under torchrun (process group even for one process)
        mkdir -p "$ddp" && cp "$amp/teacher.pt" "$amp/prototypes.safetensors" "$ddp/"
        run train_ddp 90 env NCCL_DEBUG=VERSION $PY -m torch.distributed.run --standalone --nproc_per_node=1 train.py \
            --config "$TRAIN_CONFIG" --set device=$DEV --set output_dir="$ddp" "${extra[@]}"
        rc=$?
        notes+=("torchrun: $(status_of $rc), $pg $(grep -o -m1 'NCCL version [^ ]*' "$WORK/train_ddp.out" | cut -d' ' -f3)")
        run train_resume 60 $PY train.py --config "$TRAIN_CONFIG" --set device=$DEV --set output_dir="$amp" "${extra[@]}" \
            --resume --no-eval
        rc=$?
        notes+=("train.py --resume: $(status_of $rc), $(grep -m1 -o 'has finished all.*skipping' "$WORK/train_resume.out")")
        # dense and LUT epochs on the CPU: the teacher is trained again, the prototypes are the AMP run's (timing only)
        mkdir -p "$cpu" && cp "$amp/prototypes.safetensors" "$cpu/"
        run train_cpu 120 $PY pipeline.py --config "$TRAIN_CONFIG" --set device=cpu --set output_dir="$cpu" "${extra[@]}" \
            --stages teacher,train
        notes+=("CPU: $(status_of $?)")
    fi
    run train_table 30 $PY - "$amp" "$ddp" "$cpu" <<'EOF'
import json, sys
from pathlib import Path

import torch

names = {0: "AMP bf16, single process", 1: "torchrun --nproc_per_node=1 (DDP)", 2: "CPU, fp32"}
print("| run | stage | device | steps | train s | ms/step | val top-1 % |\n|---|---|---|---:|---:|---:|---:|")
for i, root in enumerate(map(Path, sys.argv[1:])):
    for stage in ("teacher", "lut"):
        path = root / f"history_{stage}.json"
        if not path.is_file():
            continue
        for r in json.loads(path.read_text()):
            dev = "cpu" if i == 2 else ("cuda" if torch.cuda.is_available() else "cpu")
            print(f"| {names[i]} | {stage} epoch {r['epoch']} | {dev} | {r['steps']} | {r['train_seconds']:.2f} | "
                  f"{1e3 * r['train_seconds'] / r['steps']:.1f} | {r['val_top1']:.2f} |")
print(f"\ntorch.get_num_threads() = {torch.get_num_threads()} for the CPU run.")
EOF
    md "## 4. Training: AMP on CUDA, torchrun/NCCL, CPU, resume" "" \
        "Config \`$TRAIN_CONFIG\` with \`$(printf -- '--set %s ' $TRAIN_SET)\` (DeiT-Tiny widths, 12 blocks, scikit-learn digits" \
        "at 16x16: no dataset files needed). Each epoch's train time excludes evaluation; the first epoch of a process" \
        "includes CUDA warm-up. The torchrun and CPU runs start from the AMP run's prototypes (the CPU run trains its" \
        "own teacher first). The exact-resume check is the test \`test_resume_continues_exactly[cuda]\` (section 2)." "" \
        "$(cat "$WORK/train_table.out")" "" "$(printf -- '- %s\n' "${notes[@]}")" ""
    for f in train_amp train_ddp train_resume train_cpu; do
        [ -f "$WORK/$f.out" ] && md "<details><summary>$f (last lines)</summary>" "" '```' "$(tail -12 "$WORK/$f.out")" '```' '</details>' ""
    done
    record "train" "$(grep -q 'failed\|timed out\|not run' <<<"${notes[*]}" && echo 'see notes' || echo ok)" $((SECONDS - t0)) "$(printf '%s; ' "${notes[@]}" | cut -c1-200)"
}

# ------------------------------------------------------------------------------------------ trt
step_trt() {
    local rc t0=$SECONDS bs msgs=()
    for bs in $TRT_BATCHES; do
        run "trt_bs$bs" 120 $PY tensorrt_op.py --model "$TRT_MODEL" --batch-size "$bs" --repeats "$TRT_REPEATS" --output "$WORK/trt_bs$bs.md"
        rc=$?
        msgs+=("batch $bs: rc $rc: $(head -c 300 "$WORK/trt_bs$bs.out" | tail -3)")
    done
    # eager dense vs LUT on this device through the same benchmark (its TensorRT rows say why they failed)
    run trt_eager 120 $PY - "$TRT_MODEL" "$TRT_REPEATS" $TRT_BATCHES <<'EOF'
import sys

import torch

from lutnn.tools import trt

name, repeats, batches = sys.argv[1], int(sys.argv[2]), [int(b) for b in sys.argv[3:]]
dense, lut, size = trt.load_models(model_name=name)
dev = "cuda" if torch.cuda.is_available() else "cpu"
for bs in batches:
    x = torch.randn(bs, *size, device=dev)
    rows = trt.benchmark({"dense": dense, "lut": lut}, x, warmup=5, repeats=repeats)
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
    print(f"\n**batch {bs}**\n\n" + trt.latency_markdown(rows, f"Device: {gpu}.", f"Input {tuple(x.shape)} fp32; median of {repeats} calls."))
EOF
    rc=$?
    md "## 5. tensorrt_op.py (DeiT-Tiny, dense and LUT)" "" '```' "$(printf '%s\n' "${msgs[@]}")" '```' ""
    for bs in $TRT_BATCHES; do [ -s "$WORK/trt_bs$bs.md" ] && md "$(cat "$WORK/trt_bs$bs.md")" ""; done
    md "Eager latency on the same device (\`lutnn.tools.trt.benchmark\`):" "" "$(cat "$WORK/trt_eager.out")" ""
    record "trt" "$(status_of $rc)" $((SECONDS - t0)) "$(head -c 160 "$WORK/trt_bs${TRT_BATCHES%% *}.out" | head -1)"
}

{
    echo "# GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "Host: $(hostname), $(nproc) CPUs. Command: \`GPU_STEPS=\"$GPU_STEPS\" bash scripts/gpu_check.sh\`."
    echo
} >"$REPORT"
for s in $GPU_STEPS; do
    case $s in
        setup) step_setup ;;
        tests) step_tests ;;
        kmeans) step_kmeans ;;
        train) step_train ;;
        trt) step_trt ;;
        *) record "$s" "unknown step" 0 "known: setup tests kmeans train trt" ;;
    esac
done
[ -n "${KMCUDA_PID:-}" ] && wait_kmcuda
TABLE=$(printf '| step | status | s | summary |\n|---|---|---:|---|\n'; printf '%s\n' "${SUMMARY[@]}")
md "## Summary" "" "$TABLE" "" "Total $SECONDS s."
echo
echo "$TABLE"
echo "report: $REPORT ($SECONDS s)"
