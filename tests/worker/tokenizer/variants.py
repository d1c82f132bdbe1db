#!/usr/bin/env python3
"""wbroker tests: tokenizer.json variants covering the components the three
fixtures do not use (other normalizers, pre-tokenizers, split behaviors,
decoders and post-processors).

Each variant is a fixture (tests/fixtures/make_tokenizer.py) with some
components swapped, written to OUT/<name>/tokenizer.json; the names are
printed one per line. The `tokenizers` library must load every variant.

Usage: variants.py --out DIR
"""

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures"))
from make_tokenizer import make_tokenizer  # noqa: E402

GT = "\u0120"  # the byte-level alphabet's space


def split(pattern, behavior, invert=False, literal=False):
    return {"type": "Split", "pattern": {("String" if literal else "Regex"): pattern},
            "behavior": behavior, "invert": invert}


def variants(base):
    bert, gpt2, qwen2 = base["bert"], base["gpt2"], base["qwen2"]
    out = {}

    v = copy.deepcopy(bert)
    v["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "NFD"}, {"type": "Lowercase"}, {"type": "StripAccents"}]}
    v["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Whitespace"}, {"type": "Digits", "individual_digits": True}]}
    v["post_processor"] = {"type": "BertProcessing", "sep": ["[SEP]", 102], "cls": ["[CLS]", 101]}
    out["bert_nfd_whitespace_digits"] = v

    v = copy.deepcopy(bert)
    v["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "NFKC"}, {"type": "Lowercase"}, {"type": "Strip", "strip_left": True,
                                                   "strip_right": True}]}
    v["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "WhitespaceSplit"}, {"type": "Punctuation", "behavior": "Contiguous"},
        {"type": "Digits", "individual_digits": False}]}
    v["post_processor"] = {"type": "RobertaProcessing", "sep": ["[SEP]", 102],
                           "cls": ["[CLS]", 101], "trim_offsets": True, "add_prefix_space": False}
    v["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "##"}, "content": ""},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    out["bert_nfkc_punctuation_roberta"] = v

    v = copy.deepcopy(bert)
    v["normalizer"] = {"type": "BertNormalizer", "clean_text": True,
                       "handle_chinese_chars": False, "strip_accents": True, "lowercase": False}
    v["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        split(r"\s+", "Removed"), {"type": "Punctuation", "behavior": "MergedWithNext"}]}
    v["decoder"] = {"type": "WordPiece", "prefix": "##", "cleanup": False}
    v["truncation"] = None
    v["padding"] = None
    out["bert_cased_split_removed"] = v

    v = copy.deepcopy(gpt2)
    v["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFKC"},
                                                           {"type": "Lowercase"}]}
    v["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        split(" ", "MergedWithNext", literal=True),
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    v["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    out["gpt2_prefix_space_lowercase"] = v

    v = copy.deepcopy(gpt2)
    v["model"]["ignore_merges"] = True
    v["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        split(r"\p{N}+", "MergedWithPrevious", invert=False),
        split(r"[.,;!?]", "Contiguous", invert=True),
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
         "use_regex": True}]}
    v["post_processor"] = {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<mask>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}},
                                      {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                    {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {
                               "<|endoftext|>": {"id": "<|endoftext|>", "ids": [0],
                                                 "tokens": ["<|endoftext|>"]},
                               "<mask>": {"id": "<mask>", "ids": [3000], "tokens": ["<mask>"]}}}
    out["gpt2_ignore_merges_template"] = v

    v = copy.deepcopy(qwen2)
    v["normalizer"] = None
    v["model"]["merges"] = [m.split(" ") if isinstance(m, str) else m
                            for m in v["model"]["merges"]]
    v["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"Regex": GT + "+"}, "content": GT},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
         "use_regex": False}]}
    v["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        {"type": "TemplateProcessing",
         "single": [{"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": "<|im_end|>", "type_id": 0}}],
         "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<|im_end|>": {"id": "<|im_end|>", "ids": [2],
                                           "tokens": ["<|im_end|>"]}}}]}
    v["added_tokens"].append({"id": 3000, "content": "<think>", "single_word": False,
                              "lstrip": True, "rstrip": True, "normalized": False,
                              "special": False})
    out["qwen2_no_normalizer_sequence_post"] = v
    return out


def main(argv=None) -> int:
    from tokenizers import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    base = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("bert", "gpt2", "qwen2"):
            path = make_tokenizer(kind, Path(tmp) / kind)
            base[kind] = json.loads(Path(path).read_text(encoding="utf-8"))
    for name, data in variants(base).items():
        text = json.dumps(data, ensure_ascii=False)
        Tokenizer.from_str(text)  # the reference must accept it
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "tokenizer.json").write_text(text, encoding="utf-8")
        print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
