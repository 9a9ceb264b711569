#!/usr/bin/env bash
# Fresh machine to a trained model: install, prepare Tiny Shakespeare, train, sample.
#   bash quickstart.sh                                        # about 2 minutes of training on a CPU
#   SHAKESPEARE_SOURCE=path/to/input.txt bash quickstart.sh   # offline: use a local copy
# Extra arguments are train-config overrides, e.g. --train.max_steps 50.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r requirements.txt
source_args=()
[ -n "${SHAKESPEARE_SOURCE:-}" ] && source_args=(--data.source "$SHAKESPEARE_SOURCE")
.venv/bin/python prepare_data.py --data.dataset shakespeare_char "${source_args[@]}"
.venv/bin/python train.py configs/shakespeare_char_cpu.toml --overwrite "$@"
.venv/bin/python generate.py --checkpoint out/shakespeare_char_cpu --prompt "ROMEO:" --max_new_tokens 100 \
    --temperature 0.8 --top_k 40 --seed 1
