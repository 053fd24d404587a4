#!/usr/bin/env bash
# The main job: set up Aviary, then run the bundled tiny Aquila/LLaMA model end to end.
# (Once the trainer lands, this trains the quickstart model on the bundled corpus first.)
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
BUILD_DIR=${AVIARY_BUILD_DIR:-build}
MODEL=tests/fixtures/tiny-llama
echo "== aviary info"
"$BUILD_DIR/aviary" info
echo "== greedy generation from $MODEL (a tiny random model: the text is noise, the pipeline is real)"
"$BUILD_DIR/aviary" generate --model "$MODEL" --prompt "天下大事，必作于细。The quick brown fox" \
  --max-new-tokens 24
echo "== sampled, batched, as JSON"
"$BUILD_DIR/aviary" generate --model "$MODEL" --prompt "Hello" --prompt "def add(a, b):" \
  --max-new-tokens 8 --temperature 0.8 --top-p 0.9 --seed 1 --json
