#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (CPU torch) and runs the demo or the tests.
#   ./dev.sh demo     set up, then run the demo (synthetic phantoms, CPU, a few minutes)
#   ./dev.sh test     set up, then run the whole test suite
#   ./dev.sh setup    set up only
set -euo pipefail
cd "$(dirname "$0")"
VENV=${CIMIS_VENV:-.venv}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  # The stamp skips the install when nothing it depends on changed since the last run.
  local stamp="$VENV/.cimis-installed" want
  want=$(cat pyproject.toml requirements-dev.txt requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[dev]'
    echo "$want" > "$stamp"
  fi
}

case "${1:-}" in
  setup) setup ;;
  demo) setup; shift; exec "$VENV/bin/cimis" demo "$@" ;;
  test) setup; shift; exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: ./dev.sh demo|test|setup" >&2; exit 2 ;;
esac
