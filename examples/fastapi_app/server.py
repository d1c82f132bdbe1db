"""The seed's FastAPI app, on wbroker: N gunicorn workers, one copy of the weights.

Before (every worker loads its own copy):

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, revision=REV, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, revision=REV, local_files_only=True)

After (every worker attaches the broker's copy, zero-copy):

    model = wbroker.transformers.from_pretrained(MODEL_ID, revision=REV)
    tokenizer = AutoTokenizer.from_pretrained(model.wbroker_lease.snapshot)

Run:  gunicorn -w 4 -k uvicorn.workers.UvicornWorker -b 127.0.0.1:8000 server:app
Environment: MODEL_ID (org/name), MODEL_REVISION (branch, tag or commit; default
main), WBROKER_SOCKET (default /run/wbroker/wbroker.sock), WBROKER_TASK
("generate", the default, or "embed" for sentence-transformers models).
"""
import os

import torch
from fastapi import FastAPI, HTTPException

import wbroker.transformers as wbt

MODEL_ID = os.environ.get("MODEL_ID", "Qwen/Qwen2.5-0.5B-Instruct")
REVISION = os.environ.get("MODEL_REVISION") or None
TASK = os.environ.get("WBROKER_TASK", "generate")
# "auto" keeps the checkpoint's dtype; e.g. float32 runs a bf16 checkpoint in
# fp32 on CPUs. The broker makes that cast once and shares it too.
DTYPE = os.environ.get("MODEL_DTYPE", "auto")

app = FastAPI(title="wbroker FastAPI example")

if TASK == "embed":
    encoder = wbt.sentence_transformer(MODEL_ID, revision=REVISION, dtype=DTYPE)
    lease = encoder.wbroker_lease
else:
    from transformers import AutoTokenizer

    model = wbt.from_pretrained(MODEL_ID, revision=REVISION, dtype=DTYPE)
    lease = model.wbroker_lease
    tokenizer = AutoTokenizer.from_pretrained(lease.snapshot)
    if os.environ.get("WARMUP", "1") == "1":
        # One token at start-up: the first request is not the slow one.
        with torch.inference_mode():
            model.generate(**tokenizer("warm up", return_tensors="pt").to(model.device), max_new_tokens=1)


@app.get("/infer")
def infer(prompt: str, max_length: int = 128):
    """The seed's endpoint: the prompt and its continuation, greedy."""
    if TASK != "generate":
        raise HTTPException(400, f"{MODEL_ID} is served for embeddings; use /embed")
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        outputs = model.generate(**inputs, max_length=max_length)
    return {"result": tokenizer.decode(outputs[0], skip_special_tokens=True)}


@app.get("/embed")
def embed(text: str):
    """Sentence embedding (WBROKER_TASK=embed)."""
    if TASK != "embed":
        raise HTTPException(400, f"{MODEL_ID} is served for generation; use /infer")
    with torch.inference_mode():
        vec = encoder.encode([text], convert_to_numpy=True)[0]
    return {"embedding": vec.tolist()}


@app.get("/healthz")
def healthz():
    """Which model and commit this worker serves, and from where."""
    return {"model": lease.model, "revision": lease.revision, "device": lease.device,
            "backend": lease.backend, "pid": os.getpid()}

