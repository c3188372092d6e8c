#!/usr/bin/env bash
# Install softrepa with the CPU torch pin into ./.venv and run the test suite.
# pytest exits 5 when it collects no tests; `set -e` turns that into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[cpu,test]"
.venv/bin/python -m pytest "$@"
