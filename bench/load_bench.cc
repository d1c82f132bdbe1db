// wbroker bench: broker load throughput against plain page-cache reads of the
// same files, and attach latency through a real wbrokerd.
//
//   wbroker-bench-load --cache DIR --model BIG [--attach-model M300 --wbrokerd PATH]
//
// Prints a table and, with --json FILE, writes every number for docs/benchmarks.md.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <sys/mman.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <thread>
#include <vector>

#include "backend.h"
#include "bench_util.h"
#include "model_loader.h"
#include "wbroker/client/client.h"
#include "wbroker/common/fd_socket.h"
#include "wbroker/common/model_files.h"
#include "wbroker/common/unique_fd.h"

namespace {

using nlohmann::json;
using wbroker::bench::Clock;
using wbroker::bench::Median;
using wbroker::bench::Percentile;
using wbroker::bench::Seconds;

[[noreturn]] void Die(const std::string& msg) {
  std::fprintf(stderr, "wbroker-bench-load: %s\n", msg.c_str());
  std::exit(1);
}

// Reads every byte of `files` with `threads` threads into per-thread reused
// buffers: the page-cache read rate that a loader cannot beat by much.
double PageCacheRead(const std::vector<std::filesystem::path>& files, unsigned threads,
                     uint64_t* bytes_out, bool fresh_memory = false) {
  struct Range {
    int fd;
    uint64_t off, len;
  };
  std::vector<wbroker::UniqueFd> fds;
  std::vector<Range> ranges;
  uint64_t total = 0;
  constexpr uint64_t kChunk = 16ull << 20;
  for (const auto& f : files) {
    wbroker::UniqueFd fd(::open(f.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) Die("open " + f.string());
    uint64_t size = std::filesystem::file_size(f);
    for (uint64_t o = 0; o < size; o += kChunk) ranges.push_back({fd.get(), o, std::min(kChunk, size - o)});
    total += size;
    fds.push_back(std::move(fd));
  }
  std::atomic<size_t> next{0};
  // fresh_memory: every chunk lands in newly mapped anonymous memory, as a
  // process that loads its own copy (safetensors.load_file) must do.
  auto work = [&] {
    std::vector<char> reused(kChunk);
    for (size_t i; (i = next.fetch_add(1)) < ranges.size();) {
      char* buf = reused.data();
      void* fresh = nullptr;
      if (fresh_memory) {
        fresh = ::mmap(nullptr, ranges[i].len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (fresh == MAP_FAILED) Die("mmap");
        buf = static_cast<char*>(fresh);
      }
      uint64_t done = 0;
      while (done < ranges[i].len) {
        ssize_t n = ::pread(ranges[i].fd, buf + done, ranges[i].len - done,
                            static_cast<off_t>(ranges[i].off + done));
        if (n <= 0) Die("pread failed");
        done += static_cast<uint64_t>(n);
      }
      if (fresh) ::munmap(fresh, ranges[i].len);
    }
  };
  auto t0 = Clock::now();
  std::vector<std::thread> pool;
  for (unsigned t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  *bytes_out = total;
  return Seconds(t0, Clock::now());
}

// Starts wbrokerd and returns its pid once the socket answers.
pid_t StartBroker(const std::string& exe, const std::string& socket, const std::string& cache,
                  const std::string& preload) {
  pid_t pid = ::fork();
  if (pid == 0) {
    int devnull = ::open("/dev/null", O_WRONLY);
    ::dup2(devnull, 2);
    ::execl(exe.c_str(), exe.c_str(), "--socket", socket.c_str(), "--cache-dir", cache.c_str(),
            "--preload", preload.c_str(), "--log-level", "warn", static_cast<char*>(nullptr));
    ::_exit(127);
  }
  for (int i = 0; i < 3000; ++i) {
    if (wbroker::ConnectUnixSocket(socket).ok()) return pid;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  Die("wbrokerd did not start");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"wbroker load and attach benchmark"};
  std::string cache, model, attach_model, wbrokerd, json_out;
  std::vector<unsigned> thread_counts = {1, 2, 4};
  int repeats = 3, attaches = 500;
  app.add_option("--cache", cache, "HF hub cache")->required();
  app.add_option("--model", model, "large model for load throughput (>= 1 GiB)")->required();
  app.add_option("--attach-model", attach_model, "model for attach latency (e.g. 300 tensors)");
  app.add_option("--wbrokerd", wbrokerd, "wbrokerd binary for the attach benchmark");
  app.add_option("--threads", thread_counts, "reader thread counts to try");
  app.add_option("--repeats", repeats, "runs per configuration (median reported)");
  app.add_option("--attaches", attaches, "attach/release round trips");
  app.add_option("--json", json_out, "write results here");
  CLI11_PARSE(app, argc, argv);
  spdlog::set_level(spdlog::level::warn);

  json out;
  out["threads_available"] = std::thread::hardware_concurrency();
  auto resolved = wbroker::ResolveModel(cache, model, "");
  if (!resolved.ok()) Die(resolved.status().message());
  auto weights = wbroker::OpenModelWeights(*resolved);
  if (!weights.ok()) Die(weights.status().message());
  std::vector<std::filesystem::path> files;
  for (const auto& f : weights->files) files.push_back(f.path);

  // Warm the page cache so both sides read from memory, not disk.
  uint64_t file_bytes = 0;
  PageCacheRead(files, 2, &file_bytes);
  out["model"] = model;
  out["file_bytes"] = file_bytes;
  out["tensor_bytes"] = weights->tensor_bytes;
  out["tensors"] = weights->tensor_count;
  fmt::print("model {}: {} tensors, {:.2f} GiB in {} file(s), page cache warm\n\n", model,
             weights->tensor_count, file_bytes / double(1 << 30), files.size());

  auto backend = wbroker::broker::CreateBackend("cpu");
  if (!backend.ok()) Die(backend.status().message());
  fmt::print("{:<34} {:>8} {:>10} {:>10}\n", "what", "threads", "seconds", "GB/s");
  double best_read = 0, best_load = 0, best_fresh = 0;
  json rows = json::array();
  for (unsigned t : thread_counts) {
    std::vector<double> rs, fs, ls;
    for (int r = 0; r < repeats; ++r) {
      uint64_t b = 0;
      rs.push_back(PageCacheRead(files, t, &b));
      fs.push_back(PageCacheRead(files, t, &b, /*fresh_memory=*/true));
      wbroker::broker::LoaderOptions opts;
      opts.threads = t;
      auto loaded = wbroker::broker::LoadModel(*resolved, **backend, opts);
      if (!loaded.ok()) Die(loaded.status().message());
      ls.push_back(loaded->seconds);
    }
    double rsec = Median(rs), fsec = Median(fs), lsec = Median(ls);
    double rgbs = file_bytes / rsec / 1e9, fgbs = file_bytes / fsec / 1e9,
           lgbs = weights->tensor_bytes / lsec / 1e9;
    best_read = std::max(best_read, rgbs);
    best_load = std::max(best_load, lgbs);
    fmt::print("{:<34} {:>8} {:>10.3f} {:>10.2f}\n", "page-cache read (pread, reused buf)", t, rsec, rgbs);
    fmt::print("{:<34} {:>8} {:>10.3f} {:>10.2f}\n", "read into fresh memory (own copy)", t, fsec, fgbs);
    fmt::print("{:<34} {:>8} {:>10.3f} {:>10.2f}\n", "broker load (memfd, sealed)", t, lsec, lgbs);
    best_fresh = std::max(best_fresh, fgbs);
    rows.push_back({{"threads", t}, {"page_cache_read_s", rsec}, {"page_cache_read_gbps", rgbs},
                    {"fresh_memory_read_s", fsec}, {"fresh_memory_read_gbps", fgbs},
                    {"load_s", lsec}, {"load_gbps", lgbs}});
  }
  out["load"] = rows;
  out["repeats"] = repeats;
  out["best_page_cache_read_gbps"] = best_read;
  out["best_load_gbps"] = best_load;
  out["best_fresh_memory_read_gbps"] = best_fresh;
  out["load_vs_read"] = best_load / best_read;
  out["load_vs_fresh_read"] = best_load / best_fresh;
  fmt::print("\nbest load {:.2f} GB/s = {:.0f}% of the best page-cache read rate {:.2f} GB/s, "
             "{:.0f}% of reading into fresh memory {:.2f} GB/s\n",
             best_load, 100 * best_load / best_read, best_read, 100 * best_load / best_fresh,
             best_fresh);

  if (!attach_model.empty() && !wbrokerd.empty()) {
    std::string sock = fmt::format("/tmp/wbroker-bench-{}.sock", ::getpid());
    pid_t broker = StartBroker(wbrokerd, sock, cache, attach_model);
    wbroker::client::ClientOptions co;
    co.socket_path = sock;
    auto client = wbroker::client::Client::Connect(co);
    if (!client.ok()) Die(client.status().message());
    std::vector<double> att, rel;
    size_t tensors = 0;
    for (int i = 0; i < attaches + 20; ++i) {
      auto t0 = Clock::now();
      auto lease = (*client)->Attach(attach_model);
      auto t1 = Clock::now();
      if (!lease.ok()) Die(lease.status().message());
      tensors = (*lease)->tensors().size();
      auto st = (*lease)->Release();
      auto t2 = Clock::now();
      if (!st.ok()) Die(st.message());
      if (i >= 20) {  // the first attaches include the preload wait
        att.push_back(Seconds(t0, t1) * 1e3);
        rel.push_back(Seconds(t1, t2) * 1e3);
      }
    }
    ::kill(broker, SIGTERM);
    ::waitpid(broker, nullptr, 0);
    out["attach"] = {{"model", attach_model}, {"tensors", tensors}, {"round_trips", attaches},
                     {"attach_ms_median", Median(att)}, {"attach_ms_p99", Percentile(att, 0.99)},
                     {"release_ms_median", Median(rel)}};
    fmt::print("\nattach {} ({} tensors): median {:.3f} ms, p99 {:.3f} ms; release median {:.3f} ms\n",
               attach_model, tensors, Median(att), Percentile(att, 0.99), Median(rel));
  }
  if (!json_out.empty()) std::ofstream(json_out) << out.dump(2) << "\n";
  return 0;
}
