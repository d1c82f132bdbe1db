#include "wbroker/common/manifest.h"

#include <fmt/format.h>

#include <string_view>
#include <unordered_set>

namespace wbroker {

Result<uint64_t> TensorBytes(DType dtype, const std::vector<uint64_t>& shape) {
  uint64_t elements = 1;
  for (uint64_t d : shape) {
    if (__builtin_mul_overflow(elements, d, &elements))
      return Status(ErrorCode::kCorruptData, "shape product overflows 64 bits");
  }
  uint64_t bits = 0;
  if (__builtin_mul_overflow(elements, static_cast<uint64_t>(DTypeBits(dtype)), &bits))
    return Status(ErrorCode::kCorruptData, "shape x dtype size overflows 64 bits");
  if (bits % 8 != 0)
    return Status(ErrorCode::kCorruptData, fmt::format("{} elements of {} do not fill whole bytes",
                                                       elements, DTypeName(dtype)));
  return bits / 8;
}

nlohmann::json ManifestToJson(const std::vector<ManifestTensor>& tensors) {
  nlohmann::json arr = nlohmann::json::array();
  for (const auto& t : tensors)
    arr.push_back({t.name, DTypeName(t.dtype), t.shape, t.offset, t.nbytes});
  return arr;
}

Result<std::vector<ManifestTensor>> ManifestFromJson(const nlohmann::json& tensors,
                                                     uint64_t arena_size) {
  auto bad = [](const std::string& what) {
    return Status(ErrorCode::kProtocol, "manifest: " + what);
  };
  if (!tensors.is_array()) return bad("tensors is not an array");
  std::vector<ManifestTensor> out;
  out.reserve(tensors.size());
  std::unordered_set<std::string_view> names;
  names.reserve(tensors.size());
  for (const auto& e : tensors) {
    if (!e.is_array() || e.size() != 5)
      return bad("entry is not an array of 5 fields [name, dtype, shape, offset, nbytes]");
    const auto& name = e[0];
    const auto& dtype = e[1];
    const auto& shape = e[2];
    const auto& offset = e[3];
    const auto& nbytes = e[4];
    if (!name.is_string()) return bad("entry without a string name");
    ManifestTensor t;
    t.name = name.get<std::string>();
    if (!dtype.is_string() || !shape.is_array() || !offset.is_number_unsigned() ||
        !nbytes.is_number_unsigned())
      return bad(fmt::format("tensor \"{}\": mistyped dtype/shape/offset/nbytes", t.name));
    auto dt = DTypeFromName(dtype.get_ref<const std::string&>());
    if (!dt) return bad(fmt::format("tensor \"{}\": unknown dtype", t.name));
    t.dtype = *dt;
    t.shape.reserve(shape.size());
    for (const auto& d : shape) {
      if (!d.is_number_unsigned())
        return bad(
            fmt::format("tensor \"{}\": shape entries must be non-negative integers", t.name));
      t.shape.push_back(d.get<uint64_t>());
    }
    t.offset = offset.get<uint64_t>();
    t.nbytes = nbytes.get<uint64_t>();
    auto expect = TensorBytes(t.dtype, t.shape);
    if (!expect.ok() || *expect != t.nbytes)
      return bad(fmt::format("tensor \"{}\": nbytes {} does not match its shape and dtype", t.name,
                             t.nbytes));
    uint64_t end = 0;
    if (__builtin_add_overflow(t.offset, t.nbytes, &end) || end > arena_size)
      return bad(fmt::format("tensor \"{}\": offset {} + {} bytes lies outside the {}-byte arena",
                             t.name, t.offset, t.nbytes, arena_size));
    if (t.offset % kArenaAlignment != 0)
      return bad(fmt::format("tensor \"{}\": offset {} is not {}-byte aligned", t.name, t.offset,
                             kArenaAlignment));
    if (!names.insert(name.get_ref<const std::string&>()).second)
      return bad(fmt::format("duplicate tensor \"{}\"", t.name));
    out.push_back(std::move(t));
  }
  return out;
}

}  // namespace wbroker
