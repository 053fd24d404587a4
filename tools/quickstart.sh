#!/usr/bin/env bash
# The main job: set up Aviary, then train the quickstart model (a 5.4M-parameter Aquila-architecture
# decoder) on the bundled bilingual corpus and generate text from the trained checkpoint.
#
#   tools/quickstart.sh              # everything, about 2.5 minutes of training on 2 CPU cores
#   AVIARY_QUICKSTART_STEPS=50 tools/quickstart.sh   # a shorter run (smoke test)
#
# Outputs go to runs/quickstart/ (recreated on each run): tokenizer.model, data/corpus.{bin,idx,
# json}, checkpoints/, metrics.jsonl, TensorBoard events, hf/ (the exported model).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
BUILD_DIR=${AVIARY_BUILD_DIR:-build}
AVIARY="$BUILD_DIR/aviary"
RUN=runs/quickstart
CORPUS=(data/corpus/en.jsonl data/corpus/zh.jsonl)
EXTRA=()
if [[ -n "${AVIARY_QUICKSTART_STEPS:-}" ]]; then
  EXTRA+=(--set "train.steps=$AVIARY_QUICKSTART_STEPS" --set train.eval_every=0
    --set "train.lr_schedule.warmup_steps=$((AVIARY_QUICKSTART_STEPS / 10))")
fi

rm -rf "$RUN"
mkdir -p "$RUN/data"
echo "== 1/5 train a SentencePiece tokenizer (BPE, byte fallback, 8000 pieces) on the corpus"
"$AVIARY" tokenizer train -i "${CORPUS[@]}" -o "$RUN/tokenizer" --vocab-size 8000 --threads 2
echo "== 2/5 tokenize the corpus into $RUN/data/corpus.{bin,idx,json}"
"$AVIARY" data prepare -i "${CORPUS[@]}" -o "$RUN/data/corpus" -t "$RUN/tokenizer.model" --quiet
echo "== 3/5 train (configs/quickstart.yaml): watch loss fall below the unigram baseline"
"$AVIARY" train --config configs/quickstart.yaml "${EXTRA[@]}"
echo "== 4/5 export the last checkpoint as an HF model directory"
"$AVIARY" export --checkpoint "$RUN/checkpoints" --output "$RUN/hf"
echo "== 5/5 generate from the trained model"
"$AVIARY" generate --model "$RUN/hf" --prompt "The meaning of life is" --prompt "春眠不觉晓，" \
  --max-new-tokens 40 --temperature 0.8 --top-p 0.9 --seed 7
echo
echo "Done. Metrics: $RUN/metrics.jsonl (TensorBoard: tensorboard --logdir $RUN)."
echo "Chat-free generation: $AVIARY generate --model $RUN/hf --prompt '...'"
