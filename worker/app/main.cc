// wbroker-worker: an HTTP inference worker (OpenAI-style API) that maps its
// model zero-copy from wbrokerd, so N workers on a host hold one copy of the
// weights. With --from-disk it reads a private copy instead (the baseline).
//
// Start-up: connect to the broker, attach the model, bind, then tell systemd
// READY=1. SIGTERM/SIGINT stop accepting, drain requests in flight, exit 0.
// libtorch stays behind torch_engine.h, so this file builds without it.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <systemd/sd-daemon.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "swappable_engine.h"
#include "torch_engine.h"
#include "wbroker/client/client.h"
#include "wbroker/common/fd_socket.h"
#include "wbroker/common/hf_cache.h"
#include "wbroker/common/version.h"
#include "wbroker/http/http_server.h"
#include "wbroker/http/listen_address.h"

namespace {

int Fail(const std::string& message) {
  std::fprintf(stderr, "wbroker-worker: %s\n", message.c_str());
  spdlog::shutdown();
  return 1;
}

/// STATUS= for `systemctl status` (a no-op outside systemd).
void NotifyStatus(const std::string& status) {
  sd_notifyf(0, "STATUS=%s", status.c_str());
}

/// libtorch threads per request: OMP_NUM_THREADS when set (libtorch reads
/// it), else the cores shared out over the compute threads so that
/// concurrent requests do not oversubscribe the CPU.
size_t IntraOpThreads(size_t requested, size_t compute_threads) {
  if (requested > 0) return requested;
  if (const char* omp = std::getenv("OMP_NUM_THREADS"); omp && *omp) return 0;
  size_t cores = std::max(1u, std::thread::hardware_concurrency());
  return std::max<size_t>(1, cores / std::max<size_t>(1, compute_threads));
}

/// Follows revision hot swaps at the broker: between requests it reads the
/// broker's events, and when the attached revision was replaced it attaches
/// the model again (the same request: it now gets the new revision), swaps
/// the engine in, and lets the old one (and its lease) go after its last
/// request. With release_first (--allow-downtime at the broker) the old
/// engine goes first and requests get 503 until the new one is ready.
class RevisionFollower {
 public:
  RevisionFollower(const wbroker::app::TorchEngineOptions& options,
                   std::shared_ptr<wbroker::app::SwappableEngine> target,
                   std::shared_ptr<wbroker::app::TorchEngine> current)
      : options_(options), target_(std::move(target)), current_(std::move(current)) {}
  ~RevisionFollower() { Stop(); }

  void Start() {
    thread_ = std::thread([this] { Run(); });
  }
  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

 private:
  void Run() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      // Events arrive on the client's socket; 200 ms bounds how long new
      // requests keep going to a replaced revision.
      wake_.wait_for(lock, std::chrono::milliseconds(200));
      if (stop_) break;
      lock.unlock();
      Step();
      lock.lock();
    }
  }

  void Step() {
    if (std::chrono::steady_clock::now() < retry_at_) return;
    if (wbroker::Status st = options_.client->PollEvents(); !st.ok()) {
      // The broker went away (restart, upgrade): reconnect with backoff and
      // re-register the lease, so a restarted broker adopts our arena
      // instead of loading a second copy. Requests go on meanwhile.
      if (!broken_logged_) spdlog::warn("broker connection: {}; reconnecting", st.message());
      broken_logged_ = true;
      auto lost = options_.client->Recover();
      if (!lost.ok()) {
        retry_at_ = std::chrono::steady_clock::now() + std::chrono::seconds(5);
        return;
      }
      broken_logged_ = false;
      spdlog::info("reconnected to wbrokerd at {}; lease re-registered: {}",
                   options_.client->socket_path(), *lost == 0 ? "yes" : "no");
    }
    auto event = current_ ? current_->Superseded() : pending_;
    if (!event && current_ && current_->LeaseLost()) {
      // The new broker refused our lease: attach afresh, as after a swap.
      event = wbroker::client::SupersededEvent{0, options_.model, "", "", "", false};
      spdlog::warn("the broker did not take our lease back: attaching {} again", options_.model);
    }
    if (!event) return;
    if (current_) {
      if (!event->new_revision.empty())
        spdlog::info("{}@{} was replaced by {} at the broker: re-attaching", event->model,
                     event->revision.substr(0, 12), event->new_revision.substr(0, 12));
      sd_notifyf(0, "STATUS=switching to %s@%s", event->model.c_str(), event->new_revision.c_str());
    }
    if (event->release_first && current_) {
      // The new revision needs this memory: let the old engine go first.
      pending_ = event;
      target_->Swap(nullptr);
      current_.reset();
    }
    // Follow the broker to the revision it rolled out: a worker pinned to a
    // commit would otherwise be refused ("was replaced by ...") for good.
    if (!event->new_revision.empty()) options_.revision = event->new_revision;
    auto next = wbroker::app::TorchEngine::Create(options_);
    if (!next.ok()) {
      spdlog::error("re-attaching {} failed (retrying in 5 s): {}", options_.model,
                    next.status().message());
      retry_at_ = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      return;
    }
    std::shared_ptr<wbroker::app::TorchEngine> fresh = std::move(next).value();
    const auto info = fresh->Info();
    target_->Swap(fresh);
    current_ = std::move(fresh);
    pending_.reset();
    spdlog::info("serving {}@{} (weights: {})", info.id, info.revision, current_->weights_source());
    sd_notifyf(0, "STATUS=serving %s@%s", info.id.c_str(), info.revision.c_str());
  }

  wbroker::app::TorchEngineOptions options_;                 ///< how to attach again
  std::shared_ptr<wbroker::app::SwappableEngine> target_;    ///< what the server calls
  std::shared_ptr<wbroker::app::TorchEngine> current_;       ///< the engine swapped in last
  std::optional<wbroker::client::SupersededEvent> pending_;  ///< a swap with downtime under way
  std::chrono::steady_clock::time_point retry_at_;           ///< after a failed re-attach
  bool broken_logged_ = false;                               ///< said once that the socket broke
  std::thread thread_;                                       ///< runs Run()
  std::mutex mu_;                                            ///< guards stop_
  std::condition_variable wake_;                             ///< ends the pause at Stop()
  bool stop_ = false;                                        ///< Stop() was called
};

}  // namespace

int main(int argc, char** argv) try {
  CLI::App app{
      "wbroker-worker: serve a Hugging Face model over HTTP (OpenAI-style API) with "
      "weights mapped zero-copy from wbrokerd"};
  std::string model_spec, socket_path, device, cache_dir;
  std::string listen = "127.0.0.1:8000", log_level = "info";
  size_t threads = 1, io_threads = 1, intra_op_threads = 0, max_body_bytes = 1 << 20;
  double drain_seconds = 30;
  std::vector<std::string> aliases;
  bool reuse_port = false, from_disk = false;
  app.add_option("--model", model_spec, "MODEL[@REV]: hub repo id (or absolute dir), revision")
      ->required();
  app.add_option("--socket", socket_path,
                 "broker socket (default: $WBROKER_SOCKET, else /run/wbroker/wbroker.sock)");
  app.add_option("--listen", listen, "HOST:PORT to serve on (default 127.0.0.1:8000)");
  app.add_option("--device", device, "cpu | cuda:N (default: the broker's default device)");
  app.add_option("--threads", threads, "compute threads: requests run concurrently (default 1)")
      ->check(CLI::Range(1, 256));
  app.add_option("--intra-op-threads", intra_op_threads,
                 "libtorch threads per request (default: OMP_NUM_THREADS, else cores/--threads)");
  app.add_option("--io-threads", io_threads, "network I/O threads (default 1)")
      ->check(CLI::Range(1, 256));
  app.add_flag("--reuse-port", reuse_port,
               "SO_REUSEPORT: several workers listen on one port, the kernel spreads connections");
  app.add_option("--max-body-bytes", max_body_bytes,
                 "larger request bodies get 413 (default 1MiB)");
  app.add_option("--drain-timeout", drain_seconds,
                 "seconds SIGTERM waits for requests in flight before closing them (default 30)")
      ->check(CLI::Range(0.0, 86400.0));
  app.add_option("--model-alias", aliases,
                 "another name accepted in requests' \"model\" (repeatable)");
  app.add_option("--log-level", log_level, "trace|debug|info|warn|error (default info)");
  app.add_flag("--from-disk", from_disk,
               "no broker: read a private copy of the weights from the HF cache (baseline)");
  app.add_option("--cache-dir", cache_dir,
                 "HF hub cache for --from-disk (default: HF_HUB_CACHE...)");
  // A version flag, not a plain one: CLI11 answers it before checking that
  // the required --model is there.
  app.set_version_flag(
      "--version",
      std::string("wbroker-worker ") + WBROKER_VERSION + " (" + WBROKER_GIT_DESCRIBE + ")",
      "print the version and exit");
  CLI11_PARSE(app, argc, argv);

  auto level = spdlog::level::from_str(log_level);
  if (level == spdlog::level::off && log_level != "off")
    return Fail("unknown log level \"" + log_level + "\"");
  spdlog::set_default_logger(spdlog::stderr_color_mt("wbroker-worker"));
  spdlog::set_level(level);
  if (std::getenv("JOURNAL_STREAM") != nullptr) spdlog::set_pattern("[%l] %v");

  auto spec = wbroker::ParseModelSpec(model_spec);
  if (!spec.ok()) return Fail("--model: " + spec.status().message());
  if (auto addr = wbroker::http::ParseListenAddress(listen); !addr.ok())
    return Fail("--listen: " + addr.status().message());

  // Signals are waited for on a thread of their own: Stop() is not
  // async-signal-safe, so it must not run inside a signal handler. The set
  // exists before the (possibly long) model load so that a SIGTERM during
  // start-up is a clean exit rather than death by signal.
  std::atomic<wbroker::http::HttpServer*> server_ptr{nullptr};
  std::atomic<bool> stop_requested{false};
  boost::asio::io_context signal_io(1);
  boost::asio::signal_set signals(signal_io, SIGTERM, SIGINT);
  signals.async_wait([&](const boost::system::error_code& ec, int sig) {
    if (ec) return;
    sd_notify(0, "STOPPING=1");
    stop_requested.store(true);
    if (auto* s = server_ptr.load()) {
      spdlog::info("{}: draining requests in flight, then exiting", strsignal(sig));
      s->Stop();
    } else {
      spdlog::info("{} during start-up: exiting before serving", strsignal(sig));
    }
  });
  std::thread signal_thread([&] { signal_io.run(); });
  // Joins the signal thread on every way out, exceptions included.
  struct SignalThreadJoiner {
    boost::asio::io_context& io;
    std::thread& thread;
    ~SignalThreadJoiner() {
      io.stop();
      if (thread.joinable()) thread.join();
    }
  } joiner{signal_io, signal_thread};

  wbroker::app::TorchEngineOptions options;
  options.model = spec->model;
  options.revision = spec->revision;
  options.device = device;
  options.cache_dir = cache_dir;
  options.intra_op_threads = IntraOpThreads(intra_op_threads, threads);
  if (!from_disk) {
    if (socket_path.empty()) socket_path = wbroker::DefaultSocketPath();
    NotifyStatus("connecting to wbrokerd at " + socket_path);
    wbroker::client::ClientOptions co;
    co.socket_path = socket_path;
    co.client_name = "wbroker-worker " + listen + " pid " + std::to_string(::getpid());
    auto client = wbroker::client::Client::Connect(co);
    if (!client.ok())
      return Fail("cannot connect to wbrokerd at " + socket_path +
                  " (is it running?): " + client.status().message());
    options.client = std::move(client).value();
  }
  NotifyStatus("loading " + model_spec);
  spdlog::info("loading {} ({})", model_spec,
               from_disk ? "private copy from disk" : "attaching from wbrokerd at " + socket_path);
  auto engine = wbroker::app::TorchEngine::Create(options);
  if (stop_requested.load()) return 0;
  if (!engine.ok()) return Fail(engine.status().message());
  std::shared_ptr<wbroker::app::TorchEngine> shared_engine = std::move(engine).value();
  const wbroker::http::ModelInfo info = shared_engine->Info();
  spdlog::info("model {}@{}: {} {} on {}, weights: {}", info.id, info.revision, info.kind,
               info.dtype, info.device, shared_engine->weights_source());
  // The server sees a SwappableEngine: a revision hot swap at the broker
  // replaces the engine between requests (see RevisionFollower).
  auto swappable = std::make_shared<wbroker::app::SwappableEngine>(shared_engine);
  RevisionFollower follower(options, swappable, std::move(shared_engine));

  wbroker::http::HttpServerOptions http;
  http.listen = listen;
  http.reuse_port = reuse_port;
  http.threads = io_threads;
  http.compute_threads = threads;
  http.max_body_bytes = max_body_bytes;
  http.model_aliases = aliases;
  http.drain_timeout = std::chrono::milliseconds(static_cast<int64_t>(drain_seconds * 1000));
  auto server = wbroker::http::HttpServer::Create(http, swappable);
  if (!server.ok()) return Fail("--listen " + listen + ": " + server.status().message());

  server_ptr.store(server->get());
  if (stop_requested.load()) (*server)->Stop();

  const std::string serving = "serving " + info.id + " on " +
                              (*server)->local_endpoint().address().to_string() + ":" +
                              std::to_string((*server)->port());
  spdlog::info("{}", serving);
  sd_notifyf(0, "READY=1\nSTATUS=%s", serving.c_str());
  if (options.client) follower.Start();
  (*server)->Run();
  follower.Stop();

  server_ptr.store(nullptr);
  server->reset();
  spdlog::info("stopped");
  spdlog::shutdown();
  return 0;
} catch (const std::exception& e) {
  return Fail(std::string("fatal: ") + e.what());
}
