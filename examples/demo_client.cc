// wbroker-demo-client: attach a model from wbrokerd, read every byte of it, report
// what the mapping costs this process, hold the lease, release it.
//
//   wbroker-demo-client --socket /run/wbroker/wbroker.sock --model org/name@3f6b9d2
//                       --hold-seconds 60 --ready-file /tmp/client-1.ready
//
// Prints one line on stdout:
//   pid=4242 model=org/name revision=<40 hex> tensors=300 bytes=268435456
//   checksum=<16 hex> attach_ms=3.41 arena_pss_kib=262144 arena_rss_kib=262144
// then holds the lease for --hold-seconds (or until SIGTERM/SIGINT) and releases it.
// The ready file (written after that line, atomically) holds the same line.
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <sstream>
#include <string>

#include "wbroker/client/client.h"
#include "wbroker/common/hf_cache.h"

namespace {

int Fail(const std::string& message) {
  std::fprintf(stderr, "wbroker-demo-client: %s\n", message.c_str());
  return 1;
}

// Reads every byte of `data` (so every page gets mapped in) and folds it into a
// 64-bit checksum: the wrapping sum of the little-endian 64-bit words (the
// tail zero-padded), mixed with the length.
uint64_t ChecksumBytes(const void* data, uint64_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t sum = 0;
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    sum += w;
  }
  if (i < n) {
    uint64_t w = 0;
    std::memcpy(&w, p + i, n - i);
    sum += w;
  }
  return sum ^ (n * 0x9E3779B97F4A7C15ull);
}

// Checksum over all tensors in manifest order (order-sensitive).
uint64_t ChecksumLease(const wbroker::client::Lease& lease, uint64_t* total_bytes) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV offset basis, then a multiply per tensor
  uint64_t total = 0;
  for (const auto& t : lease.tensors()) {
    h = (h ^ ChecksumBytes(t.data, t.nbytes)) * 0x100000001b3ull;
    total += t.nbytes;
  }
  *total_bytes = total;
  return h;
}

struct ArenaMemory {
  uint64_t pss_kib = 0;
  uint64_t rss_kib = 0;
  int mappings = 0;
};

bool IsMappingHeader(const std::string& line) {
  // "7f12a0000000-7f12b0000000 r--s 00000000 00:01 1234  /memfd:wbroker:... (deleted)"
  size_t dash = line.find('-');
  size_t space = line.find(' ');
  if (dash == std::string::npos || space == std::string::npos || dash == 0 || dash > space)
    return false;
  for (size_t i = 0; i < space; ++i) {
    if (i != dash && !std::isxdigit(static_cast<unsigned char>(line[i]))) return false;
  }
  return true;
}

// Sums Pss and Rss of this process's mappings of wbroker arenas ("memfd:wbroker...").
wbroker::Result<ArenaMemory> ReadArenaMemory() {
  std::ifstream in("/proc/self/smaps");
  if (!in) return wbroker::ErrnoStatus("cannot read /proc/self/smaps");
  ArenaMemory m;
  bool in_arena = false;
  std::string line;
  while (std::getline(in, line)) {
    if (IsMappingHeader(line)) {
      in_arena = line.find("memfd:wbroker") != std::string::npos;
      m.mappings += in_arena;
      continue;
    }
    if (!in_arena) continue;
    std::istringstream fields(line);
    std::string key;
    uint64_t kib = 0;
    if (!(fields >> key >> kib)) continue;
    if (key == "Pss:")
      m.pss_kib += kib;
    else if (key == "Rss:")
      m.rss_kib += kib;
  }
  return m;
}

wbroker::Status WriteReadyFile(const std::string& path, const std::string& text) {
  const std::string tmp = fmt::format("{}.tmp.{}", path, ::getpid());
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << text;
    out.close();
    if (!out) return wbroker::ErrnoStatus("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    auto s = wbroker::ErrnoStatus(fmt::format("cannot rename {} to {}", tmp, path));
    std::remove(tmp.c_str());
    return s;
  }
  return wbroker::Status::Ok();
}

// Waits up to `seconds` for SIGTERM or SIGINT (blocked in `set`); returns the
// signal, or 0 when the time ran out.
int HoldFor(double seconds, const sigset_t& set) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(seconds));
  for (;;) {
    auto left = deadline - Clock::now();
    if (left <= Clock::duration::zero()) return 0;
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
    timespec ts{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
    int sig = ::sigtimedwait(&set, nullptr, &ts);
    if (sig > 0) return sig;
    if (errno != EINTR && errno != EAGAIN) return 0;
  }
}

}  // namespace

int main(int argc, char** argv) try {
  CLI::App app{"wbroker-demo-client: attach a model from wbrokerd, read all of it, hold the lease"};
  std::string socket_path, spec, ready_file;
  double hold_seconds = 0;
  app.add_option("--socket", socket_path,
                 "broker socket (default: $WBROKER_SOCKET, else /run/wbroker/wbroker.sock)");
  app.add_option("--model", spec,
                 "MODEL[@REV]: repo id or absolute path; REV a branch, tag, "
                 "full or short (>= 7 hex) commit")
      ->required();
  app.add_option("--hold-seconds", hold_seconds,
                 "keep the lease this long after attaching (SIGTERM/SIGINT end it early)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--ready-file", ready_file,
                 "write the report line to this file once attached and read");
  CLI11_PARSE(app, argc, argv);

  // Block the stop signals before any thread exists; HoldFor() takes them with
  // sigtimedwait, so a signal that comes early is not lost.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  if (::sigprocmask(SIG_BLOCK, &stop_signals, nullptr) != 0)
    return Fail(wbroker::ErrnoStatus("sigprocmask").message());

  auto ms = wbroker::ParseModelSpec(spec);
  if (!ms.ok()) return Fail(fmt::format("--model {}: {}", spec, ms.status().message()));

  wbroker::client::ClientOptions opts;
  opts.socket_path = socket_path;
  opts.client_name = "wbroker-demo-client";
  auto client = wbroker::client::Client::Connect(opts);
  if (!client.ok()) return Fail(fmt::format("connect: {}", client.status().message()));

  const auto t0 = std::chrono::steady_clock::now();
  auto lease = (*client)->Attach(ms->model, ms->revision);
  const auto t1 = std::chrono::steady_clock::now();
  if (!lease.ok()) return Fail(fmt::format("attach {}: {}", spec, lease.status().message()));
  const double attach_ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
  // GPU arenas hand out device pointers, which this host-side reader cannot touch.
  if ((*lease)->backend() != "host")
    return Fail(
        fmt::format("attach {}: the broker serves it from {} ({} backend); this demo reads "
                    "host arenas only (start wbrokerd with --device cpu)",
                    spec, (*lease)->device(), (*lease)->backend()));

  uint64_t bytes = 0;
  const uint64_t checksum = ChecksumLease(**lease, &bytes);
  auto mem = ReadArenaMemory();
  if (!mem.ok()) return Fail(mem.status().message());
  if (mem->mappings == 0)
    return Fail("no memfd:wbroker mapping found in /proc/self/smaps after attaching");

  const std::string line = fmt::format(
      "pid={} model={} revision={} tensors={} bytes={} checksum={:016x} attach_ms={:.2f} "
      "arena_pss_kib={} arena_rss_kib={}",
      ::getpid(), (*lease)->model(), (*lease)->revision().empty() ? "-" : (*lease)->revision(),
      (*lease)->tensors().size(), bytes, checksum, attach_ms, mem->pss_kib, mem->rss_kib);
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
  if (!ready_file.empty()) {
    auto s = WriteReadyFile(ready_file, line + "\n");
    if (!s.ok()) return Fail(s.message());
  }

  if (hold_seconds > 0) HoldFor(hold_seconds, stop_signals);

  auto released = (*lease)->Release();
  if (!released.ok()) return Fail(fmt::format("release {}: {}", spec, released.message()));
  return 0;
} catch (const std::exception& e) {
  return Fail(std::string("fatal: ") + e.what());
}
