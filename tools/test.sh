#!/usr/bin/env bash
# Sets up Aviary (tools/setup.sh) and runs the test suites with ctest.
#
#   tools/test.sh                 # unit + parity + dist + gpu (gpu tests skip without a device)
#   AVIARY_TEST_LABELS='unit' tools/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
BUILD_DIR=${AVIARY_BUILD_DIR:-build}
LABELS=${AVIARY_TEST_LABELS:-unit|parity|dist|gpu}
ctest --test-dir "$BUILD_DIR" -L "$LABELS" --output-on-failure -j "$(nproc)" --timeout 600
