// wbroker: safetensors header parsing and validation.
//
// Mirrors the reference's read_metadata()/validate() rule for rule, with
// two deliberate differences: the header must start with '{' (the format
// spec says MUST; the reference lets serde skip leading whitespace), and
// duplicate keys are refused in every JSON object (the reference keeps the
// last duplicate tensor or metadata key and refuses only duplicate fields of
// its structs). Like the reference, unknown fields in a tensor entry are
// ignored and `"__metadata__": null` means no metadata.
#include "wbroker/common/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <set>
#include <tuple>
#include <utility>

#include "wbroker/common/unique_fd.h"

namespace wbroker {
namespace {

using nlohmann::json;

constexpr uint64_t kPrefixBytes = 8;
// serde_json's default recursion limit lets the reference accept 127 nested
// levels (unknown tensor fields may nest); deeper headers are refused there.
constexpr size_t kMaxJsonDepth = 127;

Status Corrupt(std::string_view label, std::string_view rule) {
  return Status(ErrorCode::kCorruptData, fmt::format("{}: {}", label, rule));
}

uint64_t LoadLe64(std::string_view bytes) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  return n;
}

// Strict UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing above
// U+10FFFF, no truncated sequences. Returns the offset of the first bad byte,
// or npos when `s` is valid.
size_t FindInvalidUtf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;  // overlong
      if (c == 0xED) hi = 0x9F;  // surrogates U+D800..U+DFFF
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;  // overlong
      if (c == 0xF4) hi = 0x8F;  // above U+10FFFF
    } else {
      return i;  // continuation byte, C0/C1 overlong lead, or F5..FF
    }
    if (n - i < len) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (size_t k = 2; k < len; ++k) {
      if (p[i + k] < 0x80 || p[i + k] > 0xBF) return i;
    }
    i += len;
  }
  return std::string_view::npos;
}

// Thrown from the parser callback to stop parsing; caught in ParseJson().
struct JsonRuleBroken {
  std::string rule;
};

// Parses the header JSON, refusing duplicate keys and excessive nesting, and
// dropping unknown tensor fields as they are read so they cost no memory.
Result<json> ParseJson(std::string_view label, std::string_view text) {
  std::vector<std::set<std::string>> seen;  // keys of each open object
  size_t depth = 0;                         // open objects and arrays
  std::string entry;                        // current top-level key

  auto where = [&]() -> std::string {
    if (seen.size() <= 1) return "header";
    if (entry == "__metadata__") return "__metadata__";
    return fmt::format("tensor \"{}\"", entry);
  };

  json::parser_callback_t callback = [&](int, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (++depth > kMaxJsonDepth) {
          throw JsonRuleBroken{
              fmt::format("{}: JSON nests deeper than {} levels", where(), kMaxJsonDepth)};
        }
        if (event == json::parse_event_t::object_start) seen.emplace_back();
        return true;
      case json::parse_event_t::object_end:
        --depth;
        seen.pop_back();
        return true;
      case json::parse_event_t::array_end:
        --depth;
        return true;
      case json::parse_event_t::key: {
        const std::string& key = parsed.get_ref<const std::string&>();
        if (!seen.back().insert(key).second) {
          throw JsonRuleBroken{fmt::format("{}: duplicate key \"{}\"", where(), key)};
        }
        if (seen.size() == 1) entry = key;
        // A field of a tensor entry that is not one of the three is ignored.
        if (seen.size() == 2 && depth == 2 && entry != "__metadata__") {
          return key == "dtype" || key == "shape" || key == "data_offsets";
        }
        return true;
      }
      case json::parse_event_t::value:
        return true;
    }
    return true;
  };

  try {
    return json::parse(text.begin(), text.end(), callback, /*allow_exceptions=*/true,
                       /*ignore_comments=*/false);
  } catch (const JsonRuleBroken& e) {
    return Corrupt(label, e.rule);
  } catch (const json::exception& e) {
    return Corrupt(label, fmt::format("header is not valid JSON: {}", e.what()));
  }
}

// "[2, 3]"; long shapes are cut so that messages stay readable.
std::string ShapeText(const std::vector<uint64_t>& shape) {
  constexpr size_t kMaxDims = 16;
  if (shape.size() <= kMaxDims) return fmt::format("[{}]", fmt::join(shape, ", "));
  return fmt::format("[{}, ... ({} dims)]",
                     fmt::join(shape.begin(), shape.begin() + kMaxDims, ", "), shape.size());
}

// A short description of a JSON value for messages: numbers verbatim, else the type.
std::string Describe(const json& v) {
  return v.is_number() ? v.dump() : v.type_name();
}

// A JSON array of non-negative integers, or an error naming `field`.
Result<std::vector<uint64_t>> UnsignedArray(std::string_view label, const std::string& name,
                                            const json& entry, const char* field) {
  auto it = entry.find(field);
  if (it == entry.end()) {
    return Corrupt(label, fmt::format("tensor \"{}\": missing field \"{}\"", name, field));
  }
  if (!it->is_array()) {
    return Corrupt(label, fmt::format("tensor \"{}\": \"{}\" is not an array", name, field));
  }
  std::vector<uint64_t> out;
  out.reserve(it->size());
  for (size_t i = 0; i < it->size(); ++i) {
    const json& v = (*it)[i];
    // nlohmann stores non-negative integer literals as unsigned, negative ones
    // (including -0) as signed and anything with a fraction or exponent, or
    // beyond 64 bits, as float: only the first is a usize to the reference.
    if (!v.is_number_unsigned()) {
      return Corrupt(label, fmt::format("tensor \"{}\": \"{}\" element {} ({}) is not a "
                                        "non-negative integer",
                                        name, field, i, Describe(v)));
    }
    out.push_back(v.get<uint64_t>());
  }
  return out;
}

Result<TensorInfo> ParseTensor(std::string_view label, const std::string& name, const json& entry) {
  if (!entry.is_object()) {
    return Corrupt(label, fmt::format("tensor \"{}\": entry is not a JSON object", name));
  }
  TensorInfo t;
  t.name = name;

  auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end()) {
    return Corrupt(label, fmt::format("tensor \"{}\": missing field \"dtype\"", name));
  }
  if (!dtype_it->is_string()) {
    return Corrupt(label, fmt::format("tensor \"{}\": \"dtype\" is not a string", name));
  }
  const auto& dtype_name = dtype_it->get_ref<const std::string&>();
  std::optional<DType> dtype = DTypeFromName(dtype_name);
  if (!dtype) {
    return Corrupt(label, fmt::format("tensor \"{}\": unknown dtype \"{}\"", name, dtype_name));
  }
  t.dtype = *dtype;

  WB_ASSIGN_OR_RETURN(t.shape, UnsignedArray(label, name, entry, "shape"));
  WB_ASSIGN_OR_RETURN(std::vector<uint64_t> offsets,
                      UnsignedArray(label, name, entry, "data_offsets"));
  if (offsets.size() != 2) {
    return Corrupt(label, fmt::format("tensor \"{}\": \"data_offsets\" has {} elements, "
                                      "expected 2",
                                      name, offsets.size()));
  }
  t.begin = offsets[0];
  t.end = offsets[1];
  if (t.begin > t.end) {
    return Corrupt(label, fmt::format("tensor \"{}\": data_offsets [{}, {}] are reversed "
                                      "(begin > end)",
                                      name, t.begin, t.end));
  }

  uint64_t elements = 1;
  uint64_t nbits = 0;
  bool overflow = false;
  for (uint64_t d : t.shape) overflow |= __builtin_mul_overflow(elements, d, &elements);
  overflow |= __builtin_mul_overflow(elements, uint64_t{DTypeBits(t.dtype)}, &nbits);
  if (overflow) {
    return Corrupt(label, fmt::format("tensor \"{}\": size of shape {} x {} overflows 64 bits",
                                      name, ShapeText(t.shape), DTypeName(t.dtype)));
  }
  if (nbits % 8 != 0) {
    return Corrupt(label, fmt::format("tensor \"{}\": shape {} x {} = {} bits is not a whole "
                                      "number of bytes",
                                      name, ShapeText(t.shape), DTypeName(t.dtype), nbits));
  }
  if (t.nbytes() != nbits / 8) {
    return Corrupt(label, fmt::format("tensor \"{}\": data_offsets [{}, {}] do not match shape "
                                      "{} x {} = {} bytes",
                                      name, t.begin, t.end, ShapeText(t.shape), DTypeName(t.dtype),
                                      nbits / 8));
  }
  return t;
}

Status ParseMetadata(std::string_view label, const json& value,
                     std::map<std::string, std::string>* out) {
  if (value.is_null()) return Status::Ok();  // serde's Option: null = absent
  if (!value.is_object()) {
    return Corrupt(label, "__metadata__ is not an object of string values");
  }
  for (const auto& [key, v] : value.items()) {
    if (!v.is_string()) {
      return Corrupt(label, fmt::format("__metadata__ value of \"{}\" is not a string ({})", key,
                                        Describe(v)));
    }
    (*out)[key] = v.get<std::string>();
  }
  return Status::Ok();
}

// pread()s exactly `n` bytes at `offset` into `out` (appended), retrying on
// EINTR and short reads; stops early only at end of file.
Status PreadFull(int fd, std::string_view label, uint64_t offset, uint64_t n, std::string* out) {
  const size_t start = out->size();
  out->resize(start + n);
  size_t got = 0;
  while (got < n) {
    ssize_t r = ::pread(fd, out->data() + start + got, n - got, static_cast<off_t>(offset + got));
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(fmt::format("{}: pread", label));
    }
    if (r == 0) break;
    got += static_cast<size_t>(r);
  }
  out->resize(start + got);
  return Status::Ok();
}

}  // namespace

Result<SafetensorsHeader> ParseSafetensorsHeader(std::string_view label, std::string_view prefix,
                                                 uint64_t file_size) {
  if (file_size < kPrefixBytes) {
    return Corrupt(label, fmt::format("file has {} bytes, fewer than the 8-byte header length "
                                      "prefix",
                                      file_size));
  }
  if (prefix.size() < kPrefixBytes) {
    return Corrupt(label, fmt::format("truncated header: only {} of the 8 header length bytes "
                                      "were read",
                                      prefix.size()));
  }
  const uint64_t n = LoadLe64(prefix);
  if (n > kMaxSafetensorsHeaderBytes) {
    return Corrupt(label, fmt::format("header length {} exceeds the limit of {} bytes", n,
                                      kMaxSafetensorsHeaderBytes));
  }
  const uint64_t data_start = kPrefixBytes + n;  // no overflow: n <= 1e8
  if (data_start > file_size) {
    return Corrupt(label, fmt::format("header length {} exceeds file size {}", n, file_size));
  }
  if (prefix.size() < data_start) {
    return Corrupt(label, fmt::format("truncated header: only {} of {} header bytes were read",
                                      prefix.size() - kPrefixBytes, n));
  }
  const std::string_view text = prefix.substr(kPrefixBytes, n);
  if (size_t bad = FindInvalidUtf8(text); bad != std::string_view::npos) {
    return Corrupt(label, fmt::format("header is not valid UTF-8 (byte {} of the header)", bad));
  }
  // JSON never allows a raw NUL, but nlohmann's lexer takes one outside a
  // string for the end of input and would ignore whatever follows it.
  if (size_t nul = text.find('\0'); nul != std::string_view::npos) {
    return Corrupt(label, fmt::format("header contains a NUL byte (byte {} of the header)", nul));
  }
  if (text.empty() || text.front() != '{') {
    return Corrupt(label, "header does not start with '{'");
  }

  WB_ASSIGN_OR_RETURN(json doc, ParseJson(label, text));
  if (!doc.is_object()) return Corrupt(label, "header is not a JSON object");

  SafetensorsHeader header;
  header.header_bytes = n;
  header.data_start = data_start;
  header.file_size = file_size;
  header.tensors.reserve(doc.size());
  for (const auto& [key, value] : doc.items()) {
    if (key == "__metadata__") {
      WB_RETURN_IF_ERROR(ParseMetadata(label, value, &header.metadata));
      continue;
    }
    WB_ASSIGN_OR_RETURN(TensorInfo t, ParseTensor(label, key, value));
    header.tensors.push_back(std::move(t));
  }

  // The reference sorts by (begin, end); the name breaks ties so the order of
  // several empty tensors at one offset is deterministic.
  std::sort(header.tensors.begin(), header.tensors.end(),
            [](const TensorInfo& a, const TensorInfo& b) {
              return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
            });
  uint64_t data_end = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo& t : header.tensors) {
    if (t.begin > data_end) {
      return Corrupt(label, fmt::format("tensor \"{}\": data_offsets [{}, {}] leave a hole: the "
                                        "data before it ends at {}",
                                        t.name, t.begin, t.end, data_end));
    }
    if (t.begin < data_end) {
      return Corrupt(label, fmt::format("tensor \"{}\": data_offsets [{}, {}] overlap tensor "
                                        "\"{}\", which ends at {}",
                                        t.name, t.begin, t.end, prev->name, data_end));
    }
    data_end = t.end;
    prev = &t;
  }

  const uint64_t data_bytes = file_size - data_start;
  if (data_end != data_bytes) {
    return Corrupt(
        label,
        fmt::format("tensor data ends at data offset {} but the file has {} bytes, {} of "
                    "them after the header ({})",
                    data_end, file_size, data_bytes,
                    data_end > data_bytes ? "file is truncated" : "trailing bytes after the data"));
  }
  return header;
}

Result<SafetensorsHeader> ReadSafetensorsFile(const std::filesystem::path& path) {
  const std::string label = path.string();
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer;
  // it changes nothing for the regular files that pass the check below.
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (!fd) return ErrnoStatus(fmt::format("{}: open", label));
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return ErrnoStatus(fmt::format("{}: fstat", label));
  if (!S_ISREG(st.st_mode)) {
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("{}: not a regular file{}", label,
                              S_ISDIR(st.st_mode) ? " (a directory)" : ""));
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);

  std::string buf;
  WB_RETURN_IF_ERROR(PreadFull(fd.get(), label, 0, std::min(file_size, kPrefixBytes), &buf));
  if (buf.size() == kPrefixBytes) {
    const uint64_t n = LoadLe64(buf);
    // Bad lengths are left for the parser to report; only read a sane header.
    if (n <= kMaxSafetensorsHeaderBytes && kPrefixBytes + n <= file_size) {
      WB_RETURN_IF_ERROR(PreadFull(fd.get(), label, kPrefixBytes, n, &buf));
    }
  }
  return ParseSafetensorsHeader(label, buf, file_size);
}

}  // namespace wbroker
