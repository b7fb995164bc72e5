#!/usr/bin/env bash
# The checks to run the day a CUDA GPU is lent: about 6 minutes in all, from the repo root.
#
#   bash bench/gpu_check.sh
#
# Results go to $OUT when it is set, else to bench/results/gpu-check/: summary.md (each step's
# outcome and seconds), steps.log (each step's output, its last 300 lines) and
# speed-cuda.{json,md} (bench/speed.py's). The scratch (synthetic data, runs, bundle) is in a
# temporary folder, removed at the end (kept with GPU_CHECK_KEEP=1). A failed step does not
# stop the next ones. Steps, each with its timeout:
#   0. the Python: the first of $PYTHON, .venv/bin/python, python3, python whose torch sees
#      CUDA (a carried .venv holds a CPU torch, and is too big to carry); wheels in .whl/
#      (monai, nibabel, pytorch-ignite: the GPU machine's python3 lacks them) are installed
#      into a temporary folder put on PYTHONPATH;
#   1. nvidia-smi and torch's view of CUDA;
#   2. a short training of every method with AMP on CUDA (`python -m cotrain train`, on
#      synthetic data written with cotrain.synthetic.write_synthetic_msd: the CLI makes no MSD
#      data; DCT-Seg and Duo-SegNet with the recipes the app serves);
#   3. the multi-process path: NCCL itself (a one-rank group and an all-reduce), then
#      cotrain.launch.train_in_processes with one process per GPU (with one GPU it starts no
#      process group: cotrain.distributed joins one only when WORLD_SIZE > 1), and with 2 GPUs
#      or more `torchrun --nproc_per_node=NGPU -m cotrain train` (NCCL through the library);
#   4. inference (`cotrain predict` with the uncertainty map) and bundle export
#      (`cotrain export-bundle`, then the bundle run by MONAI's own `monai.bundle run`);
#   5. `bench/speed.py --device cuda --no-server` with few steps and repeats, in the time left.
#
# Before the device call, fetch the wheels the GPU machine lacks (small; .whl/ is ignored by
# git and travels with `carry`):
#
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       monai==1.5.2 nibabel==5.4.2 pytorch-ignite==0.4.11
#
# then run it with the device tool: command `bash bench/gpu_check.sh`, carry [".whl"],
# timeout_s about 400, and commit $OUT's files under bench/results/ with the device named.
#
# GPU_CHECK_BUDGET (seconds, default 330) bounds the whole script: a step gets at most the
# time left, and is skipped when less than 15 s is left.
set -euo pipefail

cd "$(dirname "$0")/.."
RESULTS="${OUT:-bench/results/gpu-check}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/cotrain-gpu-check.XXXXXX")"
if [[ -z ${GPU_CHECK_KEEP:-} ]]; then  # GPU_CHECK_KEEP=1 keeps the scratch to look at
    trap 'rm -rf "$WORK"' EXIT
fi
DATA="$WORK/data"
RUNS="$WORK/runs"
LOGS="$WORK/logs"
mkdir -p "$LOGS"
SUMMARY="$RESULTS/summary.md"
STEPS_LOG="$RESULTS/steps.log"
BUDGET="${GPU_CHECK_BUDGET:-330}"
START=$SECONDS
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MONAI_LABEL_TRACKING_ENABLED=false

# 0. The Python whose torch sees CUDA, and the wheels it lacks.
if [[ -d .whl ]] && compgen -G '.whl/*.whl' >/dev/null; then
    SITE="$WORK/site"
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl >"$LOGS/wheels.log" 2>&1; then
        export PYTHONPATH="$PYTHONPATH:$SITE"
    fi
fi
PY=""
for candidate in ${PYTHON:-} .venv/bin/python python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
        PY=$candidate
        break
    fi
done
if [[ -z $PY ]]; then  # no torch sees CUDA: run anyway, the CUDA steps fail and say so
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
NGPU=${NGPU:-0}

{
    echo "# GPU check"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), $(hostname), python: $PY ($("$PY" -V 2>&1)), GPUs: $NGPU, budget ${BUDGET}s"
    echo
    echo "| step | result | seconds |"
    echo "|---|---|---|"
} >"$SUMMARY"
: >"$STEPS_LOG"
if [[ -f $LOGS/wheels.log ]]; then
    { echo "===== wheels from .whl/"; cat "$LOGS/wheels.log"; } >>"$STEPS_LOG"
fi

STEP=0
FAILED=0
# run_step NAME TIMEOUT COMMAND...: run COMMAND with at most TIMEOUT seconds (never past the
# budget); its outcome goes to the summary, the end of its output to steps.log.
run_step() {
    local name=$1 limit=$2
    shift 2
    STEP=$((STEP + 1))
    local log
    log="$LOGS/$(printf '%02d' "$STEP")-$name.log"
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < 15)); then
        echo "| $name | skipped (no time left) | 0 |" >>"$SUMMARY"
        echo "== $name: skipped, ${left}s left" >&2
        return 0
    fi
    if ((limit > left)); then
        limit=$left
    fi
    echo "== $name (timeout ${limit}s)" >&2
    local began=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1 || rc=$?
    local took=$((SECONDS - began)) result
    if ((rc == 0)); then
        result=pass
    elif ((rc == 124 || rc == 137)); then
        result="FAIL (timed out after ${limit}s)"
        FAILED=$((FAILED + 1))
    else
        result="FAIL (exit $rc)"
        FAILED=$((FAILED + 1))
    fi
    echo "| $name | $result | $took |" >>"$SUMMARY"
    {
        echo "===== $STEP $name: $result in ${took}s: $*"
        tail -n 300 "$log"
    } >>"$STEPS_LOG"
    echo "   $result in ${took}s" >&2
    return 0
}

# 1. The GPU and torch's view of it.
run_step nvidia-smi 20 nvidia-smi
run_step torch-cuda 40 "$PY" -c '
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(i, p.name, f"{p.total_memory / 2**30:.1f} GiB", f"sm_{p.major}{p.minor}")
x = torch.randn(1024, 1024, device="cuda")
with torch.autocast("cuda"):
    y = x @ x
print("bf16 supported", torch.cuda.is_bf16_supported(), "autocast dtype", y.dtype)
import monai, nibabel
print("monai", monai.__version__, "nibabel", nibabel.__version__)
'

# 2. Every method, AMP on (the default on CUDA), a few iterations on synthetic data.
run_step synthetic-data 40 "$PY" -c "
from cotrain.synthetic import write_synthetic_msd
write_synthetic_msd('$DATA', 8, shape=(48, 48, 48), num_classes=2, spacing=(1.0, 1.0, 1.5))
"
TRAIN_ARGS=(--data "$DATA" --labeled 4 --epochs 1 --iterations 4 --roi 32 32 32
    --channels 16 32 64 --batch-size 2 --unlabeled-batch-size 2 --device cuda --workers 0)
METHODS=$("$PY" -c 'from cotrain.methods import METHOD_CLASSES; print(" ".join(METHOD_CLASSES))' 2>/dev/null ||
    echo "dct_seg duo_segnet supervised jsd mean_teacher cps")
for method in $METHODS; do
    # The recipes the app serves (cotrain.config.TUNED_SETTINGS): perturbed unlabeled copies.
    case $method in
        dct_seg) extra=(--perturb-unlabeled --param agreement_focus=0.5) ;;
        duo_segnet) extra=(--perturb-unlabeled --param lambda_u=1.5) ;;
        *) extra=(--seed 0) ;;
    esac
    run_step "train-$method" 60 "$PY" -m cotrain train --method "$method" "${TRAIN_ARGS[@]}" \
        "${extra[@]}" --output "$RUNS/$method"
done

# 3. Several processes: NCCL itself, the library's spawn launcher, torchrun with 2+ GPUs.
run_step nccl 45 "$PY" -c "
import os, torch, torch.distributed as dist
from cotrain.launch import free_port
os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()))
dist.init_process_group('nccl', rank=0, world_size=1)
t = torch.ones(4, device='cuda')
dist.all_reduce(t)
torch.cuda.synchronize()
print('nccl', torch.cuda.nccl.version(), 'all_reduce', t.tolist())
dist.destroy_process_group()
"
run_step launch-processes 90 "$PY" -c "
import logging
from cotrain.config import TrainConfig
from cotrain.data import list_msd_cases
from cotrain.launch import process_count, train_in_processes
logging.basicConfig(level=logging.INFO)
cases = list_msd_cases('$DATA')
count, gpus = process_count('cuda')
config = TrainConfig(method='dct_seg', labels={'organ': 1}, roi_size=(32, 32, 32), epochs=1,
                     iterations_per_epoch=4, network={'channels': [16, 32, 64], 'strides': [2, 2]},
                     val_interval=0)
kwargs = dict(config=config, labeled=cases[:4], unlabeled=[{'image': c['image']} for c in cases[4:]],
              output_dir='$RUNS/launch')
state = train_in_processes(count, kwargs, 'cuda', gpus)
print('processes', count, 'gpus', gpus, 'epochs', state.epoch, 'losses', state.losses)
print('process group (NCCL) started by the library:', count > 1)
"
if ((NGPU >= 2)); then
    run_step torchrun 90 "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" \
        -m cotrain train --method dct_seg "${TRAIN_ARGS[@]}" --output "$RUNS/torchrun"
else
    echo "| torchrun | skipped ($NGPU GPU: one process starts no process group) | 0 |" >>"$SUMMARY"
fi

# 4. Inference and bundle export (the bundle run by MONAI alone).
IMAGE="$DATA/imagesTr/case_007.nii.gz"
run_step predict 45 "$PY" -m cotrain predict --model "$RUNS/dct_seg" --image "$IMAGE" \
    --output "$WORK/case_007_label.nii.gz" --uncertainty "$WORK/case_007_unc.nii.gz" \
    --device cuda
run_step export-bundle 45 "$PY" -m cotrain export-bundle --model "$RUNS/dct_seg" \
    --output "$WORK/bundle"
mkdir -p "$WORK/bundle-images"
cp "$IMAGE" "$WORK/bundle-images/" 2>/dev/null || true
run_step bundle-run 60 "$PY" -m monai.bundle run \
    --config_file "$WORK/bundle/configs/inference.json" \
    --meta_file "$WORK/bundle/configs/metadata.json" --bundle_root "$WORK/bundle" \
    --dataset_dir "$WORK/bundle-images" --output_dir "$WORK/bundle-labels"
run_step bundle-output 20 test -s "$WORK/bundle-labels/case_007_seg.nii.gz"

# 5. The speed benchmark on CUDA, in the time left (a few steps and repeats).
run_step speed "$BUDGET" "$PY" bench/speed.py --device cuda --no-server --output "$RESULTS" \
    --warmup 2 --rounds 3 --steps 2 --repeats 2

{
    echo
    echo "$FAILED step(s) failed; $((SECONDS - START)) s in all."
} >>"$SUMMARY"
cat "$SUMMARY"
exit 0
