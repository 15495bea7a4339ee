#!/usr/bin/env bash
# One command from a fresh clone: install uv and the locked dependencies, then run the demo
# (example jobs on real taskiq workers over a private Redis), printing what ran where.
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null 2>&1; then
  echo "==> installing uv" >&2
  python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server is not installed: run 'sudo apt-get install -y redis-server' (or your OS's equivalent)." >&2
  exit 2
fi
echo "==> installing locked dependencies" >&2
uv sync --frozen --quiet
exec uv run --frozen python scripts/demo.py "$@"
