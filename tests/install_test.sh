#!/usr/bin/env bash
# Installs Aviary into a temp prefix, builds examples/generate.cpp against it with
# find_package(Aviary), and runs it on the tiny fixture model.
#   tests/install_test.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build=$1
src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix" > "$tmp/install.log"
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S "$src/examples" -B "$tmp/build" "${gen[@]}" -DCMAKE_PREFIX_PATH="$tmp/prefix" \
  -DCMAKE_BUILD_TYPE=Release > "$tmp/configure.log"
cmake --build "$tmp/build" > "$tmp/build.log" || { cat "$tmp/build.log"; exit 1; }
out=$("$tmp/build/generate" "$src/tests/fixtures/tiny-llama" "The quick brown fox" 5)
echo "$out"
grep -q "\[5 tokens, finish: length\]" <<< "$out"
