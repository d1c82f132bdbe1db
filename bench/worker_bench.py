#!/usr/bin/env python3
"""wbroker-worker: start-up time and generation speed, attached vs --from-disk.

Builds (once, cached under bench/out/worker-hub) a tiny random Qwen2 and a
random Qwen2 of ~1.1 GB in fp32 (~277M parameters), starts wbrokerd with
both preloaded, then measures with the wbroker-worker of --build:

  (a) start-up: exec -> first GET /readyz == 200, for each model, attached
      to the broker vs --from-disk (a private copy read from the HF cache,
      the "every worker loads its own copy" baseline). Page cache and arena
      warm (one untimed start of each first); runs interleaved; median.
  (b) generation: tokens/s of sequential greedy POST /v1/completions
      (--tokens each, --requests prompts) on the big model, one attached
      and one --from-disk worker alive together, requests alternating
      between them so that load from other processes hits both alike.

Prints a table and writes JSON (default bench/out/worker.json). --quick
(bench/run-all --quick): a ~40 MB "big" model in its own cache, 1 timed
start, 2 requests of 8 tokens; a smoke test, not the documented numbers.

  bench/worker_bench.py [--quick] [--build build] [--runs 5] [--tokens 64] [--requests 8]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fixtures"))

PROMPTS = ["Hello world, the fox", "Shared memory, zero copies:", "def main():\n    return",
           "The quick brown fox jumps over", "Numbers 0123456789 and symbols",
           "Lorem ipsum dolor sit amet,"]


# (hidden, intermediate, layers, heads, kv heads) of the "big" model.
BIG_SHAPE = {"full": (1536, 4096, 11, 12, 4), "quick": (512, 1024, 4, 8, 4)}


def big_qwen2(cache, repo, shape):
    """A random Qwen2, fp32: ~1.1 GB of weights (full), ~40 MB (quick)."""
    hidden, intermediate, layers, heads, kv_heads = shape
    import torch
    import transformers as tf
    from make_tiny_model import install_dir, make_tokenizer_for
    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tokenizer_for("qwen2", tmp)
        torch.manual_seed(11)
        cfg = tf.Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                             num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=kv_heads,
                             max_position_embeddings=512, tie_word_embeddings=False,
                             initializer_range=0.02, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        tf.Qwen2ForCausalLM(cfg).to(torch.float32).save_pretrained(tmp)
        return install_dir(tmp, str(cache), repo)


def ensure_models(cache, shape):
    """{"tiny": info, "big": info}; built on first use, reused afterwards."""
    from make_tiny_model import make_tiny_model
    cache.mkdir(parents=True, exist_ok=True)
    index = cache / "bench-models.json"
    if index.exists():
        models = json.loads(index.read_text())
        if all(Path(m["snapshot"]).is_dir() for m in models.values()):
            return models
    print("building the benchmark models (once) ...", flush=True)
    models = {"tiny": make_tiny_model("qwen2", str(cache), "bench/qwen2-tiny", seed=1),
              "big": big_qwen2(cache, "bench/qwen2-1g", shape)}
    index.write_text(json.dumps(models))
    return models


def weight_bytes(snapshot):
    return sum(f.stat().st_size for f in Path(snapshot).glob("*.safetensors"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small models, few runs (a smoke test)")
    ap.add_argument("--build", default=os.environ.get("WBROKER_BINARY_DIR", str(REPO / "build")))
    ap.add_argument("--cache", help="HF cache for the models (default bench/out/worker-hub[-quick])")
    ap.add_argument("--runs", type=int, help="timed starts per model and mode (default 5; quick 1)")
    ap.add_argument("--tokens", type=int, help="max_tokens per completion (default 64; quick 8)")
    ap.add_argument("--requests", type=int, help="completions per mode (default 8; quick 2)")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "worker.json"))
    args = ap.parse_args()
    mode = "quick" if args.quick else "full"
    args.cache = args.cache or str(REPO / "bench" / "out" / ("worker-hub-quick" if args.quick else "worker-hub"))
    args.runs = args.runs or (1 if args.quick else 5)
    args.tokens = args.tokens or (8 if args.quick else 64)
    args.requests = args.requests or (2 if args.quick else 8)
    os.environ["WBROKER_BINARY_DIR"] = os.path.abspath(args.build)
    os.environ["HF_HUB_OFFLINE"] = "1"
    from wbtest import Broker, Worker  # after WBROKER_BINARY_DIR is set

    cache = Path(args.cache)
    models = ensure_models(cache, BIG_SHAPE[mode])
    sizes = {k: weight_bytes(m["snapshot"]) for k, m in models.items()}
    result = {"mode": mode, "runs": args.runs, "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
              "models": {}, "startup": {}, "generation": {}}
    for k, m in models.items():
        result["models"][k] = {"repo": m["repo"], "weights_bytes": sizes[k]}

    with tempfile.TemporaryDirectory(prefix="worker-bench-") as tmp:
        tmp = Path(tmp)
        broker = Broker(tmp, cache, ["--preload", models["tiny"]["repo"], "--preload",
                                     models["big"]["repo"]]).start()
        try:
            def start(model, mode, tag):
                w = Worker(models[model]["repo"], broker if mode == "attached" else None,
                           log=tmp / f"{tag}.log", from_disk=mode == "from-disk", cache=cache)
                return w.start(timeout=900)

            # (a) start-up. The untimed first starts wait for the broker's
            # preload and pull the snapshot into the page cache.
            for model in models:
                for mode in ("attached", "from-disk"):
                    start(model, mode, f"warm-{model}-{mode}").stop()
            for model in models:
                times = {"attached": [], "from-disk": []}
                for i in range(args.runs):
                    for mode in times:
                        w = start(model, mode, f"{model}-{mode}-{i}")
                        times[mode].append(w.ready_after)
                        assert w.stop() == 0, w.log_text()
                result["startup"][model] = {mode: {"median_s": statistics.median(t), "min_s": min(t),
                                                   "runs_s": t} for mode, t in times.items()}
                print(f"startup {model}: " + ", ".join(
                    f"{mode} {statistics.median(t) * 1000:.0f} ms" for mode, t in times.items()), flush=True)

            # (b) generation speed on the big model.
            workers = {mode: start("big", mode, f"gen-{mode}") for mode in ("attached", "from-disk")}
            try:
                stats = {mode: {"tokens": 0, "seconds": 0.0} for mode in workers}
                texts = {mode: [] for mode in workers}
                for w in workers.values():
                    w.complete("warm up", 2)
                for i in range(args.requests):
                    prompt = PROMPTS[i % len(PROMPTS)]
                    # Alternate which goes first, so neither always follows the other.
                    order = list(workers.items())[::1 if i % 2 == 0 else -1]
                    for mode, w in order:
                        t0 = time.perf_counter()
                        body = w.complete(prompt, args.tokens)
                        elapsed = time.perf_counter() - t0
                        stats[mode]["seconds"] += elapsed
                        stats[mode].setdefault("per_request_s", []).append(elapsed)
                        stats[mode]["tokens"] += body["usage"]["completion_tokens"]
                        texts[mode].append(body["choices"][0]["text"])
                assert texts["attached"] == texts["from-disk"], "attached and from-disk disagree"
            finally:
                for w in workers.values():
                    w.stop()
            for mode, s in stats.items():
                s["tokens_per_s"] = s["tokens"] / s["seconds"]
            result["generation"] = {"model": "big", "max_tokens": args.tokens,
                                    "requests": args.requests, **stats,
                                    "ratio_attached_over_from_disk":
                                        stats["attached"]["tokens_per_s"] / stats["from-disk"]["tokens_per_s"]}
        finally:
            broker.stop()
    result["loadavg_after"] = os.getloadavg()

    su = result["startup"]
    result["startup"]["attached_big_over_tiny"] = (su["big"]["attached"]["median_s"] /
                                                   su["tiny"]["attached"]["median_s"])
    result["startup"]["from_disk_big_over_tiny"] = (su["big"]["from-disk"]["median_s"] /
                                                    su["tiny"]["from-disk"]["median_s"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(f"{'start-up (exec -> /readyz 200)':34} {'attached':>12} {'--from-disk':>12}")
    for model in models:
        mib = sizes[model] / 2**20
        print(f"  {model + f' ({mib:,.1f} MiB)':32} "
              f"{su[model]['attached']['median_s'] * 1000:10.0f} ms {su[model]['from-disk']['median_s'] * 1000:9.0f} ms")
    print(f"  {'big / tiny':32} {su['attached_big_over_tiny']:11.2f}x {su['from_disk_big_over_tiny']:11.2f}x")
    g = result["generation"]
    print(f"{'greedy tokens/s (big model)':34} {g['attached']['tokens_per_s']:12.2f} "
          f"{g['from-disk']['tokens_per_s']:12.2f}   ratio {g['ratio_attached_over_from_disk']:.3f}")
    print(f"({args.requests} x {args.tokens} tokens each; {result['cpus']} CPUs, "
          f"load {result['loadavg_before'][0]:.2f} -> {result['loadavg_after'][0]:.2f}); JSON: {args.out}")


if __name__ == "__main__":
    sys.exit(main())
