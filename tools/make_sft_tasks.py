#!/usr/bin/env python3
"""Generates Aviary's synthetic instruction-tuning data (data/sft/*.jsonl) with checkable answers.

    python3 tools/make_sft_tasks.py [--out data/sft] [--train 12000] [--eval-per-task 100]

Four short tasks, small enough for a ~5M-parameter model pretrained on the bundled fortunes to
learn in a few minutes of CPU fine-tuning:
  add        "Compute 37+45."                        -> "82"      (operands 0..99)
  reverse    "Reverse the letters: c a t s"          -> "s t a c" (3..5 lowercase letters)
  json       'In {"x": 12, "y": 7}, what is y?'      -> "7"       (2..3 keys, values 0..99)
  zh_digits  "用中文数字写出 305"                 -> "三零五"  (10..999, digit by digit)

Outputs under --out:
  tasks-eval.jsonl   --eval-per-task distinct prompts per task, one {"task", "prompt", "answer"}
                     object per line, grouped by task.
  tasks-train.jsonl  --train conversations, each in one of four chat formats so every reader path
                     is exercised (round robin, so the shares are equal):
                       aquila  {"id", "conversations": [{"from": "human"|"gpt", "value"}],
                                "instruction": ""}
                       coig    {"instruction": "", "conversations": [{"question", "answer"}]}
                       alpaca  {"instruction", "input", "output"} (single turn only; when input is
                               non-empty the user turn is instruction + "\\n\\n" + input: some add
                               records are split as "Compute the sum." + "37+45")
                       openai  {"messages": [{"role": "system"|"user"|"assistant", "content"}]}
                               (about 20% start with a system message)
                     About 10% of the records are multi-turn (two question/answer pairs; never
                     alpaca).
  README.md          what the files are and how they are made.

No question of the eval set occurs in the train set, in any wording: train questions are drawn
again when they match an eval question (same operands, letters, object and key, or number), which
also rules out exact-string collisions of prompts. The output is byte-for-byte reproducible
(fixed seed, Python's `random` only). Plain python3, no third-party modules.
"""
import argparse
import json
import os
import random
import string
import sys

SEED = 20261128
TASKS = ["add", "reverse", "json", "zh_digits"]
FORMATS = ["aquila", "coig", "alpaca", "openai"]
JSON_KEYS = ["a", "b", "k", "n", "x", "y", "z"]
ZH_DIGITS = "零一二三四五六七八九"
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "Answer with the result only.",
    "你是一个乐于助人的助手。",
]
MULTI_TURN_SHARE = 0.10  # of all records
SYSTEM_SHARE = 0.20      # of openai records
SPLIT_ADD_SHARE = 0.5    # of single-turn alpaca add records


def make_question(task, rng):
    """Returns (key, prompt, answer); key identifies the question independently of its wording."""
    if task == "add":
        a, b = rng.randrange(100), rng.randrange(100)
        return (a, b), f"Compute {a}+{b}.", str(a + b)
    if task == "reverse":
        letters = [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5))]
        return (tuple(letters), f"Reverse the letters: {' '.join(letters)}",
                " ".join(reversed(letters)))
    if task == "json":
        keys = rng.sample(JSON_KEYS, rng.randint(2, 3))
        obj = {k: rng.randrange(100) for k in keys}
        asked = rng.choice(keys)
        text = json.dumps(obj)
        return (text, asked), f"In {text}, what is {asked}?", str(obj[asked])
    if task == "zh_digits":
        n = rng.randrange(10, 1000)
        return n, f"用中文数字写出 {n}", "".join(ZH_DIGITS[int(d)] for d in str(n))
    raise ValueError(task)


def make_eval(rng, per_task):
    items, keys = [], {t: set() for t in TASKS}
    for task in TASKS:
        while len(keys[task]) < per_task:
            key, prompt, answer = make_question(task, rng)
            if key in keys[task]:
                continue
            keys[task].add(key)
            items.append({"task": task, "prompt": prompt, "answer": answer})
    return items, keys


def train_question(task, rng, eval_keys, eval_prompts):
    while True:
        key, prompt, answer = make_question(task, rng)
        if key not in eval_keys[task] and prompt not in eval_prompts:
            return key, prompt, answer


def render(fmt, idx, turns, rng, counts):
    """turns: list of (task, key, prompt, answer)."""
    if fmt == "aquila":
        conv = []
        for _, _, p, a in turns:
            conv += [{"from": "human", "value": p}, {"from": "gpt", "value": a}]
        return {"id": f"sft-{idx:05d}", "conversations": conv, "instruction": ""}
    if fmt == "coig":
        return {"instruction": "",
                "conversations": [{"question": p, "answer": a} for _, _, p, a in turns]}
    if fmt == "alpaca":
        assert len(turns) == 1
        task, key, p, a = turns[0]
        if task == "add" and rng.random() < SPLIT_ADD_SHARE:
            counts["alpaca_split"] += 1
            return {"instruction": "Compute the sum.", "input": f"{key[0]}+{key[1]}", "output": a}
        return {"instruction": p, "input": "", "output": a}
    if fmt == "openai":
        msgs = []
        if rng.random() < SYSTEM_SHARE:
            counts["openai_system"] += 1
            msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _, _, p, a in turns:
            msgs += [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
        return {"messages": msgs}
    raise ValueError(fmt)


def user_turns(rec):
    """The user prompts of a train record, as the C++ reader would see them (for the checks)."""
    if "messages" in rec:
        return [m["content"] for m in rec["messages"] if m["role"] == "user"]
    if "output" in rec:
        return [rec["instruction"] + ("\n\n" + rec["input"] if rec["input"] else "")]
    conv = rec["conversations"]
    if conv and "from" in conv[0]:
        return [c["value"] for c in conv if c["from"] == "human"]
    return [c["question"] for c in conv]


def make_train(rng, n, eval_keys, eval_prompts):
    # Multi-turn records are only possible in 3 of the 4 formats.
    multi_p = MULTI_TURN_SHARE * len(FORMATS) / (len(FORMATS) - 1)
    counts = {"alpaca_split": 0, "openai_system": 0, "multi_turn": 0,
              **{f"format:{f}": 0 for f in FORMATS}, **{f"task:{t}": 0 for t in TASKS}}
    records = []
    for i in range(n):
        fmt = FORMATS[i % len(FORMATS)]
        n_turns = 2 if fmt != "alpaca" and rng.random() < multi_p else 1
        turns = []
        for _ in range(n_turns):
            task = rng.choice(TASKS)
            turns.append((task, *train_question(task, rng, eval_keys, eval_prompts)))
            counts[f"task:{task}"] += 1
        counts[f"format:{fmt}"] += 1
        counts["multi_turn"] += n_turns > 1
        records.append(render(fmt, i, turns, rng, counts))
    return records, counts


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


README = """\
# Synthetic instruction-tuning tasks

Generated by `tools/make_sft_tasks.py` (regenerate with `python3 tools/make_sft_tasks.py`; the
output is byte-for-byte reproducible, fixed seed {seed}). Used by the SFT/LoRA tests, examples
and the quickstart: the tasks are short and have exactly checkable answers, so a tiny model
pretrained on `data/corpus` can learn them in minutes of CPU fine-tuning and the result can be
scored by exact match.

| task | prompt | answer |
|---|---|---|
| `add` | `Compute 37+45.` (operands 0..99) | `82` |
| `reverse` | `Reverse the letters: c a t s` (3..5 lowercase letters) | `s t a c` |
| `json` | `In {{"x": 12, "y": 7, "z": 40}}, what is y?` (2..3 keys, values 0..99) | `7` |
| `zh_digits` | `用中文数字写出 305` (10..999) | `三零五` |

* `tasks-train.jsonl`: {n_train} conversations ({turns} question/answer pairs), the four chat
  formats Aviary reads in equal shares (round robin): Aquila `conversations` with `from`
  human/gpt, COIG `conversations` with `question`/`answer`, Alpaca `instruction`/`input`/`output`
  (the user turn is `instruction + "\\n\\n" + input` when `input` is non-empty, as in the split
  `add` records "Compute the sum." + "37+45"), and OpenAI `messages` (some with a system message).
  About 10% are multi-turn (two pairs). Per task: {per_task}.
* `tasks-eval.jsonl`: {n_eval_per_task} prompts per task, `{{"task", "prompt", "answer"}}` per
  line. No eval question occurs in the train set (neither as the exact prompt string nor as the
  same underlying question in another wording).

License: the data is machine-generated by the script above and contains no third-party text. It
is distributed under the repository's license (Apache-2.0); to the extent possible it may also be
used as public domain (CC0).
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "..", "data", "sft"))
    ap.add_argument("--train", type=int, default=12000, help="train records")
    ap.add_argument("--eval-per-task", type=int, default=100)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    eval_items, eval_keys = make_eval(rng, args.eval_per_task)
    eval_prompts = {e["prompt"] for e in eval_items}
    train, counts = make_train(rng, args.train, eval_keys, eval_prompts)

    # Self-checks: no eval prompt in train, answers consistent.
    train_prompts = {p for r in train for p in user_turns(r)}
    clash = eval_prompts & train_prompts
    if clash:
        sys.exit(f"error: eval prompts in train: {sorted(clash)[:5]}")
    for e in eval_items:
        if e["task"] == "add":
            a, b = e["prompt"][len("Compute "):-1].split("+")
            assert int(e["answer"]) == int(a) + int(b), e

    os.makedirs(args.out, exist_ok=True)
    write_jsonl(os.path.join(args.out, "tasks-train.jsonl"), train)
    write_jsonl(os.path.join(args.out, "tasks-eval.jsonl"), eval_items)
    turns = sum(counts[f"task:{t}"] for t in TASKS)
    per_task = ", ".join(f"{t} {counts[f'task:{t}']}" for t in TASKS)
    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write(README.format(seed=args.seed, n_train=len(train), turns=turns, per_task=per_task,
                              n_eval_per_task=args.eval_per_task))

    out = os.path.abspath(args.out)
    size = os.path.getsize(os.path.join(out, "tasks-train.jsonl"))
    print(f"tasks-train.jsonl: {len(train)} records, {turns} question/answer pairs, "
          f"{size / 1e6:.2f} MB -> {out}")
    print("  per task:   " + per_task)
    print("  per format: " + ", ".join(f"{f} {counts[f'format:{f}']}" for f in FORMATS))
    print(f"  multi-turn {counts['multi_turn']}, alpaca split instruction+input "
          f"{counts['alpaca_split']}, openai with system message {counts['openai_system']}")
    print(f"tasks-eval.jsonl: {len(eval_items)} prompts ({args.eval_per_task} per task: "
          + ", ".join(TASKS) + ")")


if __name__ == "__main__":
    main()
