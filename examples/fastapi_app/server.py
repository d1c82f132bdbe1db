"""The seed's FastAPI app, on wbroker: N gunicorn workers, one copy of the weights.

Before (every worker loads its own copy):

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, revision=REV, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, revision=REV, local_files_only=True)

After (every worker attaches the broker's copy, zero-copy):

    model = wbroker.transformers.from_pretrained(MODEL_ID, revision=REV)
    tokenizer = AutoTokenizer.from_pretrained(model.wbroker_lease.snapshot)

Hot swaps: after `wbrokerctl load MODEL@NEWREV --replace`, each worker
attaches the new revision within a second (or at its next request, if that
comes first) and releases the old one, so the broker frees the old copy once
every worker has moved, busy or idle.

Run:  gunicorn -w 4 -k uvicorn.workers.UvicornWorker -b 127.0.0.1:8000 server:app
Environment: MODEL_ID (org/name), MODEL_REVISION (branch, tag or commit; default
main), WBROKER_SOCKET (default /run/wbroker/wbroker.sock), WBROKER_TASK
("generate", the default, or "embed" for sentence-transformers models).
"""
import logging
import os
import threading
import time

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


def attach(revision):
    """(model, tokenizer, lease) for `revision` as the broker serves it; the model
    is a sentence-transformers encoder and the tokenizer None for WBROKER_TASK=embed."""
    if TASK == "embed":
        encoder = wbt.sentence_transformer(MODEL_ID, revision=revision, dtype=DTYPE)
        return encoder, None, encoder.wbroker_lease
    from transformers import AutoTokenizer

    model = wbt.from_pretrained(MODEL_ID, revision=revision, dtype=DTYPE)
    tokenizer = AutoTokenizer.from_pretrained(model.wbroker_lease.snapshot)
    if os.environ.get("WARMUP", "1") == "1":
        # One token at start-up: the first request is not the slow one.
        with torch.inference_mode():
            model.generate(**tokenizer("warm up", return_tensors="pt").to(model.device), max_new_tokens=1)
    return model, tokenizer, model.wbroker_lease


served = attach(REVISION)
swap_lock = threading.Lock()  # FastAPI runs sync endpoints on a thread pool
retry_at = 0.0  # after a failed re-attach, when to try again


def current():
    """The served (model, tokenizer, lease). When the broker replaced the
    revision (a hot swap), attaches the new one first and releases the old
    lease; requests already running keep their tensors, which hold the old
    mapping until they finish."""
    global served, retry_at
    with swap_lock:
        old = served[2]
        event = old.superseded  # reads the broker's events without blocking
        if event and time.monotonic() >= retry_at:
            if event.get("release_first"):
                old.release()  # the broker has room for one copy only
            try:
                # The revision the broker rolled out: a worker pinned to a
                # commit would be refused the old one from now on.
                served = attach(event.get("new_revision") or REVISION)
            except Exception:
                retry_at = time.monotonic() + 5
                if old.released:
                    raise  # nothing left to serve until the new revision attaches
                logging.getLogger("wbroker").exception("re-attaching after a hot swap; "
                                                       "serving the old revision meanwhile")
                return served
            old.release()
        return served


def follow_swaps():
    """Checks for a hot swap every second, so that idle workers let go of the
    old copy too (with --allow-downtime the new one waits for that)."""
    while True:
        time.sleep(1)
        try:
            current()
        except Exception:  # e.g. the broker restarting: the next try or request retries
            logging.getLogger("wbroker").exception("checking for a hot swap")


threading.Thread(target=follow_swaps, name="wbroker-swaps", daemon=True).start()


@app.get("/infer")
def infer(prompt: str, max_length: int = 128):
    """The seed's endpoint: the prompt and its continuation, greedy."""
    if TASK != "generate":
        raise HTTPException(400, f"{MODEL_ID} is served for embeddings; use /embed")
    model, tokenizer, _ = current()
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        outputs = model.generate(**inputs, max_length=max_length)
    return {"result": tokenizer.decode(outputs[0], skip_special_tokens=True)}


@app.get("/embed")
def embed(text: str):
    """Sentence embedding (WBROKER_TASK=embed)."""
    if TASK != "embed":
        raise HTTPException(400, f"{MODEL_ID} is served for generation; use /infer")
    encoder, _, _ = current()
    with torch.inference_mode():
        vec = encoder.encode([text], convert_to_numpy=True)[0]
    return {"embedding": vec.tolist()}


@app.get("/healthz")
def healthz():
    """Which model and commit this worker serves, and from where."""
    lease = current()[2]
    return {"model": lease.model, "revision": lease.revision, "device": lease.device,
            "backend": lease.backend, "pid": os.getpid()}

