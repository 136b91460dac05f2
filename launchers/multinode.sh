#!/usr/bin/env bash
# Several machines reachable by passwordless ssh (pdsh), listed in a hostfile, with the deepspeed
# launcher. Run it on the first host; every host needs this checkout and its .venv at the same path
# and a shared filesystem for the run directory (checkpoints are written by every rank).
#
#   HOSTFILE=launchers/hostfile.example launchers/multinode.sh RECIPE [dlip-ds train arguments]
#
# Variables: HOSTFILE (required: "host slots=GPUS" lines), DS_CONFIG (default zero2_bf16),
# OUT (default runs/<recipe>), MASTER_ADDR (default: this host), MASTER_PORT (default 29500),
# NUM_NODES / GPUS_PER_NODE (default: everything the hostfile lists).
set -euo pipefail
RECIPE=${1:?usage: HOSTFILE=hosts launchers/multinode.sh RECIPE [dlip-ds train arguments...]}
shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
# The repository's .venv (`make install`) unless another environment is active.
if [[ -z "${VIRTUAL_ENV:-}" && -f "$REPO/.venv/bin/activate" ]]; then source "$REPO/.venv/bin/activate"; fi
HOSTFILE=${HOSTFILE:?set HOSTFILE to a hostfile (see launchers/hostfile.example)}
DS_CONFIG=${DS_CONFIG:-zero2_bf16}
OUT=${OUT:-runs/$(basename "$RECIPE" .yaml)}
MASTER_ADDR=${MASTER_ADDR:-$(hostname)}
MASTER_PORT=${MASTER_PORT:-29500}
EXTRA=()
[[ -n "${NUM_NODES:-}" ]] && EXTRA+=(--num_nodes "$NUM_NODES")
[[ -n "${GPUS_PER_NODE:-}" ]] && EXTRA+=(--num_gpus "$GPUS_PER_NODE")

exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${EXTRA[@]}" \
    --module dlip_ds.train --config "$RECIPE" --deepspeed "$DS_CONFIG" --out "$OUT" --resume auto "$@"
