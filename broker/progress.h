// wbroker broker: how far one model load has come. The loader threads only
// add to lock-free counters; the io thread samples them for status, progress
// events and log lines, so observing a load never slows it down.
#pragma once

#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace wbroker::broker {

/// One weight file of a load, in read order.
struct ProgressFile {
  std::string name;    ///< relative to the snapshot ("model-00001-of-00004.safetensors")
  uint64_t bytes = 0;  ///< tensor bytes read from it
};

/// A point-in-time copy of a load's progress.
struct ProgressSample {
  bool planned = false;         ///< the weights were opened and the totals are known
  uint64_t bytes_done = 0;      ///< tensor bytes copied into the arena so far
  uint64_t bytes_total = 0;     ///< tensor bytes to read (0 until planned)
  size_t files_done = 0;        ///< files whose bytes are all in (see LoadProgress)
  size_t files_total = 0;       ///< weight files of the model (0 until planned)
  std::string current_file;     ///< the file being read; "" before planning and when done
  double elapsed_seconds = 0;   ///< since the load was requested
  double bytes_per_second = 0;  ///< bytes_done over the time since reading started
};

/// The progress of one load. Written by the loader (SetPlan once, then
/// AddBytes from any reader thread); read from any thread with Sample().
///
/// Readers work through the files front to back, so files_done and
/// current_file are derived from bytes_done in file order: exact at file
/// boundaries, and ahead by at most the chunks in flight (threads x 16 MiB).
class LoadProgress {
 public:
  LoadProgress() : start_(std::chrono::steady_clock::now()) {}
  LoadProgress(const LoadProgress&) = delete;
  LoadProgress& operator=(const LoadProgress&) = delete;

  /// Loader thread, once, before the first AddBytes: the files in read order.
  void SetPlan(std::vector<ProgressFile> files);
  /// Any loader thread: `n` more bytes are in the arena. Never blocks.
  void AddBytes(uint64_t n) { done_.fetch_add(n, std::memory_order_relaxed); }
  /// Any thread: the counters now.
  ProgressSample Sample() const;

 private:
  const std::chrono::steady_clock::time_point start_;  ///< when the load was requested
  std::vector<ProgressFile> files_;           ///< written once by SetPlan, before planned_ is set
  std::vector<uint64_t> ends_;                ///< cumulative byte offset where each file ends
  uint64_t total_ = 0;                        ///< sum of the files' bytes
  std::atomic<int64_t> reading_since_ns_{0};  ///< steady clock at SetPlan (rate base)
  std::atomic<bool> planned_{false};          ///< files_/ends_/total_ are published
  std::atomic<uint64_t> done_{0};             ///< bytes copied so far
};

/// When the broker's log gets a progress line for a running load: each time
/// another `step_percent` is crossed, or `every_seconds` after the last line,
/// whichever comes first (a stalled load still gets a line every
/// `every_seconds`). 100 % is left to the "loaded" line. Io thread only.
class ProgressLogPolicy {
 public:
  explicit ProgressLogPolicy(double every_seconds = 5.0, int step_percent = 25)
      : every_seconds_(every_seconds), step_percent_(step_percent) {}
  /// True when `sample` deserves a line (and remembers that it got one).
  bool ShouldLog(const ProgressSample& sample);

 private:
  double every_seconds_;     ///< the longest quiet stretch
  int step_percent_;         ///< log at each multiple of this
  double last_elapsed_ = 0;  ///< elapsed_seconds of the last line
  int last_step_ = 0;        ///< multiples of step_percent_ logged so far
};

/// The percentage of a sample, 0..100 (0 until planned; 100 for an empty model).
int ProgressPercent(const ProgressSample& sample);

/// A log line for `label` ("org/name@commit"): percent, bytes, file, rate.
std::string ProgressLogLine(const std::string& label, const ProgressSample& sample);

/// The progress event body (without "id"/"event"): bytes_done, bytes_total,
/// files_done, files_total, current_file, elapsed_seconds, bytes_per_second.
nlohmann::json ProgressSampleJson(const ProgressSample& sample);

}  // namespace wbroker::broker
