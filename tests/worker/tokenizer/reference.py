#!/usr/bin/env python3
"""wbroker tests: reference ids and decodes from the Hugging Face `tokenizers` library.

Reads a tokenizer.json and a corpus (a JSON list of strings, so whitespace is
exact) and writes, for every corpus entry, what tokenizers.Tokenizer gives:

  {"vocab_size": N,
   "entries": [{"text": ..., "ids": [...], "ids_no_special": [...],
                "decode": decode(ids, skip_special_tokens=True),
                "decode_keep_special": decode(ids, skip_special_tokens=False),
                "decode_no_special": decode(ids_no_special, skip_special_tokens=True)}]}

Truncation and padding in tokenizer.json are switched off: the C++ tokenizer
never truncates or pads.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def reference(tokenizer_json: str, texts):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    tok.no_truncation()
    tok.no_padding()
    entries = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=True).ids
        plain = tok.encode(text, add_special_tokens=False).ids
        entries.append({
            "text": text,
            "ids": ids,
            "ids_no_special": plain,
            "decode": tok.decode(ids, skip_special_tokens=True),
            "decode_keep_special": tok.decode(ids, skip_special_tokens=False),
            "decode_no_special": tok.decode(plain, skip_special_tokens=True),
        })
    return {"vocab_size": tok.get_vocab_size(with_added_tokens=True), "entries": entries}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="path to tokenizer.json")
    ap.add_argument("--corpus", required=True, help="JSON list of strings")
    ap.add_argument("--out", required=True, help="where to write the reference JSON")
    args = ap.parse_args(argv)
    with open(args.corpus, encoding="utf-8") as f:
        texts = json.load(f)
    result = reference(args.tokenizer, texts)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
