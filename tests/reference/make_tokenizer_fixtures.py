#!/usr/bin/env python3
"""Generates the tokenizer fixtures under tests/fixtures/tokenizers/.

Run with the project venv:  ~/.cache/aviary/venv/bin/python tests/reference/make_tokenizer_fixtures.py

Needs the Debian packages `fortunes` and `fortunes-zh` (the training corpus is read from
/usr/share/games/fortunes and is not committed). Deterministic and idempotent: running it twice
gives byte-identical files (the script checks that the trainers reproduce themselves).

Outputs (all small):
  bpe/               tokenizer.json (byte-level BPE, vocab 1000 + 8 Aquila-style added tokens),
                     tokenizer_config.json, special_tokens_map.json  (AquilaChat2-like)
  bpe-vocab-merges/  the same model as vocab.json + merges.txt (+ tokenizer_config.json)
  bpe-template/      the same model with a Sequence[Split(regex), ByteLevel] pre-tokenizer and a
                     TemplateProcessing post-processor "[CLS] $A </s>" (exercises those paths)
  sp/                tokenizer.model (SentencePiece BPE, byte_fallback, unk 0 / bos 1 / eos 2),
                     tokenizer_config.json (LLaMA-like, add_bos_token true)
  parity.json        cases + expected ids/decodes from HF tokenizers / transformers / sentencepiece
"""

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm
import tokenizers
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

FORTUNES = Path("/usr/share/games/fortunes")
OUT = Path(__file__).resolve().parent.parent / "fixtures" / "tokenizers"

ADDED = ["<|startofpiece|>", "<|endofpiece|>", "<|LDWANG|>", "[MASK]", "[gMASK]", "[sMASK]",
         "[CLS]", "</s>"]
GPT2_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")

ANSI = re.compile(r"\x1b\[[0-9;]*m")
OVERSTRIKE = re.compile(r".\x08")


def read_corpus():
    """Fortune entries (English + Chinese), cleaned, in a fixed order."""
    if not FORTUNES.is_dir():
        sys.exit("install the corpus first: apt-get install -y fortunes fortunes-zh")
    entries = []
    for path in sorted(FORTUNES.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        text = OVERSTRIKE.sub("", ANSI.sub("", text))
        for entry in text.split("\n%\n"):
            entry = entry.strip("\n%")
            if entry.strip():
                entries.append(entry)
    if not any("杜甫" in e for e in entries):
        sys.exit("Chinese fortunes missing: apt-get install -y fortunes-zh")
    return entries


def train_bpe(corpus_lines):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus_lines, trainer=trainer)
    assert tok.get_vocab_size() == 1000, tok.get_vocab_size()
    assert tok.token_to_id("<|endoftext|>") == 0
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in ADDED])
    for i, t in enumerate(ADDED):
        assert tok.token_to_id(t) == 1000 + i, (t, tok.token_to_id(t))
    return tok


def bpe_config():
    added = {"0": {"content": "<|endoftext|>", "special": True}}
    for i, t in enumerate(ADDED):
        added[str(1000 + i)] = {"content": t, "special": True}
    for v in added.values():
        v.update({"lstrip": False, "rstrip": False, "single_word": False, "normalized": False})
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": "[CLS]",
        "eos_token": "</s>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 2048,
        "added_tokens_decoder": added,
    }


def write_json(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=False) + "\n",
                    encoding="utf-8")


def write_compact_cases(path, obj):
    """Like write_json, but one compact line per case (keeps the fixture small and diffable)."""
    cases = obj.pop("cases")
    head = json.dumps(obj, ensure_ascii=False, indent=1)
    lines = [json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in cases]
    path.write_text(head[:-2] + ',\n "cases": [\n' + ",\n".join(lines) + "\n ]\n}\n",
                    encoding="utf-8")


def train_sp(corpus_file, workdir):
    """Trains in `workdir` with relative paths: the .model records its trainer_spec (input and
    model_prefix), so absolute temp paths would make the file differ from run to run."""
    workdir.mkdir()
    shutil.copyfile(corpus_file, workdir / "corpus.txt")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        _train_sp_here()
    finally:
        os.chdir(cwd)
    return workdir / "tokenizer.model"


def _train_sp_here():
    spm.SentencePieceTrainer.train(
        input="corpus.txt", model_prefix="tokenizer", model_type="bpe", vocab_size=1000,
        byte_fallback=True, character_coverage=0.98, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", max_sentence_length=1 << 16,
        minloglevel=2)


SP_SPECIAL = ["<unk>", "<s>", "</s>"]
SP_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SP_SPECIAL) + ")")


def sp_encode_split(sp, text):
    """HF slow LlamaTokenizer (legacy=True) semantics: special-token strings are cut out of the
    text first, and every other non-empty chunk is encoded by sentencepiece on its own."""
    ids = []
    for part in SP_SPLIT.split(text):
        if part in SP_SPECIAL:
            ids.append(sp.piece_to_id(part))
        elif part:
            ids.extend(sp.encode(part, out_type=int))
    return ids


def sp_decode_split(sp, ids, skip_special):
    """Runs of ordinary ids go through sentencepiece's decoder; control ids become their piece
    text (or nothing when skipped)."""
    out, run = [], []
    for i in ids:
        if sp.is_control(i) or sp.is_unknown(i):
            out.append(sp.decode(run))
            run = []
            if not skip_special:
                out.append(sp.id_to_piece(i))
        else:
            run.append(i)
    out.append(sp.decode(run))
    return "".join(out)


def parity_cases(entries):
    cases = [
        "",
        " ",
        "  ",
        "\n",
        "\n\n\n",
        "\t",
        "a",
        "Hello world",
        "Hello  world",
        "Hello   world  ",
        " leading space",
        "trailing space ",
        "multiple\n\nnewlines\n\n\nhere",
        "line one\nline two\r\nline three",
        "tabs\tbetween\t\twords",
        "   indented with spaces",
        "I'm sure it's what you'd've done; they'll say we're fine. I've",
        "DON'T SHOUT, IT'S RUDE",
        "The year 2023 had 365 days; pi ≈ 3.14159265358979.",
        "1234567890 12 345 6789 00000",
        "数字１２３４５ and ４５６",
        "北京的十大景点是什么?请将回答翻译成英文和日语",
        "写一首中秋主题的五言绝句",
        "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
        "你好，世界！Hello, 世界! 混合 mixed text 123。",
        "日本語のテキストも少し。カタカナとひらがな。",
        "한국어 문장도 있습니다.",
        "Привет, мир! Съешь же ещё этих мягких французских булок.",
        "Ελληνικά: Γαζέες καὶ μυρτιὲς δὲν θὰ βρῶ πιὰ στὸ χρυσαφὶ ξέφωτο.",
        "مرحبا بالعالم",
        "שלום עולם",
        "हिन्दी पाठ",
        "café naïve résumé façade Ångström Zoë",
        "e\u0301 combining acute vs é precomposed",
        "emoji 😀 😃 😄 😁",
        "family 👨‍👩‍👧‍👦 and couple 👩‍❤️‍👨",
        "skin tones 👍🏻 👍🏼 👍🏽 👍🏾 👍🏿",
        "flags 🇨🇳 🇺🇸 🇫🇷",
        "🙂🙂🙂🙂🙂",
        "math ∑∫∂√∞ ≠ ≤ ≥ ± × ÷",
        "quotes “smart” ‘single’ «guillemets» — dash – en",
        "zero\u200bwidth\u200cjoiner\u200dtest",
        "nbsp\u00a0here and\u3000ideographic space",
        "def foo(x):\n    return x * 2\n",
        "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
        "if __name__ == \"__main__\":\n    main()\n\n\n",
        "#include <vector>\nint main() { std::vector<int> v{1, 2, 3}; return v.size(); }",
        "SELECT * FROM users WHERE id = 42 AND name LIKE '%bob%';",
        "    \t    mixed indent\n\t\t  \n",
        "<html><body><p class=\"x\">Hi &amp; bye</p></body></html>",
        "https://example.com/path?q=1&r=two#frag",
        "user@example.org, +1-555-0100",
        "```python\nprint('hi')\n```",
        "path/to/file_name-v2.tar.gz",
        "CamelCaseIdentifier snake_case_identifier kebab-case-identifier",
        "!!!???...,,,;;;:::",
        "a\u00adb soft hyphen",
        "control \x01\x02 chars",
        "<|endoftext|>",
        "Hello<|endoftext|>world",
        "<|startofpiece|>北京在哪里？<|endofpiece|>",
        "[CLS]Question: what? </s>",
        "text [MASK] more [gMASK] and [sMASK]",
        "<|LDWANG|><|LDWANG|>",
        " </s> spaced </s> ",
        "<s>[INST] hello [/INST] hi </s>",
        "<unk> token <s> literal",
        "A chat between a curious human and an artificial intelligence assistant.###Human: hi###Assistant:",
        "The quick brown fox jumps over the lazy dog. " * 3,
        "x" * 120,
        " " * 17 + "spaces",
        "\n" * 9 + "newlines",
        "ab\n \ncd",
        "a \n b",
        "word  \nnext",
        "end with spaces   ",
        "end with newline\n",
    ]
    # Deterministic sample of corpus entries (every k-th, truncated to 120 characters).
    step = max(1, len(entries) // 190)
    for entry in entries[::step][:190]:
        cases.append(entry[:120])
    # Remove accidental duplicates, keeping order.
    seen, unique = set(), []
    for c in cases:
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main():
    entries = read_corpus()
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="aviary-tokfix-"))
    try:
        corpus_file = work / "corpus.txt"
        # One entry per line for SentencePiece (newlines inside an entry become spaces there).
        # Only every third Chinese entry goes in: a vocab of 1000 cannot hold the ~835 distinct
        # characters that the full corpus needs at the minimum character_coverage (0.98); with
        # byte_fallback the rarer characters become <0xNN> pieces instead.
        cjk = re.compile(r"[\u4e00-\u9fff]")
        zh_seen = 0
        sp_lines = []
        for e in entries:
            if cjk.search(e):
                zh_seen += 1
                if zh_seen % 3 != 1:
                    continue
            sp_lines.append(e.replace("\n", " "))
        corpus_file.write_text("\n".join(sp_lines) + "\n", encoding="utf-8")

        # ---- byte-level BPE --------------------------------------------------------------------
        bpe = train_bpe(entries)
        again = train_bpe(entries)
        assert bpe.to_str() == again.to_str(), "BPE trainer is not deterministic"

        bpe_dir = OUT / "bpe"
        bpe_dir.mkdir(exist_ok=True)
        bpe.save(str(bpe_dir / "tokenizer.json"), pretty=True)
        cfg = bpe_config()
        write_json(bpe_dir / "tokenizer_config.json", cfg)
        special_map = {"bos_token": "[CLS]", "eos_token": "</s>", "pad_token": "<|endoftext|>",
                       "unk_token": "<|endoftext|>"}
        write_json(bpe_dir / "special_tokens_map.json", special_map)

        vm_dir = OUT / "bpe-vocab-merges"
        vm_dir.mkdir(exist_ok=True)
        bpe.model.save(str(vm_dir))  # vocab.json + merges.txt ("#version: 0.2" header)
        write_json(vm_dir / "tokenizer_config.json", cfg)
        write_json(vm_dir / "special_tokens_map.json", special_map)

        # Same model, other pipeline components.
        tmpl = Tokenizer.from_str(bpe.to_str())
        tmpl.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GPT2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tmpl.post_processor = processors.TemplateProcessing(
            single="[CLS] $A </s>", pair="[CLS] $A </s> $B:1 </s>:1",
            special_tokens=[("[CLS]", 1006), ("</s>", 1007)])
        tmpl_dir = OUT / "bpe-template"
        tmpl_dir.mkdir(exist_ok=True)
        tmpl.save(str(tmpl_dir / "tokenizer.json"), pretty=True)

        # Cross-check: a tokenizer rebuilt from vocab.json + merges.txt encodes identically.
        vm = Tokenizer(models.BPE.from_file(str(vm_dir / "vocab.json"), str(vm_dir / "merges.txt")))
        vm.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        vm.decoder = decoders.ByteLevel()
        vm.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                               for t in ["<|endoftext|>"] + ADDED])

        # ---- SentencePiece -----------------------------------------------------------------------
        sp_dir = OUT / "sp"
        sp_dir.mkdir(exist_ok=True)
        first = train_sp(corpus_file, work / "sp1")
        second = train_sp(corpus_file, work / "sp2")
        assert first.read_bytes() == second.read_bytes(), "SentencePiece trainer is not deterministic"
        shutil.copyfile(first, sp_dir / "tokenizer.model")
        sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
        assert sp.get_piece_size() == 1000
        assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
        write_json(sp_dir / "tokenizer_config.json", {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": None,
            "legacy": True,
            "model_max_length": 2048,
            "clean_up_tokenization_spaces": False,
        })
        write_json(sp_dir / "special_tokens_map.json",
                   {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
        # transformers 5's LlamaTokenizer is a converted `tokenizers` pipeline whose merges differ
        # from sentencepiece's own BPE on whitespace runs; it is recorded for information only.
        hf_llama = transformers.AutoTokenizer.from_pretrained(str(sp_dir), legacy=True)

        # ---- expected ids ------------------------------------------------------------------------
        cases = parity_cases(entries)
        assert len(cases) >= 250, len(cases)
        out_cases = []
        for text in cases:
            ids = bpe.encode(text, add_special_tokens=False).ids
            ids_sp = bpe.encode(text, add_special_tokens=True).ids
            assert ids == ids_sp  # ByteLevel post-processor adds nothing
            assert vm.encode(text).ids == ids, text
            t_ids = tmpl.encode(text, add_special_tokens=False).ids
            t_ids_sp = tmpl.encode(text, add_special_tokens=True).ids
            assert t_ids == ids, text
            raw = sp.encode(text, out_type=int)
            sp_ids = sp_encode_split(sp, text)
            sp_ids_bos = [sp.bos_id()] + sp_ids
            out_cases.append({
                "text": text,
                "bpe": {
                    "ids": ids,
                    "decode": bpe.decode(ids, skip_special_tokens=False),
                    "decode_skip_special": bpe.decode(ids, skip_special_tokens=True),
                    "template_ids_special": t_ids_sp,
                },
                "sp": {
                    "raw_ids": raw,
                    "raw_decode": sp.decode(raw),
                    "ids": sp_ids,
                    "ids_special": sp_ids_bos,
                    "decode": sp_decode_split(sp, sp_ids_bos, skip_special=False),
                    "decode_skip_special": sp_decode_split(sp, sp_ids_bos, skip_special=True),
                    "transformers_agrees": hf_llama.encode(text) == sp_ids_bos,
                },
            })
        write_compact_cases(OUT / "parity.json", {
            "generator": "tests/reference/make_tokenizer_fixtures.py",
            "versions": {"tokenizers": tokenizers.__version__,
                         "sentencepiece": spm.__version__,
                         "transformers": transformers.__version__},
            "corpus_entries": len(entries),
            "files": {str(p.relative_to(OUT)): sha256(p)
                      for p in sorted(OUT.rglob("*")) if p.is_file() and p.name != "parity.json"},
            "cases": out_cases,
        })
        agree = sum(c["sp"]["transformers_agrees"] for c in out_cases)
        print(f"wrote {len(out_cases)} cases to {OUT}; transformers LlamaTokenizer agrees with "
              f"sentencepiece on {agree}/{len(out_cases)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
