#include "wbroker/common/size_units.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <string>

namespace wbroker {

Result<uint64_t> ParseByteSize(std::string_view text) {
  auto bad = [&](std::string_view why) {
    return Status(ErrorCode::kInvalidArgument, fmt::format("invalid size \"{}\": {}", text, why));
  };
  std::string_view s = text;
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  if (s.empty()) return bad("empty");
  size_t num_end = 0;
  while (num_end < s.size() &&
         (std::isdigit(static_cast<unsigned char>(s[num_end])) || s[num_end] == '.'))
    ++num_end;
  if (num_end == 0) return bad("expected a number");
  double value = 0;
  auto [ptr, ec] = std::from_chars(s.data(), s.data() + num_end, value);
  if (ec != std::errc() || ptr != s.data() + num_end) return bad("expected a number");
  std::string unit(s.substr(num_end));
  unit.erase(
      std::remove_if(unit.begin(), unit.end(), [](unsigned char c) { return std::isspace(c); }),
      unit.end());
  std::transform(unit.begin(), unit.end(), unit.begin(),
                 [](unsigned char c) { return std::tolower(c); });
  double mult = 0;
  if (unit.empty() || unit == "b") mult = 1;
  const char* prefixes = "kmgtp";
  for (int i = 0; i < 5 && mult == 0; ++i) {
    std::string p(1, prefixes[i]);
    if (unit == p || unit == p + "ib")
      mult = std::pow(1024.0, i + 1);
    else if (unit == p + "b")
      mult = std::pow(1000.0, i + 1);
  }
  if (mult == 0)
    return bad("unknown unit (use B, K/KiB, M/MiB, G/GiB, T/TiB, P/PiB, KB, MB, GB, TB, PB)");
  double bytes = value * mult;
  if (!(bytes >= 0) || bytes >= 1.8e19) return bad("out of range");
  // Not llround(): it returns a signed 64-bit value, which overflows above 2^63.
  return static_cast<uint64_t>(std::round(bytes));
}

std::string FormatBytes(uint64_t bytes) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  if (bytes < 1024) return fmt::format("{} B", bytes);
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 5) {
    v /= 1024.0;
    ++u;
  }
  return fmt::format("{:.2f} {}", v, kUnits[u]);
}

}  // namespace wbroker
