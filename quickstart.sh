#!/usr/bin/env bash
# Fresh machine to a working model: install, then run the pipeline end to end.
#   bash quickstart.sh                      # uses configs/shakespeare_char_cpu.toml
#   SHAKESPEARE_SOURCE=path/to/input.txt bash quickstart.sh   # offline: a local Tiny Shakespeare
# Extra arguments are config overrides passed to every stage, e.g. --train.max_steps 50.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r requirements.txt
.venv/bin/python model.py configs/shakespeare_char_cpu.toml "$@"
