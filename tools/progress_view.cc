// wbrokerctl: rendering of load progress events.
#include "progress_view.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "wbroker/common/size_units.h"

namespace wbroker::tools {

std::optional<double> EtaSeconds(uint64_t bytes_done, uint64_t bytes_total,
                                 double bytes_per_second) {
  if (bytes_done >= bytes_total) return 0.0;
  if (!(bytes_per_second > 0) || !std::isfinite(bytes_per_second)) return std::nullopt;
  return static_cast<double>(bytes_total - bytes_done) / bytes_per_second;
}

std::string FormatEta(std::optional<double> seconds) {
  if (!seconds || !std::isfinite(*seconds) || *seconds < 0) return "--:--";
  const auto total = static_cast<uint64_t>(std::ceil(*seconds));
  const uint64_t h = total / 3600, m = total / 60 % 60, s = total % 60;
  if (h > 0) return fmt::format("{}:{:02}:{:02}", h, m, s);
  return fmt::format("{}:{:02}", m, s);
}

std::string FormatRate(double bytes_per_second) {
  if (!(bytes_per_second > 0) || !std::isfinite(bytes_per_second)) return "-- B/s";
  static const char* kUnits[] = {"B/s", "kB/s", "MB/s", "GB/s", "TB/s"};
  double v = bytes_per_second;
  int u = 0;
  while (v >= 1000.0 && u < 4) {
    v /= 1000.0;
    ++u;
  }
  return u >= 3 ? fmt::format("{:.2f} {}", v, kUnits[u]) : fmt::format("{:.1f} {}", v, kUnits[u]);
}

std::string RenderProgressLine(const nlohmann::json& event, size_t width) {
  const uint64_t done = event.value("bytes_done", uint64_t{0});
  const uint64_t total = event.value("bytes_total", uint64_t{0});
  const double rate = event.value("bytes_per_second", 0.0);
  const std::string kind = event.value("event", "progress");
  const std::string revision = event.value("revision", "");
  const std::string label =
      event.value("model", "") + (revision.empty() ? "" : "@" + revision.substr(0, 8));

  const double fraction =
      total > 0 ? std::min(1.0, static_cast<double>(done) / static_cast<double>(total))
                : (kind == "ready" ? 1.0 : 0.0);
  std::string figures;
  if (total == 0 && kind == "progress") {
    figures = "  0% opening the weight files";
  } else {
    // "172.00/256.00 MiB": the unit once when both sides share it.
    std::string done_text = FormatBytes(done);
    const std::string total_text = FormatBytes(total);
    const size_t unit = total_text.rfind(' ');
    if (unit != std::string::npos && done_text.size() > unit &&
        done_text.substr(done_text.rfind(' ')) == total_text.substr(unit))
      done_text.resize(done_text.rfind(' '));
    figures = fmt::format("{:>3}% {}/{} {}", static_cast<int>(fraction * 100), done_text,
                          total_text, FormatRate(rate));
    figures += kind == "progress" ? " ETA " + FormatEta(EtaSeconds(done, total, rate)) : " " + kind;
  }
  std::string file;
  const std::string current = event.value("current_file", "");
  const size_t files_total = event.value("files_total", size_t{0});
  if (!current.empty())
    file =
        fmt::format(" {} ({}/{})", current,
                    std::min(event.value("files_done", size_t{0}) + 1, files_total), files_total);

  // The bar takes what the label and figures leave, between 10 and 40 cells;
  // on a narrow terminal the file name goes first, then the line is cut.
  const size_t fixed = label.size() + 2 + 2 + figures.size();
  const size_t bar = width > fixed + 10 ? std::min<size_t>(40, width - fixed) : 10;
  const auto filled = static_cast<size_t>(fraction * static_cast<double>(bar));
  std::string line =
      label + " [" + std::string(filled, '#') + std::string(bar - filled, '.') + "] " + figures;
  if (line.size() + file.size() <= width) line += file;
  if (line.size() > width) line.resize(width);
  return line;
}

}  // namespace wbroker::tools
