// wbroker HTTP worker: everything configurable about the HTTP server.
#pragma once

#include <chrono>
#include <cstddef>
#include <string>
#include <vector>

namespace wbroker::http {

struct HttpServerOptions {
  /// "HOST:PORT", "[::1]:PORT" or ":PORT"; port 0 binds an ephemeral port.
  std::string listen = "127.0.0.1:8000";
  /// SO_REUSEPORT: several worker processes bind the same port and the kernel
  /// spreads connections over them (like gunicorn's workers, without a master).
  bool reuse_port = false;
  /// Threads running the network I/O (parsing, routing, writing).
  size_t threads = 1;
  /// Threads running the engine (inference). Kept apart from the I/O threads
  /// so /healthz and /readyz answer while a long generation runs.
  size_t compute_threads = 1;
  /// Requests waiting for or running on the compute threads beyond this are
  /// refused with 503 instead of queueing without bound.
  size_t max_pending_requests = 256;
  /// Larger request bodies are refused with 413.
  size_t max_body_bytes = 1 << 20;
  /// Larger request headers are refused with 431.
  size_t max_header_bytes = 16 << 10;
  /// A keep-alive connection idle this long is closed; also the limit for
  /// receiving one whole request once the connection waits for it.
  std::chrono::milliseconds idle_timeout{30000};
  /// Sending one response (or one streamed chunk) may take at most this long.
  std::chrono::milliseconds write_timeout{60000};
  /// After Stop(), in-flight requests get this long to finish before their
  /// connections are closed (streams then stop generating).
  std::chrono::milliseconds drain_timeout{30000};
  /// Streamed text queued for a slow client beyond this makes generation wait.
  size_t max_stream_buffer_bytes = 1 << 20;
  /// The model id reported by /v1/models and in responses; "" = Engine::Info().id.
  std::string model_name;
  /// Further names accepted in a request's "model" field (besides the served
  /// name and Engine::Info().id).
  std::vector<std::string> model_aliases;
  /// Largest max_tokens a request may ask for (/infer and /v1/completions).
  int max_tokens_limit = 4096;
  /// Most inputs in one /v1/embeddings request.
  size_t max_embedding_inputs = 2048;
};

}  // namespace wbroker::http
