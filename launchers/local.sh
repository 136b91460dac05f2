#!/usr/bin/env bash
# One machine: NPROC ranks (GPUs, or CPU processes when there is no GPU) with the deepspeed launcher.
#
#   launchers/local.sh RECIPE [extra `dlip-ds train` arguments]
#   NPROC=4 DS_CONFIG=zero3_bf16 launchers/local.sh blip-distill-dlip-small --set data.batch_size=48
#
# Variables (environment): NPROC (default: every visible GPU, else 1 CPU rank), DS_CONFIG (a shipped
# name or a JSON path; default zero2_bf16), OUT (run directory; default runs/<recipe>), MASTER_PORT.
# The run resumes from OUT's latest checkpoint when there is one (--resume auto).
set -euo pipefail
RECIPE=${1:?usage: launchers/local.sh RECIPE [dlip-ds train arguments...]}
shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
# The repository's .venv (`make install`) unless another environment is active.
if [[ -z "${VIRTUAL_ENV:-}" && -f "$REPO/.venv/bin/activate" ]]; then source "$REPO/.venv/bin/activate"; fi

if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    NPROC=${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count())')}
else
    export DS_ACCELERATOR=cpu  # gloo between CPU processes
    NPROC=${NPROC:-1}
fi
DS_CONFIG=${DS_CONFIG:-zero2_bf16}
OUT=${OUT:-runs/$(basename "$RECIPE" .yaml)}
MASTER_PORT=${MASTER_PORT:-29500}

exec deepspeed --num_gpus "$NPROC" --master_port "$MASTER_PORT" --module dlip_ds.train \
    --config "$RECIPE" --deepspeed "$DS_CONFIG" --out "$OUT" --resume auto "$@"
