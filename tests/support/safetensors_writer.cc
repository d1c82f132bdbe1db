#include "safetensors_writer.h"

#include <nlohmann/json.hpp>

#include <functional>

namespace wbroker::testing {

std::string PatternBytes(size_t n, uint64_t seed) {
  std::string out(n, '\0');
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 0x1234567ull;
  for (size_t i = 0; i < n; ++i) {
    // xorshift64*: cheap, deterministic, and never constant.
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    out[i] = static_cast<char>((x * 0x2545F4914F6CDD1Dull) >> 56);
  }
  return out;
}

uint64_t FixtureTensorBytes(const FixtureTensor& t) {
  uint64_t n = 1;
  for (uint64_t d : t.shape) n *= d;
  return n * DTypeBits(t.dtype) / 8;
}

std::string FixtureTensorData(const FixtureTensor& t) {
  if (!t.data.empty()) return t.data;
  return PatternBytes(FixtureTensorBytes(t), std::hash<std::string>{}(t.name));
}

std::string SerializeSafetensors(const std::vector<FixtureTensor>& tensors,
                                 const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string data;
  for (const auto& t : tensors) {
    std::string bytes = FixtureTensorData(t);
    nlohmann::ordered_json entry;
    entry["dtype"] = std::string(DTypeName(t.dtype));
    entry["shape"] = t.shape;
    entry["data_offsets"] = {data.size(), data.size() + bytes.size()};
    header[t.name] = entry;
    data += bytes;
  }
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');
  return RawSafetensors(json, data);
}

std::string RawSafetensors(const std::string& header_json, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header_json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header_json + data;
}

}  // namespace wbroker::testing
