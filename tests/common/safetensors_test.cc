// wbroker tests: dtype names and the safetensors header parser, including a
// cross-check against the reference `safetensors` Python package when present.
#include "wbroker/common/safetensors.h"

#include <sys/stat.h>
#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "safetensors_writer.h"
#include "temp_dir.h"
#include "wbroker/common/dtype.h"

namespace wbroker {
namespace {

using ::testing::ElementsAre;
using testing::FixtureTensor;
using ::testing::HasSubstr;
using testing::RawSafetensors;
using testing::SerializeSafetensors;
using ::testing::StartsWith;
using testing::TempDir;

constexpr char kLabel[] = "/models/x.safetensors";

Result<SafetensorsHeader> Parse(const std::string& file) {
  return ParseSafetensorsHeader(kLabel, file, file.size());
}

// One tensor entry of a hand-written header.
std::string Entry(const std::string& dtype, const std::string& shape, uint64_t begin,
                  uint64_t end) {
  return "{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
         std::to_string(begin) + "," + std::to_string(end) + "]}";
}

// The 8-byte little-endian prefix for header length `n`.
std::string LengthPrefix(uint64_t n) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out;
}

std::string Hex(std::string_view bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : bytes) {
    out += kDigits[c >> 4];
    out += kDigits[c & 15];
  }
  return out;
}

bool PythonReferenceAvailable() {
  return std::system("python3 -c 'import safetensors, numpy' >/dev/null 2>&1") == 0;
}

std::string ScriptPath() {
  return std::string(WBROKER_SOURCE_DIR) + "/tests/common/make_reference_safetensors.py";
}

std::string Quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// ---------------------------------------------------------------------------
// dtype.h

TEST(DType, NamesMatchTheSafetensorsSpelling) {
  std::vector<std::string> names;
  for (DType d : kAllDTypes) names.emplace_back(DTypeName(d));
  EXPECT_THAT(names,
              ElementsAre("BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
                          "F64", "I64", "U64", "C64", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ",
                          "F8_E5M2FNUZ", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"));
}

TEST(DType, NameRoundTrips) {
  for (DType d : kAllDTypes) {
    auto parsed = DTypeFromName(DTypeName(d));
    ASSERT_TRUE(parsed.has_value()) << DTypeName(d);
    EXPECT_EQ(*parsed, d) << DTypeName(d);
  }
}

TEST(DType, UnknownNamesAreRefused) {
  for (const char* name :
       {"", "f32", "F32 ", "C128", "F8_E4M3FN", "F8_E8M0FNU", "I4", "FP4", "BFLOAT16", "float32"}) {
    EXPECT_FALSE(DTypeFromName(name).has_value()) << name;
  }
}

TEST(DType, Bits) {
  const std::map<std::string, uint32_t> expected = {
      {"BOOL", 8},    {"U8", 8},          {"I8", 8},          {"I16", 16},    {"U16", 16},
      {"F16", 16},    {"BF16", 16},       {"I32", 32},        {"U32", 32},    {"F32", 32},
      {"F64", 64},    {"I64", 64},        {"U64", 64},        {"C64", 64},    {"F8_E4M3", 8},
      {"F8_E5M2", 8}, {"F8_E4M3FNUZ", 8}, {"F8_E5M2FNUZ", 8}, {"F8_E8M0", 8}, {"F4", 4},
      {"F6_E2M3", 6}, {"F6_E3M2", 6},
  };
  ASSERT_EQ(expected.size(), std::size(kAllDTypes));
  for (DType d : kAllDTypes) EXPECT_EQ(DTypeBits(d), expected.at(std::string(DTypeName(d))));
}

// ---------------------------------------------------------------------------
// Valid headers

class EveryDTypeTest : public ::testing::TestWithParam<DType> {};

TEST_P(EveryDTypeTest, ParsesMatrixScalarAndEmptyTensors) {
  const DType d = GetParam();
  const bool byte_whole = DTypeBits(d) % 8 == 0;
  // 8 elements are byte-whole for every dtype: 4 bytes of F4, 6 of F6.
  std::vector<FixtureTensor> tensors = {{"matrix", d, {2, 4}, ""}, {"empty", d, {0, 3}, ""}};
  if (byte_whole) tensors.push_back({"scalar", d, {}, ""});
  tensors.push_back({"vector", d, {16}, ""});
  const std::string file = SerializeSafetensors(tensors, {{"format", "pt"}});

  auto h = Parse(file);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  ASSERT_EQ(h->tensors.size(), tensors.size());
  EXPECT_EQ(h->file_size, file.size());
  EXPECT_EQ(h->data_start, 8 + h->header_bytes);
  EXPECT_EQ(h->header_bytes % 8, 0u);  // the writer pads with spaces
  EXPECT_EQ(file.substr(8, h->header_bytes).front(), '{');
  EXPECT_EQ(h->metadata, (std::map<std::string, std::string>{{"format", "pt"}}));

  // Sorted by begin (ties by name): the serializer lays tensors out in order.
  uint64_t offset = 0;
  uint64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) total += testing::FixtureTensorBytes(tensors[i]);
  std::map<std::string, const TensorInfo*> by_name;
  for (const TensorInfo& t : h->tensors) {
    EXPECT_EQ(t.begin, offset) << t.name;
    offset = t.end;
    by_name[t.name] = &t;
  }
  EXPECT_EQ(offset, total);
  EXPECT_EQ(h->data_bytes(), total);
  for (const FixtureTensor& f : tensors) {
    ASSERT_TRUE(by_name.count(f.name)) << f.name;
    const TensorInfo& t = *by_name[f.name];
    EXPECT_EQ(t.dtype, d) << f.name;
    EXPECT_EQ(t.shape, f.shape) << f.name;
    EXPECT_EQ(t.nbytes(), testing::FixtureTensorBytes(f)) << f.name;
    EXPECT_EQ(file.substr(h->data_start + t.begin, t.nbytes()), testing::FixtureTensorData(f))
        << f.name;
  }
  EXPECT_EQ(by_name["empty"]->nbytes(), 0u);
  EXPECT_EQ(by_name["matrix"]->nbytes(), 8u * DTypeBits(d) / 8);
  if (byte_whole) {
    EXPECT_TRUE(by_name["scalar"]->shape.empty());
  }
}

INSTANTIATE_TEST_SUITE_P(AllDTypes, EveryDTypeTest, ::testing::ValuesIn(kAllDTypes),
                         [](const auto& info) { return std::string(DTypeName(info.param)); });

TEST(SafetensorsParse, EmptyHeaderWithNoTensors) {
  const std::string file = SerializeSafetensors({});
  ASSERT_EQ(file.size(), 16u);  // "{}" padded to 8 bytes
  auto h = Parse(file);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_TRUE(h->tensors.empty());
  EXPECT_TRUE(h->metadata.empty());
  EXPECT_EQ(h->header_bytes, 8u);
  EXPECT_EQ(h->data_start, 16u);
  EXPECT_EQ(h->data_bytes(), 0u);

  // Unpadded too: the padding is a writer convention, not a rule.
  auto bare = Parse(RawSafetensors("{}", ""));
  ASSERT_TRUE(bare.ok()) << bare.status().ToString();
  EXPECT_EQ(bare->data_start, 10u);
}

TEST(SafetensorsParse, Metadata) {
  const std::string file = SerializeSafetensors(
      {{"w", DType::kF32, {2}, ""}},
      {{"format", "pt"}, {"empty", ""}, {"unicode", "caf\xc3\xa9 \xe4\xb8\xad"}});
  auto h = Parse(file);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_EQ(h->metadata,
            (std::map<std::string, std::string>{
                {"format", "pt"}, {"empty", ""}, {"unicode", "caf\xc3\xa9 \xe4\xb8\xad"}}));
  ASSERT_EQ(h->tensors.size(), 1u);
  EXPECT_EQ(h->tensors[0].name, "w");
}

TEST(SafetensorsParse, NullMetadataMeansNone) {
  // The reference deserializes __metadata__ into an Option: null = absent.
  auto h =
      Parse(RawSafetensors("{\"__metadata__\":null,\"w\":" + Entry("U8", "[2]", 0, 2) + "}", "ab"));
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_TRUE(h->metadata.empty());
  ASSERT_EQ(h->tensors.size(), 1u);
}

TEST(SafetensorsParse, SortsByOffsetNotByKeyOrder) {
  const std::string header =
      "{\"c\":" + Entry("U8", "[1]", 6, 7) + ",\"a\":" + Entry("F16", "[3]", 0, 6) +
      ",\"b\":" + Entry("U8", "[0]", 6, 6) + ",\"z\":" + Entry("I32", "[0, 5]", 7, 7) + "}";
  auto h = Parse(RawSafetensors(header, "abcdefg"));
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  ASSERT_EQ(h->tensors.size(), 4u);
  EXPECT_EQ(h->tensors[0].name, "a");
  EXPECT_EQ(h->tensors[0].dtype, DType::kF16);
  EXPECT_EQ(h->tensors[0].shape, (std::vector<uint64_t>{3}));
  EXPECT_EQ(h->tensors[1].name, "b");  // empty, at 6, sorts before [6, 7]
  EXPECT_EQ(h->tensors[1].begin, 6u);
  EXPECT_EQ(h->tensors[1].end, 6u);
  EXPECT_EQ(h->tensors[2].name, "c");
  EXPECT_EQ(h->tensors[2].begin, 6u);
  EXPECT_EQ(h->tensors[2].end, 7u);
  EXPECT_EQ(h->tensors[3].name, "z");
  EXPECT_EQ(h->tensors[3].shape, (std::vector<uint64_t>{0, 5}));
  EXPECT_EQ(h->data_start, 8 + header.size());
}

TEST(SafetensorsParse, IgnoresUnknownTensorFieldsLikeTheReference) {
  const std::string header =
      "{\"w\":{\"dtype\":\"U8\",\"extra\":{\"deep\":[1,[2,{\"x\":null}]]},\"shape\":[2],"
      "\"data_offsets\":[0,2],\"note\":\"hi\"}}";
  auto h = Parse(RawSafetensors(header, "ab"));
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  ASSERT_EQ(h->tensors.size(), 1u);
  EXPECT_EQ(h->tensors[0].dtype, DType::kU8);
  EXPECT_EQ(h->tensors[0].end, 2u);
}

TEST(SafetensorsParse, AcceptsMultiByteUtf8AndEscapes) {
  const std::string header = "{\"caf\xc3\xa9\":" + Entry("U8", "[1]", 0, 1) +
                             ",\"\xe4\xb8\xad\xf0\x9f\x98\x80\":" + Entry("U8", "[1]", 1, 2) +
                             ",\"tab\\t\\u00e9\":" + Entry("U8", "[1]", 2, 3) + "}";
  auto h = Parse(RawSafetensors(header, "abc"));
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  ASSERT_EQ(h->tensors.size(), 3u);
  EXPECT_EQ(h->tensors[0].name, "caf\xc3\xa9");
  EXPECT_EQ(h->tensors[1].name, "\xe4\xb8\xad\xf0\x9f\x98\x80");
  EXPECT_EQ(h->tensors[2].name, "tab\t\xc3\xa9");
}

TEST(SafetensorsParse, AcceptsLargeOffsetsThatFit) {
  // 2^20 x 2^20 x U8 = 2^40 bytes: no overflow; the file size decides.
  const uint64_t big = uint64_t{1} << 40;
  const std::string header = "{\"w\":" + Entry("U8", "[1048576, 1048576]", 0, big) + "}";
  const std::string file = RawSafetensors(header, "");
  auto h = ParseSafetensorsHeader(kLabel, file, file.size() + big);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_EQ(h->tensors[0].nbytes(), big);
  EXPECT_EQ(h->data_bytes(), big);
}

TEST(SafetensorsParse, PrefixMayHoldMoreThanTheHeader) {
  const std::string file = SerializeSafetensors({{"w", DType::kF32, {4}, ""}});
  const uint64_t n = Parse(file)->header_bytes;
  // Exactly 8 + N bytes, as ReadSafetensorsFile() passes, and the whole file.
  auto exact = ParseSafetensorsHeader(kLabel, std::string_view(file).substr(0, 8 + n), file.size());
  ASSERT_TRUE(exact.ok()) << exact.status().ToString();
  EXPECT_EQ(exact->tensors.size(), 1u);
  EXPECT_TRUE(Parse(file).ok());
}

TEST(SafetensorsParse, HeaderAtTheLengthLimitIsNotRefusedForItsLength) {
  // N == 100,000,000 is allowed; this file is too short for it, which is a different rule.
  const std::string file = LengthPrefix(kMaxSafetensorsHeaderBytes) + "{}";
  auto h = Parse(file);
  ASSERT_FALSE(h.ok());
  EXPECT_THAT(h.status().message(), HasSubstr("exceeds file size"));
  EXPECT_THAT(h.status().message(), ::testing::Not(HasSubstr("limit")));
}

// ---------------------------------------------------------------------------
// Malformed headers: every rule, one row each.

struct BadCase {
  std::string name;               ///< test name suffix
  std::string file;               ///< whole file
  std::string rule;               ///< expected substring of the message (after the label)
  bool reference_refuses = true;  ///< false where wbroker is deliberately stricter
};

std::string WithHeader(const std::string& json, const std::string& data = "") {
  return RawSafetensors(json, data);
}

std::string OneTensor(const std::string& entry, const std::string& data = "") {
  return RawSafetensors("{\"w\":" + entry + "}", data);
}

std::vector<BadCase> BadCases() {
  const std::string w4 = Entry("U8", "[4]", 0, 4);
  const std::string nested_too_deep =
      "{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"x\":" +
      std::string(126, '[') + std::string(126, ']') + "}}";
  return {
      {"FileShorterThanPrefix", std::string("\x02\x00\x00", 3), "fewer than the 8-byte"},
      {"EmptyFile", "", "file has 0 bytes"},
      {"HeaderLengthOverLimit", LengthPrefix(kMaxSafetensorsHeaderBytes + 1) + "{}",
       "header length 100000001 exceeds the limit of 100000000"},
      {"HeaderLengthHuge", LengthPrefix(~uint64_t{0}) + "{}", "exceeds the limit"},
      {"HeaderLengthBeyondFile", LengthPrefix(100) + std::string("{}      ", 8),
       "header length 100 exceeds file size 16"},
      {"InvalidUtf8Overlong2", WithHeader("{\"\xc0\xaf\":{}}"), "not valid UTF-8 (byte 2"},
      {"InvalidUtf8Overlong3", WithHeader("{\"\xe0\x80\xaf\":{}}"), "not valid UTF-8"},
      {"InvalidUtf8Overlong4", WithHeader("{\"\xf0\x80\x80\xaf\":{}}"), "not valid UTF-8"},
      {"InvalidUtf8Surrogate", WithHeader("{\"\xed\xa0\x80\":{}}"), "not valid UTF-8"},
      {"InvalidUtf8AboveMax", WithHeader("{\"\xf4\x90\x80\x80\":{}}"), "not valid UTF-8"},
      {"InvalidUtf8F5", WithHeader("{\"\xf5\x80\x80\x80\":{}}"), "not valid UTF-8"},
      {"InvalidUtf8LoneContinuation", WithHeader("{\"\x80\":{}}"), "not valid UTF-8"},
      {"InvalidUtf8BadContinuation", WithHeader("{\"\xc3\x28\":{}}"), "not valid UTF-8"},
      {"InvalidUtf8TruncatedAtEnd", WithHeader("{}\xe4\xb8"), "not valid UTF-8 (byte 2"},
      {"InvalidUtf8InMetadata", WithHeader("{\"__metadata__\":{\"k\":\"\xff\"}}"),
       "not valid UTF-8"},
      {"EmptyHeader", WithHeader(""), "header does not start with '{'"},
      {"LeadingSpace", WithHeader(" {}"), "header does not start with '{'", false},
      {"JsonArray", WithHeader("[]"), "header does not start with '{'"},
      {"JsonString", WithHeader("\"{}\""), "header does not start with '{'"},
      {"InvalidJsonUnterminated", WithHeader("{\"w\":"), "header is not valid JSON"},
      {"InvalidJsonTrailingGarbage", WithHeader("{}x"), "header is not valid JSON"},
      {"TrailingNul", WithHeader(std::string("{}\0", 3)),
       "header contains a NUL byte (byte 2 of the header)"},
      {"NulHidesGarbage", WithHeader(std::string("{}\0{\"w\":", 8)), "contains a NUL byte"},
      {"NulInString", WithHeader(std::string("{\"a\0\":{}}", 9)), "contains a NUL byte"},
      {"InvalidJsonComment", WithHeader("{/* c */}"), "header is not valid JSON"},
      {"InvalidJsonLoneSurrogateEscape", WithHeader("{\"\\ud800\":{}}"),
       "header is not valid JSON"},
      {"InvalidJsonTrailingComma", WithHeader("{\"__metadata__\":{},}"),
       "header is not valid JSON"},
      {"MetadataArray", WithHeader("{\"__metadata__\":[]}"), "__metadata__ is not an object"},
      {"MetadataString", WithHeader("{\"__metadata__\":\"pt\"}"), "__metadata__ is not an object"},
      {"MetadataIntValue", WithHeader("{\"__metadata__\":{\"k\":1}}"),
       "__metadata__ value of \"k\" is not a string (1)"},
      {"MetadataNullValue", WithHeader("{\"__metadata__\":{\"k\":null}}"),
       "__metadata__ value of \"k\" is not a string (null)"},
      {"MetadataObjectValue", WithHeader("{\"__metadata__\":{\"k\":{}}}"),
       "__metadata__ value of \"k\" is not a string (object)"},
      {"EntryArray", WithHeader("{\"w\":[1]}"), "tensor \"w\": entry is not a JSON object"},
      {"EntryNull", WithHeader("{\"w\":null}"), "tensor \"w\": entry is not a JSON object"},
      {"EntryString", WithHeader("{\"w\":\"U8\"}"), "tensor \"w\": entry is not a JSON object"},
      {"UnknownDType", OneTensor(Entry("F128", "[1]", 0, 16), std::string(16, 'x')),
       "tensor \"w\": unknown dtype \"F128\""},
      {"LowercaseDType", OneTensor(Entry("f32", "[1]", 0, 4), "xxxx"), "unknown dtype \"f32\""},
      {"DTypeNotString", OneTensor("{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,1]}", "x"),
       "tensor \"w\": \"dtype\" is not a string"},
      {"MissingDType", OneTensor("{\"shape\":[1],\"data_offsets\":[0,1]}", "x"),
       "tensor \"w\": missing field \"dtype\""},
      {"MissingShape", OneTensor("{\"dtype\":\"U8\",\"data_offsets\":[0,1]}", "x"),
       "tensor \"w\": missing field \"shape\""},
      {"MissingDataOffsets", OneTensor("{\"dtype\":\"U8\",\"shape\":[1]}", "x"),
       "tensor \"w\": missing field \"data_offsets\""},
      {"ShapeNotArray", OneTensor(Entry("U8", "1", 0, 1), "x"),
       "tensor \"w\": \"shape\" is not an array"},
      {"ShapeNegative", OneTensor(Entry("U8", "[-1]", 0, 0)),
       "tensor \"w\": \"shape\" element 0 (-1) is not a non-negative integer"},
      {"ShapeNegativeZero", OneTensor(Entry("U8", "[1,-0]", 0, 0)),
       "\"shape\" element 1 (0) is not a non-negative integer"},
      {"ShapeFloat", OneTensor(Entry("U8", "[2.0]", 0, 2), "xx"),
       "\"shape\" element 0 (2.0) is not a non-negative integer"},
      {"ShapeExponent", OneTensor(Entry("U8", "[2e0]", 0, 2), "xx"),
       "\"shape\" element 0 (2.0) is not a non-negative integer"},
      {"ShapeBeyond64Bits", OneTensor(Entry("U8", "[18446744073709551616]", 0, 0)),
       "\"shape\" element 0 (1.8446744073709552e+19) is not a non-negative integer"},
      {"ShapeString", OneTensor(Entry("U8", "[\"2\"]", 0, 2), "xx"),
       "\"shape\" element 0 (string) is not a non-negative integer"},
      {"DataOffsetsOneElement", OneTensor("{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0]}"),
       "tensor \"w\": \"data_offsets\" has 1 elements, expected 2"},
      {"DataOffsetsThreeElements",
       OneTensor("{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1,1]}", "x"),
       "\"data_offsets\" has 3 elements, expected 2"},
      {"DataOffsetsEmpty", OneTensor("{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[]}"),
       "\"data_offsets\" has 0 elements, expected 2"},
      {"DataOffsetsNotArray",
       OneTensor("{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":{\"0\":0}}"),
       "\"data_offsets\" is not an array"},
      {"DataOffsetsNegative",
       OneTensor("{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[-1,-1]}"),
       "\"data_offsets\" element 0 (-1) is not a non-negative integer"},
      {"DataOffsetsReversed", OneTensor(Entry("U8", "[4]", 4, 0), "xxxx"),
       "tensor \"w\": data_offsets [4, 0] are reversed (begin > end)"},
      {"ShapeOverflow", OneTensor(Entry("U8", "[1099511627776, 1099511627776]", 0, 0)),
       "tensor \"w\": size of shape [1099511627776, 1099511627776] x U8 overflows 64 bits"},
      {"ShapeTimesBitsOverflow", OneTensor(Entry("F64", "[2305843009213693952]", 0, 0)),
       "size of shape [2305843009213693952] x F64 overflows 64 bits"},
      {"BytesMismatch", OneTensor(Entry("F32", "[2,2]", 0, 12), std::string(12, 'x')),
       "tensor \"w\": data_offsets [0, 12] do not match shape [2, 2] x F32 = 16 bytes"},
      {"BytesMismatchScalar", OneTensor(Entry("F64", "[]", 0, 4), "xxxx"),
       "data_offsets [0, 4] do not match shape [] x F64 = 8 bytes"},
      {"BytesMismatchEmpty", OneTensor(Entry("F32", "[0,3]", 0, 4), "xxxx"),
       "data_offsets [0, 4] do not match shape [0, 3] x F32 = 0 bytes"},
      {"F4OddCount", OneTensor(Entry("F4", "[3]", 0, 2), "xx"),
       "tensor \"w\": shape [3] x F4 = 12 bits is not a whole number of bytes"},
      {"F4Scalar", OneTensor(Entry("F4", "[]", 0, 1), "x"),
       "shape [] x F4 = 4 bits is not a whole number of bytes"},
      {"F6NotByteWhole", OneTensor(Entry("F6_E3M2", "[2,3]", 0, 5), "xxxxx"),
       "shape [2, 3] x F6_E3M2 = 36 bits is not a whole number of bytes"},
      {"HoleBetweenTensors",
       WithHeader("{\"a\":" + w4 + ",\"b\":" + Entry("U8", "[4]", 8, 12) + "}",
                  std::string(12, 'x')),
       "tensor \"b\": data_offsets [8, 12] leave a hole: the data before it ends at 4"},
      {"HoleOfOneByte",
       WithHeader("{\"a\":" + w4 + ",\"b\":" + Entry("U8", "[4]", 5, 9) + "}", std::string(9, 'x')),
       "tensor \"b\": data_offsets [5, 9] leave a hole: the data before it ends at 4"},
      {"FirstTensorNotAtZero", OneTensor(Entry("U8", "[4]", 4, 8), std::string(8, 'x')),
       "tensor \"w\": data_offsets [4, 8] leave a hole: the data before it ends at 0"},
      {"OverlappingTensors",
       WithHeader(
           "{\"a\":" + Entry("U8", "[8]", 0, 8) + ",\"b\":" + Entry("U8", "[8]", 4, 12) + "}",
           std::string(12, 'x')),
       "tensor \"b\": data_offsets [4, 12] overlap tensor \"a\", which ends at 8"},
      {"SameOffsets", WithHeader("{\"a\":" + w4 + ",\"b\":" + w4 + "}", std::string(4, 'x')),
       "data_offsets [0, 4] overlap tensor \"a\", which ends at 4"},
      {"EmptyTensorInsideAnother",
       WithHeader("{\"a\":" + Entry("U8", "[8]", 0, 8) + ",\"z\":" + Entry("U8", "[0]", 4, 4) + "}",
                  std::string(8, 'x')),
       "tensor \"z\": data_offsets [4, 4] overlap tensor \"a\", which ends at 8"},
      {"DataShorterThanDeclared", OneTensor(w4, "xx"),
       "tensor data ends at data offset 4 but the file has 63 bytes, 2 of them after the "
       "header (file is truncated)"},
      {"TrailingBytesAfterData", OneTensor(w4, "xxxxx"),
       "tensor data ends at data offset 4 but the file has 66 bytes, 5 of them after the "
       "header (trailing bytes after the data)"},
      {"TrailingBytesNoTensors", WithHeader("{}", "x"),
       "tensor data ends at data offset 0 but the file has 11 bytes"},
      {"DuplicateTensorKey", WithHeader("{\"w\":" + w4 + ",\"w\":" + w4 + "}", "xxxx"),
       "header: duplicate key \"w\"", false},
      {"DuplicateMetadataKey", WithHeader("{\"__metadata__\":{},\"__metadata__\":{}}"),
       "header: duplicate key \"__metadata__\""},
      {"DuplicateKeyInMetadata", WithHeader("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}"),
       "__metadata__: duplicate key \"k\"", false},
      {"DuplicateFieldInTensor",
       OneTensor("{\"dtype\":\"U8\",\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}", "x"),
       "tensor \"w\": duplicate key \"dtype\""},
      {"DuplicateUnknownFieldInTensor",
       OneTensor("{\"x\":1,\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"x\":2}", "x"),
       "tensor \"w\": duplicate key \"x\"", false},
      {"NestingTooDeep", WithHeader(nested_too_deep, "x"),
       "tensor \"w\": JSON nests deeper than 127 levels"},
  };
}

// Names the case in gtest output instead of dumping the struct's bytes.
void PrintTo(const BadCase& c, std::ostream* os) {
  *os << c.name;
}

class BadHeaderTest : public ::testing::TestWithParam<BadCase> {};

TEST_P(BadHeaderTest, IsRefusedWithTheRuleNamed) {
  const BadCase& c = GetParam();
  auto h = Parse(c.file);
  ASSERT_FALSE(h.ok()) << "accepted " << c.name;
  EXPECT_EQ(h.status().code(), ErrorCode::kCorruptData) << h.status().ToString();
  EXPECT_THAT(h.status().message(), StartsWith(std::string(kLabel) + ": "));
  EXPECT_THAT(h.status().message(), HasSubstr(c.rule));
}

INSTANTIATE_TEST_SUITE_P(Rules, BadHeaderTest, ::testing::ValuesIn(BadCases()),
                         [](const auto& info) { return info.param.name; });

TEST(SafetensorsParse, NestingAtTheReferenceLimitIsAccepted) {
  // Two objects + 125 arrays = 127 levels, the most serde_json allows.
  const std::string header =
      "{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"x\":" +
      std::string(125, '[') + std::string(125, ']') + "}}";
  auto h = Parse(RawSafetensors(header, "x"));
  ASSERT_TRUE(h.ok()) << h.status().ToString();
}

TEST(SafetensorsParse, TruncatedPrefixIsRefused) {
  const std::string file = SerializeSafetensors({{"w", DType::kF32, {4}, ""}});
  const uint64_t n = Parse(file)->header_bytes;
  for (size_t len : {size_t{0}, size_t{5}, size_t{8}, size_t{8 + n - 1}}) {
    auto h = ParseSafetensorsHeader(kLabel, std::string_view(file).substr(0, len), file.size());
    ASSERT_FALSE(h.ok()) << len;
    EXPECT_EQ(h.status().code(), ErrorCode::kCorruptData);
    EXPECT_THAT(h.status().message(), StartsWith(std::string(kLabel) + ": truncated header"));
  }
}

TEST(SafetensorsParse, NeverReadsPastThePrefix) {
  // Every cut of a valid file, parsed from an exact-size heap copy (so ASan
  // would flag an overrun), with both its own size and the full size.
  const std::string file = SerializeSafetensors(
      {{"a", DType::kBF16, {3}, ""}, {"b", DType::kF4, {2}, ""}}, {{"k", "v"}});
  const uint64_t n = Parse(file)->header_bytes;
  for (size_t len = 0; len <= file.size(); ++len) {
    std::unique_ptr<char[]> copy(new char[len == 0 ? 1 : len]);
    std::memcpy(copy.get(), file.data(), len);
    std::string_view prefix(copy.get(), len);
    auto own = ParseSafetensorsHeader(kLabel, prefix, len);
    EXPECT_EQ(own.ok(), len == file.size()) << len;
    auto full = ParseSafetensorsHeader(kLabel, prefix, file.size());
    EXPECT_EQ(full.ok(), len >= 8 + n) << len;
  }
}

// ---------------------------------------------------------------------------
// ReadSafetensorsFile

TEST(ReadSafetensorsFile, ReadsARealFile) {
  TempDir dir;
  // A header well over one pread page, so the reads have to add up.
  std::vector<FixtureTensor> tensors;
  for (int i = 0; i < 2000; ++i) {
    tensors.push_back({"layer." + std::to_string(i) + ".weight", DType::kBF16, {3, 2}, ""});
  }
  const std::string file = SerializeSafetensors(tensors, {{"format", "pt"}});
  const auto path = dir / "model.safetensors";
  testing::WriteFile(path, file);

  auto from_disk = ReadSafetensorsFile(path);
  ASSERT_TRUE(from_disk.ok()) << from_disk.status().ToString();
  auto in_memory = Parse(file);
  ASSERT_TRUE(in_memory.ok());
  EXPECT_GT(from_disk->header_bytes, 100'000u);
  EXPECT_EQ(from_disk->header_bytes, in_memory->header_bytes);
  EXPECT_EQ(from_disk->data_start, in_memory->data_start);
  EXPECT_EQ(from_disk->file_size, file.size());
  EXPECT_EQ(from_disk->metadata, in_memory->metadata);
  ASSERT_EQ(from_disk->tensors.size(), 2000u);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorInfo& a = from_disk->tensors[i];
    const TensorInfo& b = in_memory->tensors[i];
    EXPECT_EQ(a.name, b.name);
    EXPECT_EQ(a.dtype, DType::kBF16);
    EXPECT_EQ(a.shape, b.shape);
    EXPECT_EQ(a.begin, b.begin);
    EXPECT_EQ(a.end, b.end);
  }
}

TEST(ReadSafetensorsFile, MissingFile) {
  TempDir dir;
  const auto path = dir / "absent.safetensors";
  auto h = ReadSafetensorsFile(path);
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), ErrorCode::kNotFound);
  EXPECT_THAT(h.status().message(), StartsWith(path.string() + ": "));
}

TEST(ReadSafetensorsFile, Directory) {
  TempDir dir;
  auto h = ReadSafetensorsFile(dir.path());
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(h.status().message(), StartsWith(dir.path().string() + ": "));
  EXPECT_THAT(h.status().message(), HasSubstr("not a regular file"));
}

TEST(ReadSafetensorsFile, FifoIsRefusedWithoutBlocking) {
  TempDir dir;
  const auto path = dir / "pipe.safetensors";
  ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
  auto h = ReadSafetensorsFile(path);
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(h.status().message(), HasSubstr("not a regular file"));
}

TEST(ReadSafetensorsFile, Unreadable) {
  if (::geteuid() == 0) GTEST_SKIP() << "root reads files regardless of their mode";
  TempDir dir;
  const auto path = dir / "secret.safetensors";
  testing::WriteFile(path, SerializeSafetensors({}));
  ASSERT_EQ(::chmod(path.c_str(), 0), 0);
  auto h = ReadSafetensorsFile(path);
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), ErrorCode::kPermissionDenied);
  EXPECT_THAT(h.status().message(), StartsWith(path.string() + ": "));
}

TEST(ReadSafetensorsFile, CorruptFilesNameThePath) {
  TempDir dir;
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"", "file has 0 bytes"},
      {"abc", "file has 3 bytes"},
      {LengthPrefix(kMaxSafetensorsHeaderBytes + 1) + "{}", "exceeds the limit"},
      {LengthPrefix(64) + "{}", "header length 64 exceeds file size 10"},
      {RawSafetensors("{\"w\":" + Entry("U8", "[4]", 0, 4) + "}", "xx"), "file is truncated"},
      {RawSafetensors("{}", "xx"), "trailing bytes after the data"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto path = dir / ("bad" + std::to_string(i) + ".safetensors");
    testing::WriteFile(path, cases[i].first);
    auto h = ReadSafetensorsFile(path);
    ASSERT_FALSE(h.ok()) << i;
    EXPECT_EQ(h.status().code(), ErrorCode::kCorruptData) << i;
    EXPECT_THAT(h.status().message(), StartsWith(path.string() + ": ")) << i;
    EXPECT_THAT(h.status().message(), HasSubstr(cases[i].second)) << i;
  }
}

// ---------------------------------------------------------------------------
// Cross-check with the reference implementation (the `safetensors` package).

TEST(SafetensorsReference, AcceptsWhatTheReferenceWrites) {
  if (!PythonReferenceAvailable()) {
    GTEST_SKIP() << "python3 with safetensors and numpy is not importable; "
                    "install them with `python3 -m pip install safetensors numpy`";
  }
  TempDir dir;
  const std::string cmd = "python3 " + Quote(ScriptPath()) + " write " + Quote(dir.path().string());
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  const auto reference = nlohmann::json::parse(testing::ReadFile(dir / "reference.json"));

  std::set<std::string> dtypes_seen;
  ASSERT_GE(reference["files"].size(), std::size(kAllDTypes));
  for (const auto& f : reference["files"]) {
    const std::string file_name = f["file"];
    SCOPED_TRACE(file_name);
    const std::string bytes = testing::ReadFile(dir / file_name);
    auto h = ReadSafetensorsFile(dir / file_name);
    ASSERT_TRUE(h.ok()) << h.status().ToString();

    std::map<std::string, std::string> metadata;
    if (!f["metadata"].is_null())
      metadata = f["metadata"].get<std::map<std::string, std::string>>();
    EXPECT_EQ(h->metadata, metadata);

    std::map<std::string, const TensorInfo*> by_name;
    for (const TensorInfo& t : h->tensors) by_name[t.name] = &t;
    ASSERT_EQ(by_name.size(), f["tensors"].size());
    for (const auto& rt : f["tensors"]) {
      const std::string name = rt["name"];
      ASSERT_TRUE(by_name.count(name)) << name;
      const TensorInfo& t = *by_name[name];
      EXPECT_EQ(DTypeName(t.dtype), rt["dtype"].get<std::string>()) << name;
      EXPECT_EQ(t.shape, rt["shape"].get<std::vector<uint64_t>>()) << name;
      EXPECT_EQ(Hex(std::string_view(bytes).substr(h->data_start + t.begin, t.nbytes())),
                rt["data_hex"].get<std::string>())
          << name;
      dtypes_seen.insert(rt["dtype"].get<std::string>());
    }
  }
  for (DType d : kAllDTypes)
    EXPECT_TRUE(dtypes_seen.count(std::string(DTypeName(d)))) << DTypeName(d);
}

TEST(SafetensorsReference, RefusesWhatTheReferenceRefuses) {
  if (!PythonReferenceAvailable()) {
    GTEST_SKIP() << "python3 with safetensors and numpy is not importable; "
                    "install them with `python3 -m pip install safetensors numpy`";
  }
  TempDir dir;
  std::string cmd = "python3 " + Quote(ScriptPath()) + " check";
  std::map<std::string, BadCase> by_path;
  for (const BadCase& c : BadCases()) {
    const auto path = (dir / (c.name + ".safetensors")).string();
    testing::WriteFile(path, c.file);
    by_path[path] = c;
    cmd += " " + Quote(path);
  }
  const auto out = dir / "verdicts.json";
  cmd += " > " + Quote(out.string());
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  const auto verdicts = nlohmann::json::parse(testing::ReadFile(out));
  ASSERT_EQ(verdicts.size(), by_path.size());
  for (const auto& [path, c] : by_path) {
    const std::string verdict = verdicts.at(path);
    if (c.reference_refuses) {
      EXPECT_NE(verdict, "ok") << c.name << ": the reference accepts it";
    } else {
      // Documents where wbroker is stricter than the reference.
      EXPECT_EQ(verdict, "ok") << c.name << ": the reference now refuses it too";
    }
  }
}

}  // namespace
}  // namespace wbroker
