#!/usr/bin/env bash
# Train the unpruned CIFAR-10 baselines: cifar_resnet20, then cifar_resnet56.
#
# Recipe: SGD with Nesterov momentum 0.9, batch 256, peak lr 0.2 (0.1 x 256/128) with one
# warm-up epoch and cosine decay, weight decay 5e-4, label smoothing 0.1, bf16 autocast
# where the CPU supports it. Outputs go to runs/baselines/ (gitignored); an interrupted
# run resumes from its <name>.state.pt, a finished one (checkpoint present) is skipped.
#
# Launch in the background, from the repository root:
#   nohup setsid nice -n 10 bash tools/train_baselines.sh > runs/baselines/train.log 2>&1 &
# runs/baselines/train.pid holds the script's process-group id: pause and continue the
# whole run (script and trainer) with  kill -STOP -- -$(cat runs/baselines/train.pid)
# and  kill -CONT -- -$(cat runs/baselines/train.pid).
#
# Environment: DATA (default ../shared/data/cifar10-jpg), OUT (runs/baselines; a directory
# outside the work tree survives a fresh checkout, e.g. OUT=$HOME/hwprune-runs/baselines),
# THREADS (2), BATCH (256), R20_EPOCHS (180), R56_EPOCHS (180), MODELS (which to train, in order;
# default "cifar_resnet20 cifar_resnet56"). Changing the epoch count of a resumed run re-plans
# the cosine schedule over the new total from the epoch reached.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-../shared/data/cifar10-jpg}
OUT=${OUT:-runs/baselines}
THREADS=${THREADS:-2}
BATCH=${BATCH:-256}
mkdir -p "$OUT"
echo $$ > "$OUT/train.pid"

train() {  # train NAME EPOCHS
    local name=$1 epochs=$2 ck="$OUT/$1.pt"
    if [[ -f $ck ]]; then
        echo "$(date -Is) $name: $ck exists, skipping"
        return
    fi
    echo "$(date -Is) $name: training for $epochs epochs -> $ck"
    hwprune train --model "$name" --data "$DATA" --out "$ck" --epochs "$epochs" --batch-size "$BATCH" \
        --schedule cosine --warmup-epochs 1 --weight-decay 5e-4 --label-smoothing 0.1 \
        --threads "$THREADS" --eval-every 5 --seed 0 --resume --json
    echo "$(date -Is) $name: done"
}

for name in ${MODELS:-cifar_resnet20 cifar_resnet56}; do
    case $name in
        cifar_resnet20) train "$name" "${R20_EPOCHS:-180}" ;;
        cifar_resnet56) train "$name" "${R56_EPOCHS:-180}" ;;
        *) echo "unknown baseline $name" >&2; exit 2 ;;
    esac
done
echo "$(date -Is) all baselines done"
