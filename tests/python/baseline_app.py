"""The seed's FastAPI app as it was: every worker loads its own copy.

Used by test_fastapi_app.py as the memory baseline next to
examples/fastapi_app/server.py (same endpoint, same warm-up).
"""
import os

import torch
from fastapi import FastAPI
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL_DIR = os.environ["MODEL_DIR"]
DTYPE = os.environ.get("MODEL_DTYPE", "auto")

model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True, dtype=DTYPE)
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
with torch.inference_mode():
    model.generate(**tokenizer("warm up", return_tensors="pt"), max_new_tokens=1)
app = FastAPI()


@app.get("/infer")
def infer(prompt: str, max_length: int = 128):
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        outputs = model.generate(**inputs, max_length=max_length)
    return {"result": tokenizer.decode(outputs[0], skip_special_tokens=True)}
