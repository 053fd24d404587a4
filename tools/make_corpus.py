#!/usr/bin/env python3
"""Builds Aviary's bundled bilingual corpus (data/corpus/*.jsonl) from Debian's fortune files.

    apt-get install -y fortunes fortunes-zh
    python3 tools/make_corpus.py [--src /usr/share/games/fortunes] [--out data/corpus]

Each fortune (the text between lines holding a single '%') becomes one JSONL record
{"text": ...}. English comes from the `fortunes` package (BSD-licensed fortune-mod data), Chinese
from `fortunes-zh` (GPL-3.0+): files `chinese`, `tang300` and `song100`. ANSI colour escapes
(used by fortunes-zh for titles) are stripped, trailing whitespace is trimmed and empty fortunes
dropped. Files are processed in sorted order, so the output is byte-for-byte reproducible for a
given package version. Plain python3, no third-party modules.
"""
import argparse
import json
import os
import re
import sys

ZH_FILES = ["chinese", "tang300", "song100"]
# English files of the `fortunes` package (the `fortunes-min` ones are included as well).
SKIP_SUFFIXES = (".dat", ".u8")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def read_fortunes(path):
    raw = open(path, "rb").read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = ANSI.sub("", text).replace("\r\n", "\n")
    out = []
    for chunk in re.split(r"^%\s*$", text, flags=re.M):
        lines = [line.rstrip() for line in chunk.strip("\n").split("\n")]
        body = "\n".join(lines).strip("\n")
        if body.strip():
            out.append(body)
    return out


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", default="/usr/share/games/fortunes")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "data", "corpus"))
    args = ap.parse_args()
    if not os.path.isdir(args.src):
        sys.exit(f"error: {args.src} not found (hint: apt-get install -y fortunes fortunes-zh)")
    en, zh = [], []
    for name in sorted(os.listdir(args.src)):
        path = os.path.join(args.src, name)
        if name.endswith(SKIP_SUFFIXES) or os.path.islink(path) or not os.path.isfile(path):
            continue
        (zh if name in ZH_FILES else en).extend(read_fortunes(path))
    if not zh:
        sys.exit("error: no Chinese fortunes found (hint: apt-get install -y fortunes-zh)")
    os.makedirs(args.out, exist_ok=True)
    write_jsonl(os.path.join(args.out, "en.jsonl"), en)
    write_jsonl(os.path.join(args.out, "zh.jsonl"), zh)
    print(f"en.jsonl: {len(en)} fortunes, zh.jsonl: {len(zh)} fortunes -> {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
