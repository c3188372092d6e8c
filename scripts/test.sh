#!/usr/bin/env bash
# Install softrepa with the CPU torch pin into ./.venv and run the test suite.
# pytest exits 5 when it collects no tests; `set -e` turns that into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# tests/test_ui.py drives a real headless browser: Debian's chromium and its driver. Installed
# once (CI runs this script as root); when that is impossible the test skips and says why.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing chromium + chromium-driver for tests/test_ui.py (apt-get)"
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
                >/tmp/softrepa-apt.log 2>&1; then
            export SOFTREPA_BROWSER_INSTALL_ERROR="apt-get install chromium chromium-driver failed: $(tail -n 1 /tmp/softrepa-apt.log)"
        fi
    else
        export SOFTREPA_BROWSER_INSTALL_ERROR="not root or no apt-get: install chromium and chromium-driver yourself"
    fi
    if [ -n "${SOFTREPA_BROWSER_INSTALL_ERROR:-}" ]; then echo "warning: $SOFTREPA_BROWSER_INSTALL_ERROR" >&2; fi
fi

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# tensorboard and datasets: their code paths (tracker images, Hub / save_to_disk data) run in the suite too
.venv/bin/pip install -q -e ".[cpu,test,ui,tensorboard,datasets]"
.venv/bin/python -m pytest "$@"
