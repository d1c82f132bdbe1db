#!/usr/bin/env python3
"""The benchmark's model: a random Qwen2 built with transformers from a config,
saved in fp32 into a Hugging Face hub cache (refs/, snapshots/ symlinks,
blobs/) by tests/fixtures/make_tiny_model.py's install_dir. Nothing is
downloaded.

  full   hidden 1536, 8 layers, vocab 32000: 300 M parameters, 1.12 GiB fp32
  quick  hidden 512, 3 layers, vocab 8000: 16.7 M parameters, 64 MiB fp32

Run as a script it builds one spec and prints its description as JSON;
ensure_model() reuses a cache that already holds it (bench-compare.json).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

SPECS = {
    "full": dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=8,
                 num_attention_heads=12, num_key_value_heads=4),
    "quick": dict(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=2),
}


def describe(snapshot):
    """Files, bytes and tensor count of a snapshot, from the safetensors headers."""
    import struct
    files = sorted(str(p) for p in Path(snapshot).glob("*.safetensors"))
    tensors = 0
    nbytes = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, entry in header.items():
            if name != "__metadata__":
                tensors += 1
                nbytes += entry["data_offsets"][1] - entry["data_offsets"][0]
    return {"files": files, "tensors": tensors, "bytes": nbytes}


def build(spec, cache):
    """Builds the model of `spec` into `cache`; returns its description."""
    import torch
    import transformers as tf
    sys.path.insert(0, str(REPO / "tests" / "fixtures"))
    from make_tiny_model import install_dir
    tf.utils.logging.disable_progress_bar()
    torch.manual_seed(7)
    cfg = tf.Qwen2Config(**SPECS[spec], max_position_embeddings=512, tie_word_embeddings=False,
                         initializer_range=0.02, rms_norm_eps=1e-6)
    model = tf.Qwen2ForCausalLM(cfg).to(torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory(prefix="compare-model-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        info = install_dir(tmp, str(cache), f"bench/compare-qwen2-{spec}", salt=f"compare:{spec}")
    info.update(describe(info["snapshot"]), spec=spec, parameters=params, arch="Qwen2ForCausalLM",
                config=SPECS[spec], dtype="float32")
    return info


def ensure_model(python, cache, spec):
    """The description of `spec` in `cache`, built (in a child process, so the
    benchmark's own process never holds torch or the model) unless present."""
    cache = Path(cache)
    index = cache / "bench-compare.json"
    known = json.loads(index.read_text()) if index.exists() else {}
    info = known.get(spec)
    if info and Path(info["snapshot"]).is_dir() and all(Path(f).exists() for f in info["files"]):
        return info
    cache.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([python, str(Path(__file__)), "--cache", str(cache), "--spec", spec],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    info = json.loads(out.strip().splitlines()[-1])
    known[spec] = info
    index.write_text(json.dumps(known, indent=2))
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="hub cache dir (like HF_HUB_CACHE)")
    ap.add_argument("--spec", choices=sorted(SPECS), default="quick")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(build(args.spec, args.cache)))


if __name__ == "__main__":
    sys.exit(main())
