// wbroker bench: broker load throughput against plain page-cache reads of the
// same files, and attach latency through a real wbrokerd.
//
//   wbroker-bench-load --cache DIR --model BIG [--attach-model M300 --wbrokerd PATH]
//                      [--shmem-enabled never,advise]
//
// Prints a table and, with --json FILE, writes every number for docs/benchmarks.md.
// --shmem-enabled measures the load under each listed kernel setting for shmem
// huge pages (it writes /sys/kernel/mm/transparent_hugepage/shmem_enabled, so
// it needs root, and puts the old value back at the end); without it the load
// runs under the machine's current setting.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <thread>
#include <vector>

#include "backend.h"
#include "bench_util.h"
#include "host_backend.h"
#include "model_loader.h"
#include "shmem_huge_pages.h"
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

constexpr const char* kShmemEnabled = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// The shmem_enabled value to put back before exiting; "" when unchanged.
std::string g_restore_shmem;

/// Writes `value` to shmem_enabled; false (with errno's text in *why) when
/// the kernel refuses it or the file cannot be written.
bool WriteShmemEnabled(const std::string& value, std::string* why) {
  {
    std::ofstream out(kShmemEnabled);
    out << value << "\n";
    out.flush();
    if (!out) {
      *why = std::strerror(errno);
      return false;
    }
  }
  const std::string now = wbroker::broker::ReadShmemHugePages().setting;
  if (now != value) *why = "it reads back as \"" + now + "\"";
  return now == value;
}

void RestoreShmem() {
  std::string why;
  if (!g_restore_shmem.empty() && !WriteShmemEnabled(g_restore_shmem, &why))
    std::fprintf(stderr, "wbroker-bench-load: could not restore %s to %s: %s\n", kShmemEnabled,
                 g_restore_shmem.c_str(), why.c_str());
  g_restore_shmem.clear();
}

[[noreturn]] void Die(const std::string& msg) {
  std::fprintf(stderr, "wbroker-bench-load: %s\n", msg.c_str());
  RestoreShmem();
  std::exit(1);
}

/// One kernel setting the load is measured under, with the host backend that
/// setting selects (its fill method follows sysfs at creation).
struct LoadConfig {
  std::string shmem_enabled;  ///< written before each load; "" = the machine's as it is
  std::unique_ptr<wbroker::broker::HostBackend> backend;
  std::string setting;          ///< shmem_enabled as read back under this configuration
  std::string fill;             ///< the backend's fill_method() under it
  bool huge = false;            ///< madvised shmem mappings get huge pages under it
  std::vector<double> seconds;  ///< one per repeat, for the current thread count
};

/// Puts `c`'s kernel setting in place (a no-op for the machine's own).
void Apply(const LoadConfig& c) {
  std::string why;
  if (!c.shmem_enabled.empty() && !WriteShmemEnabled(c.shmem_enabled, &why))
    Die(fmt::format("cannot set {} to {}: {} (--shmem-enabled needs root and a writable sysfs)",
                    kShmemEnabled, c.shmem_enabled, why));
}

// Reads every byte of `files` with `threads` threads, each into one reused
// buffer of kReadStep bytes, small enough to stay in the core's L2 cache:
// the fastest plain read of the page cache we found (a 16 MiB buffer spills
// to memory and reads 30-40% slower with two threads).
double PageCacheRead(const std::vector<std::filesystem::path>& files, unsigned threads,
                     uint64_t* bytes_out, bool fresh_memory = false) {
  struct Range {
    int fd;
    uint64_t off, len;
  };
  std::vector<wbroker::UniqueFd> fds;
  std::vector<Range> ranges;
  uint64_t total = 0;
  constexpr uint64_t kChunk = 16ull << 20;    // what a thread takes from the queue
  constexpr uint64_t kReadStep = 1ull << 20;  // bytes per pread into the reused buffer
  for (const auto& f : files) {
    wbroker::UniqueFd fd(::open(f.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) Die("open " + f.string());
    uint64_t size = std::filesystem::file_size(f);
    for (uint64_t o = 0; o < size; o += kChunk)
      ranges.push_back({fd.get(), o, std::min(kChunk, size - o)});
    total += size;
    fds.push_back(std::move(fd));
  }
  std::atomic<size_t> next{0};
  // fresh_memory: every chunk lands in newly mapped anonymous memory, as a
  // process that loads its own copy (safetensors.load_file) must do.
  auto work = [&] {
    std::vector<char> reused(kReadStep);
    for (size_t i; (i = next.fetch_add(1)) < ranges.size();) {
      char* buf = reused.data();
      uint64_t step = kReadStep;
      void* fresh = nullptr;
      if (fresh_memory) {
        fresh = ::mmap(nullptr, ranges[i].len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                       -1, 0);
        if (fresh == MAP_FAILED) Die("mmap");
        buf = static_cast<char*>(fresh);
        step = ranges[i].len;
      }
      for (uint64_t done = 0; done < ranges[i].len;) {
        const uint64_t want = std::min(step, ranges[i].len - done);
        char* dst = fresh ? buf + done : buf;
        uint64_t got = 0;
        while (got < want) {
          ssize_t n = ::pread(ranges[i].fd, dst + got, want - got,
                              static_cast<off_t>(ranges[i].off + done + got));
          if (n <= 0) Die("pread failed");
          got += static_cast<uint64_t>(n);
        }
        done += want;
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

/// `bytes` of anonymous memory, mapped and touched (huge pages where the
/// kernel gives them), so that timed passes over it take no faults.
class TouchedMemory {
 public:
  explicit TouchedMemory(uint64_t bytes) : size_(bytes) {
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) Die("mmap of anonymous memory for a rate measurement");
    ::madvise(p, bytes, MADV_HUGEPAGE);
    data_ = static_cast<char*>(p);
    std::memset(data_, 1, bytes);  // faults and clearing happen here
  }
  ~TouchedMemory() { ::munmap(data_, size_); }
  TouchedMemory(const TouchedMemory&) = delete;
  TouchedMemory& operator=(const TouchedMemory&) = delete;
  char* data() const { return data_; }

 private:
  char* data_ = nullptr;  ///< the mapping
  uint64_t size_;         ///< its length
};

/// Seconds for `threads` threads to run fn(begin, end) on page-aligned
/// slices of [0, bytes), one slice each.
template <typename Fn>
double TimeSlices(uint64_t bytes, unsigned threads, Fn fn) {
  const uint64_t slice = (bytes / threads + 4095) / 4096 * 4096;
  auto t0 = Clock::now();
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    const uint64_t begin = std::min(bytes, t * slice), end = std::min(bytes, begin + slice);
    pool.emplace_back([=] { fn(begin, end); });
  }
  for (auto& th : pool) th.join();
  return Seconds(t0, Clock::now());
}

// Seconds for `threads` threads to memset `bytes` of memory that is already
// mapped and touched: the rate at which this machine can write memory at
// all, which bounds any load, since a load writes every byte of the arena.
double MemoryWrite(uint64_t bytes, unsigned threads) {
  TouchedMemory mem(bytes);
  char* base = mem.data();
  return TimeSlices(bytes, threads,
                    [base](uint64_t b, uint64_t e) { std::memset(base + b, 2, e - b); });
}

// Seconds for `threads` threads to memcpy `bytes` between two buffers that are
// already mapped and touched: the fastest this machine copies memory to
// memory. A load copies every byte from the page cache into the arena, so
// this bounds it from above, however the copy is done.
double MemoryCopy(uint64_t bytes, unsigned threads) {
  TouchedMemory src(bytes), dst(bytes);
  char *from = src.data(), *to = dst.data();
  return TimeSlices(bytes, threads,
                    [from, to](uint64_t b, uint64_t e) { std::memcpy(to + b, from + b, e - b); });
}

// Touches, then frees, `bytes` of anonymous memory (in huge pages when `huge`)
// so that the load right after it gets memory the hypervisor already backs.
// On a VM with free page reporting (virtio-balloon), memory freed in blocks of
// 2 MiB and more goes back to the host within seconds, and the first touch of
// such memory costs a host fault: a "cold" load measures that, not the load.
void WarmGuestMemory(uint64_t bytes, bool huge) {
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) Die("mmap for warming guest memory");
  if (huge) ::madvise(p, bytes, MADV_HUGEPAGE);
  auto* c = static_cast<volatile char*>(p);
  for (uint64_t i = 0; i < bytes; i += 4096) c[i] = 1;
  ::munmap(p, bytes);
}

// True when the kernel runs under a hypervisor that takes freed memory back
// (virtio-balloon's free page reporting, feature bit 5).
bool FreePageReporting() {
  std::error_code ec;
  for (std::filesystem::directory_iterator it("/sys/bus/virtio/drivers/virtio_balloon", ec), end;
       !ec && it != end; it.increment(ec)) {
    std::ifstream in(it->path() / "features");
    std::string bits;
    if (in >> bits && bits.size() > 5 && bits[5] == '1') return true;
  }
  return false;
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
  int cold_repeats = 3;
  std::vector<unsigned> thread_counts = {1, 2, 4};
  std::vector<std::string> shmem_settings;
  int repeats = 3, attaches = 500;
  app.add_option("--cache", cache, "HF hub cache")->required();
  app.add_option("--model", model, "large model for load throughput (>= 1 GiB)")->required();
  app.add_option("--attach-model", attach_model, "model for attach latency (e.g. 300 tensors)");
  app.add_option("--wbrokerd", wbrokerd, "wbrokerd binary for the attach benchmark");
  app.add_option("--threads", thread_counts, "reader thread counts to try");
  app.add_option("--repeats", repeats, "runs per configuration (median reported)");
  app.add_option("--attaches", attaches, "attach/release round trips");
  app.add_option("--json", json_out, "write results here");
  app.add_option("--cold-repeats", cold_repeats,
                 "loads per setting into memory left idle for 4 s (0: none)");
  app.add_option("--shmem-enabled", shmem_settings,
                 "measure the load under each of these shmem_enabled settings (root; the old "
                 "value is put back)")
      ->delimiter(',')
      ->check(CLI::IsMember({"never", "advise", "within_size", "always"}));
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

  std::vector<LoadConfig> configs;
  const std::string original = wbroker::broker::ReadShmemHugePages().setting;
  if (shmem_settings.empty()) shmem_settings.push_back("");
  for (const auto& setting : shmem_settings) {
    if (!setting.empty() && original.empty())
      Die(fmt::format("--shmem-enabled: {} is missing (a kernel without shmem THP?)",
                      kShmemEnabled));
    if (!setting.empty() && g_restore_shmem.empty()) g_restore_shmem = original;
    LoadConfig c;
    c.shmem_enabled = setting;
    Apply(c);
    auto backend = wbroker::broker::HostBackend::Create();
    if (!backend.ok()) Die(backend.status().message());
    c.backend = std::move(backend).value();
    const wbroker::broker::ShmemHugePages huge = c.backend->huge_pages();
    c.setting = huge.setting;
    c.huge = huge.madvised_mappings_huge;
    c.fill = c.backend->fill_method();
    configs.push_back(std::move(c));
  }
  json config_rows = json::array();
  for (const auto& c : configs)
    config_rows.push_back({{"shmem_enabled", c.setting}, {"fill", c.fill}, {"huge_pages", c.huge}});
  out["configs"] = config_rows;
  out["shmem_enabled_at_start"] = original;

  fmt::print("{:<60} {:>8} {:>10} {:>10}\n", "what", "threads", "seconds", "GB/s");
  double best_read = 0, best_load = 0, best_fresh = 0, best_write = 0, best_copy = 0;
  std::vector<double> best_config_load(configs.size(), 0);
  std::vector<unsigned> best_config_threads(configs.size(), 1);
  json rows = json::array();
  for (unsigned t : thread_counts) {
    std::vector<double> rs, fs, ws, cs;
    for (auto& c : configs) c.seconds.clear();
    for (int r = 0; r < repeats; ++r) {
      uint64_t b = 0;
      rs.push_back(PageCacheRead(files, t, &b));
      fs.push_back(PageCacheRead(files, t, &b, /*fresh_memory=*/true));
      ws.push_back(MemoryWrite(weights->tensor_bytes, t));
      cs.push_back(MemoryCopy(weights->tensor_bytes, t));
      for (auto& c : configs) {
        Apply(c);
        WarmGuestMemory(weights->tensor_bytes, c.huge);
        wbroker::broker::LoaderOptions opts;
        opts.threads = t;
        auto loaded = wbroker::broker::LoadModel(*resolved, *c.backend, opts);
        if (!loaded.ok()) Die(loaded.status().message());
        c.seconds.push_back(loaded->seconds);
      }
    }
    double rsec = Median(rs), fsec = Median(fs), wsec = Median(ws), csec = Median(cs);
    double rgbs = file_bytes / rsec / 1e9, fgbs = file_bytes / fsec / 1e9,
           wgbs = weights->tensor_bytes / wsec / 1e9, cgbs = weights->tensor_bytes / csec / 1e9;
    best_read = std::max(best_read, rgbs);
    best_fresh = std::max(best_fresh, fgbs);
    best_write = std::max(best_write, wgbs);
    best_copy = std::max(best_copy, cgbs);
    fmt::print("{:<60} {:>8} {:>10.3f} {:>10.2f}\n", "page-cache read (pread 1 MiB, reused buf)", t,
               rsec, rgbs);
    fmt::print("{:<60} {:>8} {:>10.3f} {:>10.2f}\n", "read into fresh memory (own copy)", t, fsec,
               fgbs);
    fmt::print("{:<60} {:>8} {:>10.3f} {:>10.2f}\n", "memset of mapped memory (write rate)", t,
               wsec, wgbs);
    fmt::print("{:<60} {:>8} {:>10.3f} {:>10.2f}\n", "memcpy between mapped buffers (copy rate)", t,
               csec, cgbs);
    json loads = json::array();
    double row_best_s = 0, row_best_gbps = 0;
    for (size_t i = 0; i < configs.size(); ++i) {
      const double lsec = Median(configs[i].seconds);
      const double lgbs = weights->tensor_bytes / lsec / 1e9;
      if (lgbs > best_config_load[i]) best_config_load[i] = lgbs, best_config_threads[i] = t;
      best_load = std::max(best_load, lgbs);
      if (lgbs > row_best_gbps) row_best_s = lsec, row_best_gbps = lgbs;
      fmt::print("{:<60} {:>8} {:>10.3f} {:>10.2f}\n", "broker load: " + configs[i].fill, t, lsec,
                 lgbs);
      loads.push_back({{"config", i}, {"load_s", lsec}, {"load_gbps", lgbs}});
    }
    rows.push_back({{"threads", t},
                    {"page_cache_read_s", rsec},
                    {"page_cache_read_gbps", rgbs},
                    {"fresh_memory_read_s", fsec},
                    {"fresh_memory_read_gbps", fgbs},
                    {"memory_write_s", wsec},
                    {"memory_write_gbps", wgbs},
                    {"memory_copy_s", csec},
                    {"memory_copy_gbps", cgbs},
                    {"loads", loads},
                    {"load_s", row_best_s},
                    {"load_gbps", row_best_gbps}});
  }
  // Cold loads: the previous arena was freed 4 s ago and nothing touched
  // memory since, so on a VM with free page reporting the host has taken the
  // pages back. On bare metal these match the warm figures.
  std::vector<double> cold_gbps(configs.size(), 0);
  for (size_t i = 0; i < configs.size() && cold_repeats > 0; ++i) {
    std::vector<double> secs;
    for (int r = 0; r < cold_repeats; ++r) {
      Apply(configs[i]);
      std::this_thread::sleep_for(std::chrono::seconds(4));
      wbroker::broker::LoaderOptions opts;
      opts.threads = best_config_threads[i];
      auto loaded = wbroker::broker::LoadModel(*resolved, *configs[i].backend, opts);
      if (!loaded.ok()) Die(loaded.status().message());
      secs.push_back(loaded->seconds);
    }
    cold_gbps[i] = weights->tensor_bytes / Median(secs) / 1e9;
    fmt::print("{:<60} {:>8} {:>10.3f} {:>10.2f}\n", "cold broker load: " + configs[i].fill,
               best_config_threads[i], Median(secs), cold_gbps[i]);
  }
  out["free_page_reporting"] = FreePageReporting();
  out["cold_repeats"] = cold_repeats;
  RestoreShmem();
  for (size_t i = 0; i < configs.size(); ++i) {
    out["configs"][i]["best_load_threads"] = best_config_threads[i];
    if (cold_repeats > 0) out["configs"][i]["cold_load_gbps"] = cold_gbps[i];
    out["configs"][i]["best_load_gbps"] = best_config_load[i];
    out["configs"][i]["load_vs_read"] = best_config_load[i] / best_read;
    out["configs"][i]["load_vs_fresh_read"] = best_config_load[i] / best_fresh;
    out["configs"][i]["load_vs_copy"] = best_config_load[i] / best_copy;
  }
  out["load"] = rows;
  out["repeats"] = repeats;
  out["best_page_cache_read_gbps"] = best_read;
  out["best_load_gbps"] = best_load;
  out["best_fresh_memory_read_gbps"] = best_fresh;
  out["best_memory_write_gbps"] = best_write;
  out["best_memory_copy_gbps"] = best_copy;
  out["load_vs_read"] = best_load / best_read;
  out["load_vs_fresh_read"] = best_load / best_fresh;
  fmt::print("\nmemcpy between mapped buffers: {:.2f} GB/s = {:.0f}% of the page-cache read rate\n",
             best_copy, 100 * best_copy / best_read);
  for (size_t i = 0; i < configs.size(); ++i)
    fmt::print(
        "{}: best load {:.2f} GB/s = {:.0f}% of the best page-cache read rate {:.2f} GB/s, "
        "{:.0f}% of memcpy, {:.0f}% of reading into fresh memory {:.2f} GB/s\n",
        configs[i].fill, best_config_load[i], 100 * best_config_load[i] / best_read, best_read,
        100 * best_config_load[i] / best_copy, 100 * best_config_load[i] / best_fresh, best_fresh);

  if (!attach_model.empty() && !wbrokerd.empty()) {
    std::string sock = fmt::format("/tmp/wbroker-bench-{}.sock", ::getpid());
    pid_t broker = StartBroker(wbrokerd, sock, cache, attach_model);
    wbroker::client::ClientOptions co;
    co.socket_path = sock;
    auto client = wbroker::client::Client::Connect(co);
    if (!client.ok()) Die(client.status().message());
    // By branch ("main", read from the cache on a resolver thread each time)
    // and by the full commit (served from the registry, no cache access).
    std::vector<double> att, rel, att_commit;
    size_t tensors = 0;
    std::string commit;
    for (int i = 0; i < attaches + 20; ++i) {
      if (!commit.empty()) {
        auto t0 = Clock::now();
        auto pinned = (*client)->Attach(attach_model, commit);
        auto t1 = Clock::now();
        if (!pinned.ok()) Die(pinned.status().message());
        if (auto st = (*pinned)->Release(); !st.ok()) Die(st.message());
        if (i >= 20) att_commit.push_back(Seconds(t0, t1) * 1e3);
      }
      auto t0 = Clock::now();
      auto lease = (*client)->Attach(attach_model);
      auto t1 = Clock::now();
      if (!lease.ok()) Die(lease.status().message());
      tensors = (*lease)->tensors().size();
      commit = (*lease)->revision();
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
    out["attach"] = {{"model", attach_model},
                     {"tensors", tensors},
                     {"round_trips", attaches},
                     {"attach_ms_median", Median(att)},
                     {"attach_ms_p99", Percentile(att, 0.99)},
                     {"attach_by_commit_ms_median", Median(att_commit)},
                     {"attach_by_commit_ms_p99", Percentile(att_commit, 0.99)},
                     {"release_ms_median", Median(rel)}};
    fmt::print(
        "\nattach {} ({} tensors): median {:.3f} ms, p99 {:.3f} ms; by full commit: median {:.3f} "
        "ms, p99 {:.3f} ms; release median {:.3f} ms\n",
        attach_model, tensors, Median(att), Percentile(att, 0.99), Median(att_commit),
        Percentile(att_commit, 0.99), Median(rel));
  }
  if (!json_out.empty()) std::ofstream(json_out) << out.dump(2) << "\n";
  return 0;
}
