#!/usr/bin/env bash
# Creates .venv (if missing) and installs burrow into it in editable mode, with the extras named
# on the command line (e.g. `bash scripts/venv.sh test`). Quiet and idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
stamp=".venv/.burrow-installed-${extras:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q -e "$spec"
  touch "$stamp"
fi
bash scripts/build-fast.sh
