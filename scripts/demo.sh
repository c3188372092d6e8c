#!/usr/bin/env bash
# Install softrepa with the CPU torch pin into ./.venv and run the bundled miniature demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[cpu,plots]"
.venv/bin/softrepa demo "$@"
