#!/usr/bin/env bash
# The whole device check, run ON the GPU machine (which has CUDA, torch, cmake and ninja but no
# package registry), from a clean tree, in under 8 minutes:
#
#   here:   tools/gpu_prepare.sh                      # the .deb files, into .gpu/
#   device: run(command="GPU_CHECK_COMMIT=<sha> bash tools/gpu_check.sh",
#               carry=[".gpu"], timeout_s=540)
#
# Stages (each with its own time limit inside a total budget; a failed stage is recorded and the
# script goes on, so one failure loses nothing else):
#   env        GPU, driver, torch, nvcc, tools
#   unpack     dpkg -x each .gpu/*.deb into a prefix under /tmp (never /)
#   configure  CMake with CUDA (sm_90) against the machine's torch and the unpacked prefix
#   build      ninja -j16: the kernels, libaviary, the CLI and the gpu suite
#   build_tests  the unit suite (the ops on CUDA, the NCCL step): built in the background while
#              the gpu tests and compute-sanitizer run; this stage waits for it
#   gpu_tests  the gpu label's tests (kernels vs their CPU references)
#   op_tests   the ops on CUDA (aviary_unit_tests, *Cuda* filters of each kernel family)
#   nccl_step  a data-parallel step over the NCCL engine on 1 GPU (DistNcclCuda.*), then
#              `aviary train` under `aviary launch --spawn direct` (torchrun-style, backend
#              nccl): 3 steps of ddp, then of fsdp gathering and reducing in bf16
#   sanitizer  compute-sanitizer memcheck + racecheck on each family's small-shape gpu tests
#   bench      aviary bench kernels --json (ceilings, each op vs PyTorch)
#   train      a short bf16 training run of the quickstart-size model, ops.impl torch vs aviary
#   report     $OUT/gpu_report.json and $OUT/validated.json
#
# $OUT/validated.json is kernels/validated.json updated for this GPU's architecture: a kernel whose
# gpu tests, op tests and sanitizer runs all passed is recorded (gpu, sm, date, commit, tests);
# one that failed any of them is removed for this architecture. Commit it as kernels/validated.json.
#
# Knobs (environment):
#   OUT                    where results go (the device tool sets it; default /tmp/aviary-gpu-out)
#   GPU_CHECK_COMMIT       the commit being checked (default: git rev-parse HEAD, else "unknown")
#   GPU_CHECK_BUDGET_S     total budget in seconds (default 500; the call's timeout_s is 540)
#   GPU_CHECK_BUILD_DIR    build directory (default /tmp/aviary-gpu-build: a clean build)
#   GPU_CHECK_PREFIX       where the .debs are unpacked (default /tmp/aviary-gpu-prefix)
#   GPU_CHECK_DEBS         folder of .deb files (default .gpu)
#   GPU_CHECK_PYTHON       python with torch (default python3)
#   GPU_CHECK_JOBS         ninja jobs (default 16)
#   GPU_CHECK_TARGETS      first build targets (default "aviary_cli aviary_gpu_tests")
#   GPU_CHECK_TEST_TARGETS the background build's targets (default aviary_unit_tests)
#   GPU_CHECK_SKIP         stages to skip, space-separated (e.g. "unpack configure build" to
#                          reuse GPU_CHECK_BUILD_DIR)
#   GPU_CHECK_ALLOW_NO_GPU 1: a plumbing run on a machine without a GPU (the gpu tests skip, bench
#                          and train run on CPU, nothing is validated)
#   GPU_CHECK_SANITIZER_EXCLUDE  gtest patterns of large-shape tests the sanitizer skips
#   GPU_CHECK_SANITIZER_RUN_S    the limit of each sanitizer run (default 95, at most 105; the runs go
#                                in parallel, so a GPU in exclusive-process mode reports them unavailable)
# The stage_* functions are called indirectly (--stage NAME).
# shellcheck disable=SC2317
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)

OUT=${OUT:-/tmp/aviary-gpu-out}
WORK=${GPU_CHECK_WORK:-/tmp/aviary-gpu-work}
BUDGET=${GPU_CHECK_BUDGET_S:-500}
BUILD=${GPU_CHECK_BUILD_DIR:-/tmp/aviary-gpu-build}
PREFIX=${GPU_CHECK_PREFIX:-/tmp/aviary-gpu-prefix}
DEBS=${GPU_CHECK_DEBS:-.gpu}
PY=${GPU_CHECK_PYTHON:-python3}
JOBS=${GPU_CHECK_JOBS:-16}
TARGETS=${GPU_CHECK_TARGETS:-aviary_cli aviary_gpu_tests}
TEST_TARGETS=${GPU_CHECK_TEST_TARGETS:-aviary_unit_tests}
SKIP=" ${GPU_CHECK_SKIP:-} "
NO_GPU_OK=${GPU_CHECK_ALLOW_NO_GPU:-0}
SAN_RUN_LIMIT=${GPU_CHECK_SANITIZER_RUN_S:-95}
# Each run must end (with timeout's 5 s kill-after) before the stage's 120 s, or the stage's own
# limit would take every run's result with it.
((SAN_RUN_LIMIT > 105)) && SAN_RUN_LIMIT=105
SAN_EXCLUDE=${GPU_CHECK_SANITIZER_EXCLUDE:-*_r64_*:*_r4801*:*_c4096_*:*_c4099_*:*_c8195_*:*_c16384*:*_c32768*:*_s1023_*:*_s1024*:*_k1000_*:*_s256_*:*_s257_*:*_s511_*:*_q200_*:*_q300_*:*_v1023_*:*_v8195_*:*_t113*:*_t1023*:*varlen*:*Large*:*large*}
MULTIARCH=x86_64-linux-gnu
export OUT WORK BUILD PREFIX PY ROOT DEBS NO_GPU_OK SAN_EXCLUDE SAN_RUN_LIMIT MULTIARCH TARGETS TEST_TARGETS JOBS

# The unpacked prefix and CUDA, for every stage.
export PATH="/usr/local/cuda/bin:$PREFIX/usr/bin:$PATH"
# nvcc where CMake looks first, wherever this image put it.
if [[ -z "${CUDACXX:-}" ]]; then
  nvccs=(/usr/local/cuda*/bin/nvcc)
  CUDACXX=$(command -v nvcc) || CUDACXX=${nvccs[0]}
  [[ -x "$CUDACXX" ]] && export CUDACXX
fi
# Output as it happens: a stage killed at its limit keeps what it printed.
export PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH="$PREFIX/usr/lib/$MULTIARCH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PKG_CONFIG_LIBDIR="$PREFIX/usr/lib/$MULTIARCH/pkgconfig:$PREFIX/usr/share/pkgconfig"
unset PKG_CONFIG_PATH

log() { printf '[gpu_check %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# ------------------------------------------------------------------------------------ stages
# Each runs in its own process (this script with --stage NAME) under `timeout`; output goes to
# the log. Figures for the report go to $WORK/<stage>.json.

stage_env() {
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.mem \
    --format=csv || echo "nvidia-smi: not available"
  command -v nvcc && nvcc --version | tail -2
  cmake --version | head -1
  ninja --version
  "${CXX:-c++}" --version | head -1
  command -v compute-sanitizer || ls /usr/local/cuda/compute-sanitizer/compute-sanitizer 2>/dev/null ||
    echo "compute-sanitizer: not found"
  "$PY" - <<'EOF'
import json, os, torch
info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "torch_cmake_prefix_path": torch.utils.cmake_prefix_path}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, sm=p.major * 10 + p.minor, sms=p.multi_processor_count,
                memory_gb=round(p.total_memory / 2**30, 1))
print(json.dumps(info, indent=1))
json.dump(info, open(os.path.join(os.environ["WORK"], "env.json"), "w"))
if not torch.cuda.is_available() and os.environ.get("NO_GPU_OK") != "1":
    raise SystemExit("torch sees no CUDA device (GPU_CHECK_ALLOW_NO_GPU=1 for a plumbing run)")
EOF
}

stage_unpack() {
  local debs=("$ROOT/$DEBS"/*.deb)
  [[ -e "${debs[0]}" ]] || { echo "no .deb files in $DEBS: run tools/gpu_prepare.sh here and carry [\"$DEBS\"]"; return 1; }
  case "$PREFIX" in /tmp/?*) ;; *) echo "refusing to unpack into $PREFIX (must be under /tmp)"; return 1 ;; esac
  rm -rf "$PREFIX" && mkdir -p "$PREFIX" || return 1
  for f in "${debs[@]}"; do
    if command -v dpkg >/dev/null; then
      dpkg -x "$f" "$PREFIX" || { echo "dpkg -x failed: $f"; return 1; }
    else  # no dpkg: a .deb is an ar archive holding data.tar.*
      (cd "$WORK" && rm -rf deb && mkdir deb && cd deb && ar x "$f" && tar -xf data.tar.* -C "$PREFIX") ||
        { echo "unpacking failed: $f"; return 1; }
    fi
  done
  # .pc files name /usr: point them at the prefix, so pkg-config hands out its paths.
  find "$PREFIX" -name '*.pc' -print0 | xargs -0 -r sed -i -E \
    "s#^(prefix|exec_prefix|libdir|includedir)=/usr#\\1=$PREFIX/usr#"
  local missing=0
  for h in spdlog/spdlog.h fmt/format.h nlohmann/json.hpp yaml-cpp/yaml.h CLI/CLI.hpp \
    sentencepiece_processor.h re2/re2.h gtest/gtest.h; do
    [[ -f "$PREFIX/usr/include/$h" ]] || { echo "missing header after unpacking: $h"; missing=1; }
  done
  echo "unpacked ${#debs[@]} packages into $PREFIX"
  pkgconf --modversion sentencepiece re2 || { echo "pkgconf cannot read the unpacked .pc files"; missing=1; }
  return "$missing"
}

stage_configure() {
  local torch_cmake
  torch_cmake=$("$PY" -c 'import torch;print(torch.utils.cmake_prefix_path)') || return 1
  local cuda=ON
  [[ "$NO_GPU_OK" == 1 ]] && ! command -v nvcc >/dev/null && cuda=AUTO
  local pkgconf=()
  [[ -x "$PREFIX/usr/bin/pkgconf" ]] && pkgconf=(-DPKG_CONFIG_EXECUTABLE="$PREFIX/usr/bin/pkgconf")
  # Kernel warnings stay warnings here: CI fails on them with this machine's host compiler, and
  # a newer one's new warning must not cost the device check.
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DAVIARY_CUDA="$cuda" -DCMAKE_CUDA_ARCHITECTURES=90 -DAVIARY_MPI=OFF \
    -DAVIARY_KERNELS_WERROR=OFF \
    -DAVIARY_PYTHON="$(command -v "$PY")" "${pkgconf[@]}" \
    -DCMAKE_PREFIX_PATH="$PREFIX/usr;$PREFIX/usr/lib/$MULTIARCH/cmake;$PREFIX/usr/share/cmake;$torch_cmake"
}

stage_build() {
  # -k 0: whatever can be built is, so the gpu suite (kernels only) runs even if LibTorch code
  # fails to build.
  # shellcheck disable=SC2086  # TARGETS is a list
  ninja -C "$BUILD" -j "$JOBS" -k 0 $TARGETS
}

# Runs in the background (see the driver); build_tests waits for it.
build_tests_background() {
  # shellcheck disable=SC2086
  nice ninja -C "$BUILD" -j "$JOBS" $TEST_TARGETS >"$WORK/build_tests.out" 2>&1
  echo $? >"$WORK/build_tests.rc"
}

stage_build_tests() {
  while [[ ! -f "$WORK/build_tests.rc" ]]; do sleep 2; done
  tail -n 40 "$WORK/build_tests.out"
  return "$(cat "$WORK/build_tests.rc")"
}

# The gpu label is one executable: run it directly (one process, one CUDA context, seconds). If it
# dies without writing its results (a crash in a kernel), run it again one test suite per process
# (gpu_suite_N.json), so that the crash is confined to the suite that causes it. (ctest's one
# process per test would be over a thousand CUDA contexts: minutes.) gpu_suites.txt lists every
# suite and gpu_suites.tsv each one run ("N suite rc"), so the report can tell a suite that
# crashed or timed out, or was never reached, from one that passed.
stage_gpu_tests() {
  local exe="$BUILD/tests/aviary_gpu_tests"
  [[ -x "$exe" ]] || { echo "no $exe: the build failed"; return 1; }
  "$exe" --gtest_output="json:$WORK/gpu_tests.json" && return 0
  [[ -s "$WORK/gpu_tests.json" ]] && return 1
  rm -f "$WORK/gpu_tests.json"
  echo "aviary_gpu_tests wrote no results: running it again, one test suite per process"
  "$exe" --gtest_list_tests | grep -v '^ ' | grep '\.$' >"$WORK/gpu_suites.txt"
  : >"$WORK/gpu_suites.tsv"
  local suite n=0 rc=0 suite_rc
  while read -r suite; do
    n=$((n + 1))
    run_limited 30 "$exe" --gtest_filter="$suite*" --gtest_brief=1 \
      --gtest_output="json:$WORK/gpu_suite_$n.json"
    suite_rc=$?
    printf '%s\t%s\t%s\n' "$n" "$suite" "$suite_rc" >>"$WORK/gpu_suites.tsv"
    ((suite_rc == 0)) || { echo "-- $suite: rc $suite_rc"; rc=1; }
  done <"$WORK/gpu_suites.txt"
  ((n > 0)) || { echo "aviary_gpu_tests lists no test suites"; rc=1; }
  return "$rc"
}

# Runs the unit suite with a gtest filter, writing gtest's JSON to $WORK/<name>.json.
unit_filter() {
  "$BUILD/tests/aviary_unit_tests" --gtest_filter="$2" --gtest_output="json:$WORK/$1.json"
}

registry() {  # the kernel families, as the built CLI reports them
  "$BUILD/aviary" --log-level warn bench kernels --list --json >"$WORK/registry.json"
}

# One gtest filter for all families: positive patterns joined, then all negative ones.
joined_filter() {
  "$PY" - "$WORK/registry.json" "$1" <<'EOF'
import json, sys
pos, neg = [], []
for k in json.load(open(sys.argv[1])):
    p, _, n = k[sys.argv[2]].partition("-")
    pos += [x for x in p.split(":") if x]
    neg += [x for x in n.split(":") if x]
print(":".join(pos or ["*"]) + ("-" + ":".join(neg) if neg else ""))
EOF
}

stage_op_tests() {
  registry || return 1
  local filter
  filter=$(joined_filter op_tests) || return 1
  echo "filter: $filter"
  unit_filter op_tests "$filter"
}

stage_nccl_step() {
  unit_filter nccl_step 'DistNcclCuda.*' || return 1
  # And the trainer itself, started by `aviary launch` torchrun-style on 1 GPU with
  # parallel.backend nccl, so that it opens the NCCL engine and wraps the model: DDP, then FSDP
  # gathering in bf16 (its sharded checkpoint is written at the end).
  local run="$WORK/train-nccl" strategy extra status=0
  rm -rf "$run" && mkdir -p "$run"
  for strategy in ddp fsdp; do
    extra=""
    [[ $strategy == fsdp ]] && extra=", param_dtype: bf16, reduce_dtype: bf16"
    mkdir -p "$run/$strategy"
    cat >"$run/$strategy/config.yaml" <<EOF
model: {arch: aquila, hidden_size: 192, intermediate_size: 512, num_hidden_layers: 6,
        num_attention_heads: 6, num_key_value_heads: 2, vocab_size: 1008,
        max_position_embeddings: 512, rms_norm_eps: 1.0e-5, init_std: 0.02}
data: {datasets: [$ROOT/tests/fixtures/train-parity/data], seq_len: 256}
train: {steps: 3, global_batch: 8, micro_batch: 8, precision: bf16, device: cuda, seed: 1234}
optim: {lr: 2.0e-3, grad_clip: 1.0}
parallel: {strategy: $strategy, backend: nccl$extra}
checkpoint: {dir: $run/$strategy/checkpoints, every: 0}
log: {dir: $run/$strategy, every: 1, tensorboard: false, progress: none}
EOF
    "$BUILD/aviary" launch --spawn direct --nproc-per-node 1 --master-port 29533 \
      --log-dir "$run/$strategy/logs" -- "$BUILD/aviary" train -c "$run/$strategy/config.yaml" \
      2>&1 | tee "$run/$strategy/train.log" | tail -n 8
    if [[ ${PIPESTATUS[0]} -ne 0 ]] || ! grep -q 'over nccl' "$run/$strategy/train.log" ||
      [[ ! -f "$run/$strategy/checkpoints/step-000003/COMPLETE" ]]; then
      echo "nccl_step: $strategy failed"
      status=1
    fi
  done
  return "$status"
}

find_sanitizer() {
  command -v compute-sanitizer ||
    { [[ -x /usr/local/cuda/compute-sanitizer/compute-sanitizer ]] &&
      echo /usr/local/cuda/compute-sanitizer/compute-sanitizer; }
}

# `timeout SECS CMD...` that the stage's own limit also reaches: timeout puts CMD in a process
# group of its own, which the stage's timeout would not signal.
run_limited() {
  local secs=$1 pid rc
  shift
  timeout --kill-after=5 "$secs" "$@" &
  pid=$!
  trap 'kill -TERM -- -'"$pid"' 2>/dev/null; exit 143' TERM
  wait "$pid"
  rc=$?
  trap - TERM
  return "$rc"
}

# Classifies one sanitizer run from its exit code and gtest's JSON:
#   pass         rc 0, and tests ran and passed, none skipped
#   fail         the sanitizer found an error (rc 86), or a test failed under it
#   timeout      it ran past its limit (nothing decided)
#   unavailable  the tests skipped (no usable device under the tool) or the tool refused the
#                device: nothing decided, so an existing record stays
sanitizer_result() {
  local rc=$1 json=$2 total failed skipped
  read -r total failed skipped < <("$PY" - "$json" <<'EOF'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    print("0 0 0")
    raise SystemExit
tests = [t for s in d.get("testsuites", []) for t in s.get("testsuite", [])]
skipped = sum(t.get("result") == "SKIPPED" for t in tests)
failed = sum(bool(t.get("failures")) for t in tests)
print(len(tests), failed, skipped)
EOF
  )
  if ((rc == 86 || ${failed:-0} > 0)); then
    echo fail
  elif ((rc == 124 || rc == 137)); then
    echo timeout
  elif ((rc == 0 && ${total:-0} > 0 && ${skipped:-0} == 0)); then
    echo pass
  else
    echo unavailable
  fi
}

# Every (family, tool) run at once, each in its own process under its own limit: the stage takes
# as long as the slowest run, not the sum (sixteen runs on one GPU and 16 cores), and the results are
# printed and recorded in registry order afterwards.
stage_sanitizer() {
  local san
  san=$(find_sanitizer) || { echo "compute-sanitizer not found"; return 3; }
  registry || return 1
  local rc=0 kernel filter tool result base small
  local -a runs=() pids=()
  : >"$WORK/sanitizer.tsv"
  while IFS=$'\t' read -r kernel filter; do
    for tool in memcheck racecheck; do
      # One '-' starts gtest's negative patterns: add the exclusions to it, or start it.
      small="$filter-$SAN_EXCLUDE"
      [[ "$filter" == *-* ]] && small="$filter:$SAN_EXCLUDE"
      base="$WORK/san_${kernel}_$tool"
      rm -f "$base.json" "$base.rc" "$base.log"
      runs+=("$kernel $tool")
      (
        echo "-- $tool $kernel: --gtest_filter=$small"
        run_limited "$SAN_RUN_LIMIT" "$san" --tool "$tool" --error-exitcode 86 --print-limit 20 \
          "$BUILD/tests/aviary_gpu_tests" --gtest_filter="$small" --gtest_brief=1 \
          --gtest_output="json:$base.json"
        echo $? >"$base.rc"
      ) >"$base.log" 2>&1 &
      pids+=($!)
    done
  done < <("$PY" -c 'import json,sys
for k in json.load(open(sys.argv[1])): print(k["kernel"] + "\t" + k["gpu_tests"])' "$WORK/registry.json")
  wait "${pids[@]}"
  local run
  for run in "${runs[@]}"; do
    read -r kernel tool <<<"$run"
    base="$WORK/san_${kernel}_$tool"
    cat "$base.log"
    # No rc file: the run was killed before it could write one (counted as a timeout).
    result=$(sanitizer_result "$(cat "$base.rc" 2>/dev/null || echo 124)" "$base.json")
    echo "-- $tool $kernel: $result"
    printf '%s\t%s\t%s\n' "$kernel" "$tool" "$result" >>"$WORK/sanitizer.tsv"
    [[ $result == pass ]] || rc=1
  done
  return "$rc"
}

stage_bench() {
  local args=(--seconds 0.2)
  "$PY" -c 'import torch,sys;sys.exit(0 if torch.cuda.is_available() else 1)' || args=(--cpu --seconds 0.05)
  "$BUILD/aviary" --log-level warn bench kernels --json "${args[@]}" >"$WORK/bench.json" || return 1
  cp "$WORK/bench.json" "$OUT/bench_kernels.json"
  # The same figures as a table, for the log.
  "$PY" - "$WORK/bench.json" <<'EOF'
import json, sys
b = json.load(open(sys.argv[1]))
c = b["ceilings"]
print(f"{b['device']} {b['gpu']} sm_{b['sm']}: copy {c['copy_gbs']:.0f} GB/s, GEMM "
      + ", ".join(f"{d} {v:.1f} TFLOP/s" for d, v in c["gemm_tflops"].items()))
for r in b["rows"]:
    fig = f"{r['tflops']:.1f} TFLOP/s" if "tflops" in r else f"{r['gbs']:.0f} GB/s"
    print(f"{r['op']:10} {r['pass']:8} {r['shape']:28} {r['dtype']:5} {r['ms']:9.3f} ms {fig:>16} "
          f"{r['pct_of_ceiling']:5.1f}% of {r['ceiling']:4}  vs {r['baseline']}: {r['speedup']:.2f}x  "
          f"diff {r['max_abs_diff']:.3g}  [{r['path']}]")
EOF
}

# The quickstart model's shape (configs/quickstart.yaml) on the fixture corpus (its 1008-token
# vocabulary), bf16 on CUDA, once per ops.impl.
stage_train() {
  local device=cuda steps=40 precision=bf16
  if ! "$PY" -c 'import torch,sys;sys.exit(0 if torch.cuda.is_available() else 1)'; then
    device=cpu steps=6 precision=fp32
  fi
  local warmup=$((steps / 10 + 1))
  local impl rc=0
  for impl in torch aviary; do
    local run="$WORK/train-$impl"
    rm -rf "$run" && mkdir -p "$run"
    cat >"$run/config.yaml" <<EOF
model: {arch: aquila, hidden_size: 192, intermediate_size: 512, num_hidden_layers: 6,
        num_attention_heads: 6, num_key_value_heads: 2, vocab_size: 1008,
        max_position_embeddings: 512, rms_norm_eps: 1.0e-5, init_std: 0.02}
data: {datasets: [$ROOT/tests/fixtures/train-parity/data], seq_len: 256, shuffle: true}
train: {steps: $steps, global_batch: 8, micro_batch: 8, precision: $precision, device: $device,
        seed: 1234, lr_schedule: {type: cosine, warmup_steps: $warmup, min_lr: 1.0e-4}}
optim: {lr: 2.0e-3, grad_clip: 1.0}
checkpoint: {dir: $run/checkpoints, every: 0}
log: {dir: $run, every: 1, tensorboard: false, progress: none}
ops: {impl: $impl}
EOF
    local t0
    t0=$(date +%s%N)
    if "$BUILD/aviary" --log-level warn train -c "$run/config.yaml"; then
      echo $((($(date +%s%N) - t0) / 1000000)) >"$run/wall_ms.txt"
      echo "ops.impl $impl: $(cat "$run/wall_ms.txt") ms for $steps steps on $device"
    else
      echo "training with ops.impl $impl failed"
      rc=1
    fi
  done
  return "$rc"
}

stage_report() {
  "$PY" "$ROOT/tools/gpu_check_report.py"
}

if [[ "${1:-}" == "--stage" ]]; then
  if [[ "$2" == background_build ]]; then
    build_tests_background
    exit $?
  fi
  "stage_$2"
  exit $?
fi

# ------------------------------------------------------------------------------------ driver

START=$(date +%s)
mkdir -p "$OUT" "$WORK" || exit 1
rm -rf "$WORK"/*.json "$WORK"/*.xml "$WORK"/*.tsv "$WORK"/train-* "$WORK"/build_tests.*
LOG="$OUT/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
# Closes the log: the device tool collects $OUT when this script returns.
finish() {
  exec 1>&- 2>&-
  wait "$TEE_PID" 2>/dev/null
  exit "$1"
}
export GPU_CHECK_COMMIT=${GPU_CHECK_COMMIT:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)}
log "tree $ROOT, commit $GPU_CHECK_COMMIT, budget ${BUDGET}s, build $BUILD, out $OUT"

FAILED=()
# run_stage NAME LIMIT_S: runs stage_NAME under timeout, records "name status seconds rc".
run_stage() {
  local name=$1 limit=$2 reserve=25
  [[ "$name" == report ]] && reserve=0
  if [[ "$SKIP" == *" $name "* ]]; then
    log "== $name: skipped (GPU_CHECK_SKIP)"
    printf '%s\tskipped\t0\t0\n' "$name" >>"$WORK/stages.tsv"
    return 0
  fi
  local left=$((BUDGET - ($(date +%s) - START) - reserve))
  if ((left < 5)); then
    log "== $name: skipped, out of budget"
    printf '%s\tout_of_budget\t0\t0\n' "$name" >>"$WORK/stages.tsv"
    FAILED+=("$name")
    return 0
  fi
  ((limit > left)) && limit=$left
  log "== $name (limit ${limit}s)"
  local t0 rc status
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash "$ROOT/tools/gpu_check.sh" --stage "$name"
  rc=$?
  case $rc in
    0) status=pass ;;
    124 | 137) status=timeout ;;
    3) status=unavailable ;;
    *) status=fail ;;
  esac
  local secs=$(($(date +%s) - t0))
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$rc" >>"$WORK/stages.tsv"
  log "== $name: $status (${secs}s, rc $rc)"
  [[ $status == pass ]] || FAILED+=("$name")
}

run_stage env 30
run_stage unpack 30
run_stage configure 60
run_stage build 300
[[ "$SKIP" == *" build "* ]] && SKIP="$SKIP build_tests "  # nothing to add to
BG_PID=""
if [[ "$SKIP" != *" build_tests "* ]]; then
  rm -f "$WORK/build_tests.rc"
  timeout 300 bash "$ROOT/tools/gpu_check.sh" --stage background_build &
  BG_PID=$!
fi
run_stage gpu_tests 150
run_stage sanitizer 120
run_stage build_tests 240
[[ -n "$BG_PID" ]] && kill "$BG_PID" 2>/dev/null
run_stage op_tests 45
run_stage nccl_step 75
run_stage bench 60
run_stage train 60
run_stage report 20
log "total $(($(date +%s) - START))s of ${BUDGET}s"
if ((${#FAILED[@]})); then
  log "FAILED: ${FAILED[*]} (see the stage's output above and $OUT/gpu_report.json)"
  finish 1
fi
log "all stages passed"
finish 0
