#!/usr/bin/env bash
# Builds dptrain (installing missing Debian packages) and runs the whole test suite with CTest.
# Extra arguments go to ctest, e.g. `scripts/test.sh -L fast` or `-E Parity`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ctest --test-dir build --output-on-failure --timeout 600 "$@"
