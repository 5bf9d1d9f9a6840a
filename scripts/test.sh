#!/usr/bin/env bash
# Install everything (apt, venv, libvirtd) and run lint, type check and the tests.
# This is the README's test command and what .ci/run calls.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/start-s3.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff" >&2
ruff check backupkit tests bench scripts
echo "== mypy" >&2
mypy
echo "== pytest" >&2
# -p no:cacheprovider: a clean clone stays clean.
exec pytest -p no:cacheprovider --durations=15 "$@"
