// wbroker broker: load progress counters, their samples, log lines and events.
#include "progress.h"

#include <fmt/format.h>

#include <algorithm>

#include "wbroker/common/size_units.h"

namespace wbroker::broker {
namespace {

int64_t SteadyNanos(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
}

}  // namespace

void LoadProgress::SetPlan(std::vector<ProgressFile> files) {
  if (planned_.load(std::memory_order_acquire)) return;  // the plan is fixed once published
  files_ = std::move(files);
  ends_.clear();
  total_ = 0;
  for (const auto& f : files_) {
    total_ += f.bytes;
    ends_.push_back(total_);
  }
  reading_since_ns_.store(SteadyNanos(std::chrono::steady_clock::now()), std::memory_order_relaxed);
  // Release: a reader that sees planned_ also sees files_, ends_ and total_.
  planned_.store(true, std::memory_order_release);
}

ProgressSample LoadProgress::Sample() const {
  const auto now = std::chrono::steady_clock::now();
  ProgressSample s;
  s.elapsed_seconds = std::chrono::duration<double>(now - start_).count();
  if (!planned_.load(std::memory_order_acquire)) return s;
  s.planned = true;
  s.bytes_total = total_;
  s.files_total = files_.size();
  s.bytes_done = std::min(done_.load(std::memory_order_relaxed), total_);
  // Files whose end lies at or before the reading front are done.
  s.files_done = static_cast<size_t>(std::upper_bound(ends_.begin(), ends_.end(), s.bytes_done) -
                                     ends_.begin());
  if (s.bytes_done == total_) s.files_done = files_.size();  // zero-byte tail files included
  if (s.files_done < files_.size()) s.current_file = files_[s.files_done].name;
  const double reading =
      static_cast<double>(SteadyNanos(now) - reading_since_ns_.load(std::memory_order_relaxed)) /
      1e9;
  s.bytes_per_second = reading > 0 ? static_cast<double>(s.bytes_done) / reading : 0;
  return s;
}

int ProgressPercent(const ProgressSample& sample) {
  if (!sample.planned) return 0;
  if (sample.bytes_total == 0) return 100;
  return static_cast<int>(sample.bytes_done * 100 / sample.bytes_total);
}

bool ProgressLogPolicy::ShouldLog(const ProgressSample& sample) {
  if (!sample.planned) return false;
  const int pct = ProgressPercent(sample);
  if (pct >= 100) return false;  // FinishLoad logs the end
  const int step = step_percent_ > 0 ? pct / step_percent_ : 0;
  const bool crossed = step > last_step_;
  const bool quiet_too_long = sample.elapsed_seconds - last_elapsed_ >= every_seconds_;
  if (!crossed && !quiet_too_long) return false;
  last_step_ = std::max(last_step_, step);
  last_elapsed_ = sample.elapsed_seconds;
  return true;
}

std::string ProgressLogLine(const std::string& label, const ProgressSample& s) {
  std::string line =
      fmt::format("loading {}: {}% ({} of {}), file {}/{}", label, ProgressPercent(s),
                  FormatBytes(s.bytes_done), FormatBytes(s.bytes_total),
                  std::min(s.files_done + 1, s.files_total), s.files_total);
  if (!s.current_file.empty()) line += fmt::format(" ({})", s.current_file);
  line += fmt::format(", {:.2f} GB/s, {:.1f} s", s.bytes_per_second / 1e9, s.elapsed_seconds);
  return line;
}

nlohmann::json ProgressSampleJson(const ProgressSample& s) {
  return {{"bytes_done", s.bytes_done},
          {"bytes_total", s.bytes_total},
          {"files_done", s.files_done},
          {"files_total", s.files_total},
          {"current_file", s.current_file},
          {"elapsed_seconds", s.elapsed_seconds},
          {"bytes_per_second", s.bytes_per_second}};
}

}  // namespace wbroker::broker
