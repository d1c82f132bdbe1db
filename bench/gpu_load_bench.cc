// wbroker bench: loading a model into one GPU, measured against what the
// machine allows, in one run (scripts/gpu-check runs it on a lent GPU):
//
//   (a) the ceiling: cuMemcpyHtoDAsync from pinned host memory, whole
//       buffers and 16 MiB chunks (the loader's chunk size) on two streams;
//   (b) the page-cache read rate of the model's files (pread, reused buffers);
//   (c) LoadModel() into cuda-vmm and cuda-ipc arenas for each thread count,
//       median of N runs, plus a --dtype bf16 cast load of an fp32 model;
//   (d) attach latency through a real wbrokerd --device cuda:N: Attach and
//       Release round trips of a small (300-tensor) model, for vmm and ipc;
//   (e) N worker processes attaching the big model, with cuMemGetInfo before
//       and after: the GPU holds one copy, each worker adds only its context.
//
//   wbroker-bench-gpu --cache DIR --model BIG [--cast-model F32]
//       [--attach-model M300] [--wbrokerd PATH] [--workers N] [--json FILE]
//
// Every section records its own failure in the JSON ("errors") and the run
// goes on; the JSON file is rewritten after each section, so a run killed by
// a timeout still leaves what it measured. Exit status: 0 when every section
// that ran succeeded, 1 otherwise, 2 for bad arguments or no usable GPU.
//
// Internal mode used by (e): wbroker-bench-gpu --worker-attach SOCKET MODEL
// attaches MODEL, prints "ready BACKEND BYTES" and holds the lease until its
// stdin closes.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "backend.h"
#include "bench_util.h"
#include "model_loader.h"
#include "wbroker/client/client.h"
#include "wbroker/common/fd_socket.h"
#include "wbroker/common/hf_cache.h"
#include "wbroker/common/model_files.h"
#include "wbroker/common/size_units.h"
#include "wbroker/common/unique_fd.h"
#include "wbroker/common/version.h"
#include "wbroker/cuda/driver.h"
#include "wbroker/cuda/resources.h"

namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using wbroker::ErrorCode;
using wbroker::FormatBytes;
using wbroker::Result;
using wbroker::Status;
using wbroker::bench::Clock;
using wbroker::bench::Median;
using wbroker::bench::Percentile;
using wbroker::bench::Seconds;

constexpr uint64_t kChunk = 16ull << 20;  ///< the loader's default chunk (FillOptions)

double Gbps(uint64_t bytes, double seconds) {
  return seconds > 0 ? static_cast<double>(bytes) / seconds / 1e9 : 0;
}

std::string Iso8601Now() {
  std::time_t t = std::time(nullptr);
  char buf[64];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

/// Everything measured, saved after each section.
struct Report {
  json out = json::object();
  std::string path;         ///< --json; "" = do not write
  Clock::time_point start;  ///< for the time budget
  double budget_s = 0;      ///< 0 = unlimited
  int failures = 0;         ///< sections that failed

  void Save() const {
    if (path.empty()) return;
    std::string tmp = path + ".tmp";
    std::ofstream(tmp) << out.dump(2) << "\n";
    std::error_code ec;
    fs::rename(tmp, path, ec);
  }
  void Fail(const std::string& section, const std::string& message) {
    ++failures;
    out["errors"].push_back({{"section", section}, {"message", message}});
    fmt::print("!! {}: {}\n", section, message);
    std::fflush(stdout);
    Save();
  }
  /// True (and recorded) when the time budget is spent: the section is skipped.
  bool OutOfTime(const std::string& section) {
    if (budget_s <= 0 || Seconds(start, Clock::now()) < budget_s) return false;
    out["skipped"].push_back({{"section", section}, {"reason", "time budget spent"}});
    fmt::print("-- {}: skipped, time budget of {:.0f} s spent\n", section, budget_s);
    Save();
    return true;
  }
};

// --- (a) pinned host-to-device ceiling ------------------------------------------------

/// GB/s of cuMemcpyHtoDAsync from one pinned buffer: `copies` whole-buffer
/// copies on one stream, and the same bytes as kChunk pieces alternating over
/// two streams. Median of `repeats`. Timed on the host around a stream sync.
Result<json> MeasurePinned(const std::shared_ptr<wbroker::cuda::Driver>& driver,
                           const wbroker::cuda::PrimaryContext& ctx, uint64_t size, int copies,
                           int repeats) {
  namespace cu = wbroker::cuda;
  const cu::Driver& d = *driver;
  WB_ASSIGN_OR_RETURN(auto scope, ctx.Enter());
  WB_ASSIGN_OR_RETURN(auto host, cu::PinnedBuffer::Allocate(driver, ctx.get(), size));
  std::memset(host.data(), 0x5a, size);
  WB_ASSIGN_OR_RETURN(auto dev, cu::DeviceBuffer::Allocate(driver, ctx.get(), size));
  WB_ASSIGN_OR_RETURN(auto s0, cu::Stream::Create(driver, ctx.get()));
  WB_ASSIGN_OR_RETURN(auto s1, cu::Stream::Create(driver, ctx.get()));
  // Warm-up: first-touch costs of the mappings are not the steady state.
  WB_CU_RETURN_IF_ERROR(d, cuMemcpyHtoDAsync, dev.ptr(), host.data(), size, s0.get());
  WB_RETURN_IF_ERROR(s0.Synchronize());

  std::vector<double> whole, chunked;
  for (int r = 0; r < repeats; ++r) {
    auto t0 = Clock::now();
    for (int i = 0; i < copies; ++i)
      WB_CU_RETURN_IF_ERROR(d, cuMemcpyHtoDAsync, dev.ptr(), host.data(), size, s0.get());
    WB_RETURN_IF_ERROR(s0.Synchronize());
    whole.push_back(Seconds(t0, Clock::now()));

    t0 = Clock::now();
    unsigned which = 0;
    for (int i = 0; i < copies; ++i) {
      for (uint64_t off = 0; off < size; off += kChunk) {
        const uint64_t n = std::min(kChunk, size - off);
        CUstream s = (which ^= 1) ? s1.get() : s0.get();
        WB_CU_RETURN_IF_ERROR(d, cuMemcpyHtoDAsync, dev.ptr() + off, host.data() + off, n, s);
      }
    }
    WB_RETURN_IF_ERROR(s0.Synchronize());
    WB_RETURN_IF_ERROR(s1.Synchronize());
    chunked.push_back(Seconds(t0, Clock::now()));
  }
  const uint64_t bytes = size * static_cast<uint64_t>(copies);
  return json{{"buffer_bytes", size},
              {"copies_per_run", copies},
              {"runs", repeats},
              {"whole_s_median", Median(whole)},
              {"whole_gbps", Gbps(bytes, Median(whole))},
              {"chunk_bytes", kChunk},
              {"chunked_2_streams_s_median", Median(chunked)},
              {"chunked_2_streams_gbps", Gbps(bytes, Median(chunked))}};
}

// --- (b) page-cache reads -------------------------------------------------------------

/// Seconds to pread every byte of `files` with `threads` threads into
/// per-thread reused buffers (from the page cache once warm).
Result<double> PageCacheRead(const std::vector<fs::path>& files, unsigned threads,
                             uint64_t* bytes_out) {
  struct Range {
    int fd;
    uint64_t off, len;
  };
  std::vector<wbroker::UniqueFd> fds;
  std::vector<Range> ranges;
  uint64_t total = 0;
  for (const auto& f : files) {
    wbroker::UniqueFd fd(::open(f.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) return wbroker::ErrnoStatus("open " + f.string());
    const uint64_t size = fs::file_size(f);
    for (uint64_t o = 0; o < size; o += kChunk)
      ranges.push_back({fd.get(), o, std::min(kChunk, size - o)});
    total += size;
    fds.push_back(std::move(fd));
  }
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  auto work = [&] {
    std::vector<char> buf(kChunk);
    for (size_t i; !failed && (i = next.fetch_add(1)) < ranges.size();) {
      uint64_t done = 0;
      while (done < ranges[i].len) {
        ssize_t n = ::pread(ranges[i].fd, buf.data() + done, ranges[i].len - done,
                            static_cast<off_t>(ranges[i].off + done));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
          failed = true;
          return;
        }
        done += static_cast<uint64_t>(n);
      }
    }
  };
  auto t0 = Clock::now();
  std::vector<std::thread> pool;
  for (unsigned t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (failed) return Status(ErrorCode::kCorruptData, "pread failed or a file ended early");
  *bytes_out = total;
  return Seconds(t0, Clock::now());
}

// --- processes: wbrokerd and attaching workers ----------------------------------------

/// A fork+exec'ed child; stdin/stdout on pipes when asked.
struct Child {
  pid_t pid = -1;
  wbroker::UniqueFd in;   ///< write end of its stdin
  wbroker::UniqueFd out;  ///< read end of its stdout
};

Child Spawn(const std::vector<std::string>& args, const std::string& stderr_path, bool pipes) {
  int in[2] = {-1, -1}, out[2] = {-1, -1};
  if (pipes && (::pipe2(in, O_CLOEXEC) != 0 || ::pipe2(out, O_CLOEXEC) != 0)) return {};
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::fflush(nullptr);
  Child c;
  c.pid = ::fork();
  if (c.pid == 0) {
    int err = ::open(stderr_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    ::dup2(err >= 0 ? err : null, 2);
    ::dup2(pipes ? in[0] : null, 0);
    ::dup2(pipes ? out[1] : (err >= 0 ? err : null), 1);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  if (pipes) {
    ::close(in[0]);
    ::close(out[1]);
    c.in.reset(in[1]);
    c.out.reset(out[0]);
  }
  return c;
}

/// Exit status (or 128+signal); SIGKILLs it after `timeout_ms`.
int Reap(pid_t pid, int timeout_ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    int st = 0;
    if (::waitpid(pid, &st, WNOHANG) == pid)
      return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    if (Clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &st, 0);
      return 128 + SIGKILL;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

/// One line of a child's stdout, "" on EOF or timeout.
std::string ReadLine(int fd, int timeout_ms) {
  std::string line;
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  while (Clock::now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 50) <= 0) continue;
    char c;
    if (::read(fd, &c, 1) != 1) break;
    if (c == '\n') return line;
    line += c;
  }
  return line;
}

std::string Tail(const std::string& path, size_t max = 1500) {
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return text.size() > max ? "..." + text.substr(text.size() - max) : text;
}

/// wbrokerd --device cuda:N --cuda-sharing S serving the hub cache; stopped
/// (SIGTERM, then SIGKILL) on destruction.
class Broker {
 public:
  static Result<std::unique_ptr<Broker>> Start(const std::string& exe, const std::string& cache,
                                               int ordinal, const std::string& sharing,
                                               const std::string& preload,
                                               const std::string& scratch) {
    auto b = std::unique_ptr<Broker>(new Broker);
    b->socket_ = fmt::format("{}/wbrokerd-{}-{}.sock", scratch, sharing, ::getpid());
    b->log_ = b->socket_ + ".log";
    ::unlink(b->socket_.c_str());
    std::vector<std::string> args = {exe,
                                     "--socket",
                                     b->socket_,
                                     "--cache-dir",
                                     cache,
                                     "--device",
                                     fmt::format("cuda:{}", ordinal),
                                     "--cuda-sharing",
                                     sharing,
                                     "--log-level",
                                     "info"};
    if (!preload.empty()) {
      args.push_back("--preload");
      args.push_back(preload);
    }
    b->child_ = Spawn(args, b->log_, /*pipes=*/false);
    if (b->child_.pid <= 0) return Status(ErrorCode::kInternal, "fork failed");
    const auto deadline = Clock::now() + std::chrono::seconds(60);
    while (Clock::now() < deadline) {
      if (wbroker::ConnectUnixSocket(b->socket_).ok()) return b;
      int st = 0;
      if (::waitpid(b->child_.pid, &st, WNOHANG) == b->child_.pid) {
        b->child_.pid = -1;
        return Status(ErrorCode::kUnavailable,
                      fmt::format("wbrokerd exited during start-up: {}", Tail(b->log_)));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return Status(ErrorCode::kUnavailable,
                  fmt::format("wbrokerd did not open its socket within 60 s: {}", Tail(b->log_)));
  }
  ~Broker() {
    if (child_.pid > 0) {
      ::kill(child_.pid, SIGTERM);
      Reap(child_.pid, 10000);
    }
    ::unlink(socket_.c_str());
  }
  const std::string& socket() const { return socket_; }
  const std::string& log() const { return log_; }

 private:
  Broker() = default;
  Child child_;         ///< the daemon
  std::string socket_;  ///< its socket
  std::string log_;     ///< its stderr
};

Result<std::unique_ptr<wbroker::client::Client>> Connect(const std::string& socket) {
  wbroker::client::ClientOptions o;
  o.socket_path = socket;
  o.client_name = "wbroker-bench-gpu";
  return wbroker::client::Client::Connect(o);
}

/// The --worker-attach mode: attach, report, hold until stdin closes.
int WorkerAttach(const std::string& socket, const std::string& model) {
  auto client = Connect(socket);
  if (!client.ok()) {
    std::fprintf(stderr, "worker: connect: %s\n", client.status().ToString().c_str());
    return 2;
  }
  auto lease = (*client)->Attach(model);
  if (!lease.ok()) {
    std::fprintf(stderr, "worker: attach: %s\n", lease.status().ToString().c_str());
    return 2;
  }
  std::printf("ready %s %llu\n", (*lease)->backend().c_str(),
              static_cast<unsigned long long>((*lease)->arena_size()));
  std::fflush(stdout);
  char c;
  while (::read(0, &c, 1) > 0) {
  }
  return 0;
}

// --- the sections ---------------------------------------------------------------------

/// Device-wide free bytes (every process's allocations count).
Result<uint64_t> FreeBytes(const wbroker::cuda::Driver& d,
                           const wbroker::cuda::PrimaryContext& ctx) {
  WB_ASSIGN_OR_RETURN(auto scope, ctx.Enter());
  size_t free_b = 0, total = 0;
  WB_CU_RETURN_IF_ERROR(d, cuMemGetInfo, &free_b, &total);
  return static_cast<uint64_t>(free_b);
}

wbroker::broker::CudaSharing SharingOf(const std::string& name) {
  return name == "ipc" ? wbroker::broker::CudaSharing::kIpc : wbroker::broker::CudaSharing::kVmm;
}

struct LoadRow {
  std::string what;     ///< "load" or "cast"
  std::string backend;  ///< cuda-vmm / cuda-ipc
  unsigned threads = 0;
  double seconds = 0;  ///< median
  double gbps = 0;     ///< arena bytes / s
};

/// Loads `model` `repeats` times per thread count into `backend`; returns rows.
Status LoadSeries(Report& r, const std::string& section, const wbroker::ResolvedModel& model,
                  wbroker::broker::Backend& backend, const std::vector<unsigned>& threads,
                  int repeats, std::optional<wbroker::DType> cast_to, std::vector<LoadRow>* rows) {
  // One untimed load first: pinned staging buffers, the cast module and the
  // device's memory pools are then in their steady state.
  {
    wbroker::broker::LoaderOptions o;
    o.threads = threads.empty() ? 4 : threads.back();
    o.cast_to = cast_to;
    auto warm = wbroker::broker::LoadModel(model, backend, o);
    if (!warm.ok()) return warm.status().WithContext("warm-up load");
  }
  for (unsigned t : threads) {
    if (r.OutOfTime(fmt::format("{} {} threads={}", section, backend.name(), t))) break;
    std::vector<double> secs;
    uint64_t arena_bytes = 0;
    for (int i = 0; i < repeats; ++i) {
      wbroker::broker::LoaderOptions o;
      o.threads = t;
      o.cast_to = cast_to;
      auto loaded = wbroker::broker::LoadModel(model, backend, o);
      if (!loaded.ok())
        return loaded.status().WithContext(fmt::format("{} threads={}", backend.name(), t));
      secs.push_back(loaded->seconds);
      arena_bytes = loaded->tensor_bytes;
    }
    LoadRow row{section, backend.name(), t, Median(secs), Gbps(arena_bytes, Median(secs))};
    rows->push_back(row);
    json j = {{"backend", row.backend},
              {"threads", t},
              {"runs", secs},
              {"seconds_median", row.seconds},
              {"arena_bytes", arena_bytes},
              {"gbps", row.gbps}};
    if (cast_to) j["cast_to"] = wbroker::DTypeName(*cast_to);
    r.out[section].push_back(j);
    fmt::print("  {:<6} {:<9} threads {:>3}: {:>8.3f} s  {:>7.2f} GB/s\n", section, row.backend, t,
               row.seconds, row.gbps);
    std::fflush(stdout);
    r.Save();
  }
  return Status::Ok();
}

/// (d): attach/release round trips through a real wbrokerd.
Result<json> AttachLatency(const std::string& wbrokerd, const std::string& cache, int ordinal,
                           const std::string& sharing, const std::string& model, int round_trips,
                           const std::string& scratch) {
  WB_ASSIGN_OR_RETURN(auto broker,
                      Broker::Start(wbrokerd, cache, ordinal, sharing, model, scratch));
  WB_ASSIGN_OR_RETURN(auto client, Connect(broker->socket()));
  std::vector<double> att, rel;
  size_t tensors = 0;
  std::string backend;
  constexpr int kWarmup = 20;  // the first attaches include the preload wait
  for (int i = 0; i < round_trips + kWarmup; ++i) {
    auto t0 = Clock::now();
    auto lease = client->Attach(model);
    auto t1 = Clock::now();
    if (!lease.ok())
      return lease.status().WithContext(
          fmt::format("attach #{} (broker log: {})", i, Tail(broker->log(), 600)));
    tensors = (*lease)->tensors().size();
    backend = (*lease)->backend();
    if (!(*lease)->on_device())
      return Status(ErrorCode::kInternal,
                    fmt::format("the lease is not on a GPU (backend {})", backend));
    Status st = (*lease)->Release();
    lease->reset();  // unmaps the import
    auto t2 = Clock::now();
    if (!st.ok()) return st.WithContext("release");
    if (i >= kWarmup) {
      att.push_back(Seconds(t0, t1) * 1e3);
      rel.push_back(Seconds(t1, t2) * 1e3);
    }
  }
  return json{{"sharing", sharing},
              {"backend", backend},
              {"model", model},
              {"tensors", tensors},
              {"round_trips", round_trips},
              {"attach_ms_median", Median(att)},
              {"attach_ms_p99", Percentile(att, 0.99)},
              {"release_ms_median", Median(rel)},
              {"release_ms_p99", Percentile(rel, 0.99)}};
}

/// (e): N worker processes attach `model` from one wbrokerd; device memory
/// before the broker, after its load, and with every worker attached.
Result<json> ShareOneCopy(const std::shared_ptr<wbroker::cuda::Driver>& driver,
                          const wbroker::cuda::PrimaryContext& ctx, const std::string& wbrokerd,
                          const std::string& self, const std::string& cache, int ordinal,
                          const std::string& sharing, const std::string& model, int workers,
                          const std::string& scratch) {
  WB_ASSIGN_OR_RETURN(uint64_t free0, FreeBytes(*driver, ctx));
  WB_ASSIGN_OR_RETURN(auto broker,
                      Broker::Start(wbrokerd, cache, ordinal, sharing, model, scratch));
  uint64_t arena = 0;
  {
    // Waits for the preload; this process's own mapping costs no memory.
    WB_ASSIGN_OR_RETURN(auto client, Connect(broker->socket()));
    WB_ASSIGN_OR_RETURN(auto lease, client->Attach(model));
    arena = lease->arena_size();
  }
  WB_ASSIGN_OR_RETURN(uint64_t free1, FreeBytes(*driver, ctx));
  const std::string log = fmt::format("{}/workers-{}.log", scratch, sharing);
  std::vector<Child> kids;
  for (int i = 0; i < workers; ++i)
    kids.push_back(Spawn({self, "--worker-attach", broker->socket(), model}, log, /*pipes=*/true));
  int ready = 0;
  std::string problem;
  for (auto& k : kids) {
    std::string line = ReadLine(k.out.get(), 120000);
    if (line.rfind("ready ", 0) == 0)
      ++ready;
    else if (problem.empty())
      problem = line.empty() ? "no answer" : line;
  }
  auto free2 = FreeBytes(*driver, ctx);
  for (auto& k : kids) k.in.reset();
  for (auto& k : kids) Reap(k.pid, 30000);
  if (ready != workers)
    return Status(ErrorCode::kInternal, fmt::format("{} of {} workers attached ({}): {}", ready,
                                                    workers, problem, Tail(log, 800)));
  if (!free2.ok()) return free2.status();
  const auto used = [](uint64_t a, uint64_t b) -> uint64_t { return a > b ? a - b : 0; };
  const uint64_t broker_used = used(free0, free1), workers_used = used(free1, *free2);
  return json{{"sharing", sharing},
              {"model", model},
              {"workers", workers},
              {"arena_bytes", arena},
              {"free_before_broker", free0},
              {"free_after_load", free1},
              {"free_with_workers", *free2},
              {"broker_used_bytes", broker_used},
              {"workers_used_bytes", workers_used},
              {"per_worker_bytes", workers > 0 ? workers_used / static_cast<uint64_t>(workers) : 0},
              {"private_copies_would_use_bytes", arena * static_cast<uint64_t>(workers)},
              // (broker + workers) / arena: ~1 plus the contexts' share when one copy is shared.
              {"gpu_copies_of_model",
               arena > 0 ? static_cast<double>(broker_used + workers_used) / arena : 0.0}};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "--worker-attach") return WorkerAttach(argv[2], argv[3]);

  CLI::App app{"wbroker GPU load and attach benchmark (see the header of bench/gpu_load_bench.cc)"};
  std::string cache, model, cast_model, attach_model, share_model, wbrokerd, json_out, pinned_text,
      scratch = "/tmp";
  std::vector<unsigned> threads = {1, 4, 8, 16};
  std::vector<std::string> sharings = {"vmm", "ipc"};
  int ordinal = 0, repeats = 3, attaches = 300, workers = 0, pinned_copies = 16;
  double budget_s = 0;
  app.add_option("--cache", cache, "HF hub cache holding the models")->required();
  app.add_option("--model", model, "big model for (b) and (c), e.g. 8 GB fp16")->required();
  app.add_option("--cast-model", cast_model, "fp32 model loaded with a bf16 cast (c)");
  app.add_option("--attach-model", attach_model, "small model for attach latency (d)");
  app.add_option("--share-model", share_model, "model the --workers attach (default --model)");
  app.add_option("--wbrokerd", wbrokerd, "wbrokerd binary for (d) and (e)");
  app.add_option("--device", ordinal, "CUDA ordinal (default 0)");
  app.add_option("--threads", threads, "loader thread counts (default 1 4 8 16)");
  app.add_option("--sharing", sharings, "backends: vmm, ipc (default both)")
      ->check(CLI::IsMember({"vmm", "ipc"}));
  app.add_option("--repeats", repeats, "loads per configuration, median reported (default 3)");
  app.add_option("--attaches", attaches, "attach/release round trips per backend (default 300)");
  app.add_option("--workers", workers, "worker processes for the one-copy check (0 = skip)");
  app.add_option("--pinned-size", pinned_text, "pinned buffer for the ceiling (default 256MiB)");
  app.add_option("--pinned-copies", pinned_copies, "copies per ceiling run (default 16)");
  app.add_option("--scratch", scratch, "directory for sockets and logs (default /tmp)");
  app.add_option("--budget", budget_s, "seconds; later sections are skipped after this (0 = none)");
  app.add_option("--json", json_out, "write results here (rewritten after each section)");
  CLI11_PARSE(app, argc, argv);
  spdlog::set_level(spdlog::level::warn);
  repeats = std::max(1, repeats);

  uint64_t pinned_size = 256ull << 20;
  if (!pinned_text.empty()) {
    auto v = wbroker::ParseByteSize(pinned_text);
    if (!v.ok() || *v == 0) {
      std::fprintf(stderr, "wbroker-bench-gpu: --pinned-size: bad size \"%s\"\n",
                   pinned_text.c_str());
      return 2;
    }
    pinned_size = *v;
  }
  if (!wbrokerd.empty() && ::access(wbrokerd.c_str(), X_OK) != 0) {
    std::fprintf(stderr, "wbroker-bench-gpu: --wbrokerd %s is not executable\n", wbrokerd.c_str());
    return 2;
  }

  Report r;
  r.path = json_out;
  r.start = Clock::now();
  r.budget_s = budget_s;
  r.out["tool"] = "wbroker-bench-gpu";
  r.out["version"] = fmt::format("{} ({})", WBROKER_VERSION, WBROKER_GIT_DESCRIBE);
  r.out["date"] = Iso8601Now();
  r.out["complete"] = false;
  r.out["errors"] = json::array();
  r.out["host"] = {{"threads_available", std::thread::hardware_concurrency()}};
  r.out["repeats"] = repeats;
  r.out["threads"] = threads;

  // --- the GPU --------------------------------------------------------------------------
  auto driver = wbroker::cuda::Driver::Load();
  if (!driver.ok()) {
    r.Fail("driver", driver.status().message());
    return 2;
  }
  auto info = (*driver)->Describe(ordinal);
  if (!info.ok()) {
    r.Fail("driver", info.status().message());
    return 2;
  }
  auto ctx = wbroker::cuda::PrimaryContext::Retain(*driver, ordinal);
  if (!ctx.ok()) {
    r.Fail("driver", ctx.status().message());
    return 2;
  }
  uint64_t total_bytes = 0;
  {
    auto scope = ctx->Enter();
    size_t f = 0, t = 0;
    if (scope.ok() && WB_CU_CALL(**driver, cuMemGetInfo, &f, &t).ok()) total_bytes = t;
  }
  const int dv = (*driver)->version();
  r.out["gpu"] = {{"ordinal", ordinal},
                  {"name", info->name},
                  {"uuid", info->uuid},
                  {"compute_capability", fmt::format("{}.{}", info->cc_major, info->cc_minor)},
                  {"vmm_fds", info->vmm && info->posix_fd},
                  {"total_bytes", total_bytes},
                  {"driver_api_version", fmt::format("{}.{}", dv / 1000, (dv % 1000) / 10)},
                  {"driver_library", (*driver)->library()}};
  fmt::print("GPU cuda:{} {} ({}), compute {}.{}, {:.1f} GiB, driver API {}.{} from {}\n", ordinal,
             info->name, info->uuid, info->cc_major, info->cc_minor,
             total_bytes / double(1ull << 30), dv / 1000, (dv % 1000) / 10, (*driver)->library());
  r.Save();

  // --- the model and its files ----------------------------------------------------------
  auto resolved = wbroker::ResolveModel(cache, model, "");
  if (!resolved.ok()) {
    r.Fail("model", resolved.status().message());
    return 2;
  }
  auto weights = wbroker::OpenModelWeights(*resolved);
  if (!weights.ok()) {
    r.Fail("model", weights.status().message());
    return 2;
  }
  std::vector<fs::path> files;
  for (const auto& f : weights->files) files.push_back(f.path);
  uint64_t file_bytes = 0;
  {
    auto warm = PageCacheRead(files, 4, &file_bytes);  // brings the files into the page cache
    if (!warm.ok()) {
      r.Fail("model", warm.status().message());
      return 2;
    }
  }
  r.out["model"] = {{"name", model},
                    {"tensors", weights->tensor_count},
                    {"tensor_bytes", weights->tensor_bytes},
                    {"file_bytes", file_bytes},
                    {"files", files.size()}};
  fmt::print("model {}: {} tensors, {:.2f} GiB in {} file(s), page cache warm\n", model,
             weights->tensor_count, weights->tensor_bytes / double(1ull << 30), files.size());
  r.Save();

  // --- (a) the ceiling ------------------------------------------------------------------
  double ceiling = 0;
  if (!r.OutOfTime("pinned_htod")) {
    auto p = MeasurePinned(*driver, *ctx, pinned_size, std::max(1, pinned_copies), repeats);
    if (p.ok()) {
      r.out["pinned_htod"] = *p;
      ceiling =
          std::max((*p)["whole_gbps"].get<double>(), (*p)["chunked_2_streams_gbps"].get<double>());
      fmt::print(
          "(a) pinned cuMemcpyHtoDAsync: {} copies {:.2f} GB/s, 16 MiB chunks on 2 streams "
          "{:.2f} GB/s\n",
          FormatBytes(pinned_size), (*p)["whole_gbps"].get<double>(),
          (*p)["chunked_2_streams_gbps"].get<double>());
    } else {
      r.Fail("pinned_htod", p.status().message());
    }
    r.out["ceiling_gbps"] = ceiling;
    r.Save();
  }

  // --- (b) page-cache reads -------------------------------------------------------------
  std::map<unsigned, double> read_gbps;
  r.out["page_cache_read"] = json::array();
  for (unsigned t : threads) {
    if (r.OutOfTime(fmt::format("page_cache_read threads={}", t))) break;
    std::vector<double> secs;
    Status failed;
    for (int i = 0; i < repeats && failed.ok(); ++i) {
      uint64_t b = 0;
      auto s = PageCacheRead(files, t, &b);
      if (s.ok())
        secs.push_back(*s);
      else
        failed = s.status();
    }
    if (!failed.ok()) {
      r.Fail("page_cache_read", failed.message());
      break;
    }
    read_gbps[t] = Gbps(file_bytes, Median(secs));
    r.out["page_cache_read"].push_back(
        {{"threads", t}, {"seconds_median", Median(secs)}, {"gbps", read_gbps[t]}});
    fmt::print("(b) page-cache read threads {:>3}: {:>8.3f} s  {:>7.2f} GB/s\n", t, Median(secs),
               read_gbps[t]);
  }
  r.Save();

  // --- (c) broker loads, and the bf16 cast ----------------------------------------------
  std::vector<LoadRow> rows;
  std::optional<wbroker::ResolvedModel> cast_resolved;
  if (!cast_model.empty()) {
    auto c = wbroker::ResolveModel(cache, cast_model, "");
    if (c.ok())
      cast_resolved = *c;
    else
      r.Fail("cast", c.status().message());
  }
  r.out["load"] = json::array();
  r.out["backends"] = json::object();
  for (const auto& sharing : sharings) {
    if (r.OutOfTime("load " + sharing)) break;
    std::string note;
    auto backend =
        wbroker::broker::CreateBackend(fmt::format("cuda:{}", ordinal), SharingOf(sharing), &note);
    if (!backend.ok()) {
      r.Fail("load " + sharing, backend.status().message());
      continue;
    }
    r.out["backends"][sharing] = note;
    fmt::print("(c) {}\n", note);
    Status s = LoadSeries(r, "load", *resolved, **backend, threads, repeats, std::nullopt, &rows);
    if (!s.ok()) r.Fail("load " + sharing, s.message());
    if (cast_resolved && !r.OutOfTime("cast " + sharing)) {
      Status c = LoadSeries(r, "cast", *cast_resolved, **backend, threads, repeats,
                            wbroker::DType::kBF16, &rows);
      if (!c.ok()) r.Fail("cast " + sharing, c.message());
    }
  }
  r.Save();

  // --- (d) attach latency through wbrokerd ----------------------------------------------
  r.out["attach"] = json::array();
  if (!attach_model.empty() && !wbrokerd.empty()) {
    for (const auto& sharing : sharings) {
      if (r.OutOfTime("attach " + sharing)) break;
      auto a = AttachLatency(wbrokerd, cache, ordinal, sharing, attach_model, attaches, scratch);
      if (!a.ok()) {
        r.Fail("attach " + sharing, a.status().message());
        continue;
      }
      r.out["attach"].push_back(*a);
      fmt::print(
          "(d) attach {} ({} tensors, {}): median {:.3f} ms, p99 {:.3f} ms; release "
          "median {:.3f} ms\n",
          attach_model, (*a)["tensors"].get<size_t>(), (*a)["backend"].get<std::string>(),
          (*a)["attach_ms_median"].get<double>(), (*a)["attach_ms_p99"].get<double>(),
          (*a)["release_ms_median"].get<double>());
      r.Save();
    }
  }

  // --- (e) N workers, one copy ----------------------------------------------------------
  r.out["share"] = json::array();
  if (workers > 0 && !wbrokerd.empty()) {
    std::string self(4096, '\0');
    ssize_t n = ::readlink("/proc/self/exe", self.data(), self.size() - 1);
    self.resize(n > 0 ? static_cast<size_t>(n) : 0);
    const std::string m = share_model.empty() ? model : share_model;
    for (const auto& sharing : sharings) {
      if (r.OutOfTime("share " + sharing)) break;
      auto s =
          ShareOneCopy(*driver, *ctx, wbrokerd, self, cache, ordinal, sharing, m, workers, scratch);
      if (!s.ok()) {
        r.Fail("share " + sharing, s.status().message());
        continue;
      }
      r.out["share"].push_back(*s);
      fmt::print(
          "(e) {} workers attached {} via {}: broker used {}, workers added {} ({} each); "
          "{:.2f} copies of the {} arena on the GPU\n",
          workers, m, sharing, FormatBytes((*s)["broker_used_bytes"].get<uint64_t>()),
          FormatBytes((*s)["workers_used_bytes"].get<uint64_t>()),
          FormatBytes((*s)["per_worker_bytes"].get<uint64_t>()),
          (*s)["gpu_copies_of_model"].get<double>(),
          FormatBytes((*s)["arena_bytes"].get<uint64_t>()));
      r.Save();
    }
  }

  // --- the table ------------------------------------------------------------------------
  fmt::print("\n{:<28} {:>8} {:>10} {:>9} {:>10} {:>10}\n", "what", "threads", "seconds", "GB/s",
             "% ceiling", "% pc-read");
  if (r.out.contains("pinned_htod")) {
    const auto& p = r.out["pinned_htod"];
    fmt::print("{:<28} {:>8} {:>10.3f} {:>9.2f} {:>10} {:>10}\n", "pinned HtoD (whole)", "-",
               p["whole_s_median"].get<double>(), p["whole_gbps"].get<double>(), "100", "-");
    fmt::print("{:<28} {:>8} {:>10.3f} {:>9.2f} {:>10} {:>10}\n", "pinned HtoD (16 MiB, 2 str)",
               "-", p["chunked_2_streams_s_median"].get<double>(),
               p["chunked_2_streams_gbps"].get<double>(), "-", "-");
  }
  for (const auto& [t, g] : read_gbps)
    fmt::print("{:<28} {:>8} {:>10} {:>9.2f} {:>10} {:>10}\n", "page-cache read", t, "-", g,
               ceiling > 0 ? fmt::format("{:.0f}", 100 * g / ceiling) : "-", "100");
  double best_load = 0;
  for (const auto& row : rows) {
    if (row.what == "load") best_load = std::max(best_load, row.gbps);
    const double pc = read_gbps.count(row.threads) ? read_gbps[row.threads] : 0;
    fmt::print("{:<28} {:>8} {:>10.3f} {:>9.2f} {:>10} {:>10}\n",
               fmt::format("{} {}", row.what == "cast" ? "cast->bf16" : "load", row.backend),
               row.threads, row.seconds, row.gbps,
               ceiling > 0 ? fmt::format("{:.0f}", 100 * row.gbps / ceiling) : "-",
               pc > 0 && row.what == "load" ? fmt::format("{:.0f}", 100 * row.gbps / pc) : "-");
  }
  r.out["best_load_gbps"] = best_load;
  r.out["best_load_vs_ceiling"] = ceiling > 0 ? best_load / ceiling : 0;
  r.out["elapsed_s"] = Seconds(r.start, Clock::now());
  r.out["complete"] = true;
  r.Save();
  fmt::print(
      "\nbest load {:.2f} GB/s = {:.0f}% of the pinned ceiling {:.2f} GB/s; {} section(s) "
      "failed; {:.0f} s\n",
      best_load, ceiling > 0 ? 100 * best_load / ceiling : 0, ceiling, r.failures,
      r.out["elapsed_s"].get<double>());
  return r.failures == 0 ? 0 : 1;
}
