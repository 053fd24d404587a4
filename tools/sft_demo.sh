#!/usr/bin/env bash
# Instruction fine-tuning demo on a 2-core CPU: the quickstart model, before and after
# fine-tuning on the bundled task set (data/sft, made by tools/make_sft_tasks.py), scored by exact
# match on 400 held-out prompts.
#
#   tools/quickstart.sh      # first: the base model (runs/quickstart)
#   tools/sft_demo.sh        # then: prepare, score, fine-tune (configs/quickstart-sft.yaml), score
#
# Extra arguments go to `aviary finetune` (e.g. --set train.steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
AVIARY="${AVIARY_BUILD_DIR:-build}/aviary"
RUN=runs/quickstart-sft
if [[ ! -f runs/quickstart/tokenizer.model ]]; then
  echo "runs/quickstart is missing: run tools/quickstart.sh first" >&2
  exit 1
fi
rm -rf "$RUN"
mkdir -p "$RUN/data"
echo "== 1/4 render the instruction data with the 'aquila' chat template (loss on replies only)"
"$AVIARY" data prepare --sft -i data/sft/tasks-train.jsonl -o "$RUN/data/tasks" \
  -t runs/quickstart/tokenizer.model --chat-template aquila --quiet
echo "== 2/4 score the base model (exact match, greedy)"
"$AVIARY" eval --model runs/quickstart/checkpoints --template aquila \
  --task data/sft/tasks-eval.jsonl --max-new-tokens 16 | tee "$RUN/eval-before.md"
echo "== 3/4 fine-tune (configs/quickstart-sft.yaml)"
time "$AVIARY" finetune --config configs/quickstart-sft.yaml "$@"
echo "== 4/4 score the fine-tuned model"
"$AVIARY" eval --model "$RUN" --task data/sft/tasks-eval.jsonl --max-new-tokens 16 --show 8 |
  tee "$RUN/eval-after.md"
