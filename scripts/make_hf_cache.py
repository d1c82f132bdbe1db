#!/usr/bin/env python3
"""Generate a model in a Hugging Face hub cache layout, offline.

Writes <cache>/models--ORG--NAME/{blobs,snapshots/<commit>,refs/main} exactly as
huggingface_hub does: LFS files (*.safetensors) are blobs named by their sha256,
small files by their git blob sha1, and snapshot entries are relative symlinks
into blobs/. Used by the demo, the benchmarks and tests that need big models.

  make_hf_cache.py --cache /tmp/hub --model demo/tiny --size 64MiB --tensors 300
  make_hf_cache.py --cache /tmp/hub --model demo/big --size 1GiB --shards 2
"""
import argparse
import hashlib
import json
import os
import re
import sys

import numpy as np
from safetensors.numpy import save_file

UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2,
         "g": 1024**3, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3}


def parse_size(text):
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def file_digest(path, git_blob):
    h = hashlib.sha1() if git_blob else hashlib.sha256()
    if git_blob:
        h.update(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def add_file(repo, snapshot, name, tmp_path):
    lfs = name.endswith(".safetensors") or os.path.getsize(tmp_path) > 10 << 20
    digest = file_digest(tmp_path, git_blob=not lfs)
    blob = os.path.join(repo, "blobs", digest)
    os.replace(tmp_path, blob)
    link = os.path.join(snapshot, name)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    depth = name.count("/")
    target = os.path.join(*([".."] * (2 + depth)), "blobs", digest)
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(target, link)


def tensor_plan(total_bytes, count, dtype):
    itemsize = np.dtype(dtype).itemsize
    per = max(itemsize, total_bytes // max(count, 1))
    elems = max(1, per // itemsize)
    cols = 256 if elems >= 256 else elems
    rows = max(1, elems // cols)
    return [(f"model.layers.{i // 4}.w{i % 4}.weight", (rows, cols)) for i in range(count)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="hub cache dir (like HF_HUB_CACHE)")
    ap.add_argument("--model", required=True, help="repo id, ORG/NAME")
    ap.add_argument("--size", type=parse_size, default=parse_size("16MiB"), help="total tensor bytes")
    ap.add_argument("--tensors", type=int, default=32, help="number of tensors")
    ap.add_argument("--shards", type=int, default=1, help="number of safetensors files")
    ap.add_argument("--dtype", default="float16", help="numpy dtype of the tensors")
    ap.add_argument("--commit", default=None, help="40-hex commit (default: derived from the args)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    org_name = args.model.split("/")
    repo = os.path.join(args.cache, "models--" + "--".join(org_name))
    commit = args.commit or hashlib.sha1(
        f"{args.model}:{args.size}:{args.tensors}:{args.shards}:{args.dtype}:{args.seed}".encode()).hexdigest()
    snapshot = os.path.join(repo, "snapshots", commit)
    for d in ("blobs", "refs", os.path.join("snapshots", commit)):
        os.makedirs(os.path.join(repo, d), exist_ok=True)

    rng = np.random.default_rng(args.seed)
    plan = tensor_plan(args.size, args.tensors, args.dtype)
    shards = [plan[i::args.shards] for i in range(args.shards)]
    weight_map = {}
    for s, names in enumerate(shards):
        fname = "model.safetensors" if args.shards == 1 else f"model-{s + 1:05d}-of-{args.shards:05d}.safetensors"
        tensors = {}
        for name, shape in names:
            raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(args.dtype).itemsize, dtype=np.uint8)
            tensors[name] = raw.view(args.dtype).reshape(shape)
            weight_map[name] = fname
        tmp = os.path.join(repo, "blobs", f".tmp-{os.getpid()}")
        save_file(tensors, tmp, metadata={"format": "pt"})
        add_file(repo, snapshot, fname, tmp)
    files = {"config.json": json.dumps({"model_type": "wbroker-demo", "tensors": args.tensors}, indent=2)}
    if args.shards > 1:
        total = sum(int(np.prod(s)) * np.dtype(args.dtype).itemsize for _, s in plan)
        files["model.safetensors.index.json"] = json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    for name, text in files.items():
        tmp = os.path.join(repo, "blobs", f".tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(text)
        add_file(repo, snapshot, name, tmp)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    print(commit)


if __name__ == "__main__":
    sys.exit(main())
