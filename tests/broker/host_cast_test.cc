// wbroker tests: dtype conversion on the host (broker/host_cast.h) against an
// independent bit-exact reference and against torch, and end to end through
// wbrokerd --dtype with the host backend.
#include "host_cast.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <random>

#include "broker_process.h"
#include "hub_fixture.h"
#include "model_loader.h"
#include "safetensors_writer.h"
#include "temp_dir.h"
#include "wbroker/client/client.h"

namespace wbroker::testing {
namespace {

using broker::CastElements;

// --- the reference: written independently of the kernels -----------------

bool IsNaN32(uint32_t x) {
  return (x & 0x7FFFFFFFu) > 0x7F800000u;
}
bool IsNaN16(uint16_t h) {
  return (h & 0x7FFFu) > 0x7C00u;
}
bool IsNaNBF16(uint16_t h) {
  return (h & 0x7FFFu) > 0x7F80u;
}

/// Value of a non-NaN BF16 pattern, with the pattern above the largest finite
/// one (infinity) standing for 2^128, the next step of the grid.
double BF16GridValue(uint32_t magnitude) {
  if (magnitude >= 0x7F80u) return std::ldexp(1.0, 128);
  return static_cast<double>(std::bit_cast<float>(magnitude << 16));
}

/// F32 -> BF16 by picking the nearer neighbour in double (ties to even).
uint16_t RefF32ToBF16(uint32_t x) {
  if (IsNaN32(x)) return 0x7FC0;
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return sign | 0x7F80;
  const double v = static_cast<double>(std::bit_cast<float>(a));
  const uint32_t lo = a >> 16;
  const double d_lo = v - BF16GridValue(lo);
  const double d_hi = BF16GridValue(lo + 1) - v;
  const bool up = d_hi < d_lo || (d_hi == d_lo && (lo & 1u) != 0);
  return static_cast<uint16_t>(sign | (up ? lo + 1 : lo));
}

/// F32 -> F16 by GCC's _Float16 (soft-float, IEEE round-to-nearest-even);
/// NaNs by the documented F16C rule.
uint16_t RefF32ToF16(uint32_t x) {
  if (IsNaN32(x))
    return static_cast<uint16_t>(((x >> 16) & 0x8000u) | 0x7E00u | ((x >> 13) & 0x3FFu));
  return std::bit_cast<uint16_t>(static_cast<_Float16>(std::bit_cast<float>(x)));
}

uint32_t RefF16ToF32(uint16_t h) {
  if (IsNaN16(h))
    return ((h & 0x8000u) << 16) | 0x7FC00000u | (static_cast<uint32_t>(h & 0x3FFu) << 13);
  return std::bit_cast<uint32_t>(static_cast<float>(std::bit_cast<_Float16>(h)));
}

uint32_t RefBF16ToF32(uint16_t h) {
  return static_cast<uint32_t>(h) << 16;
}

/// The reference conversion of a whole buffer (`bytes` of dtype `from`).
std::string RefCast(const std::string& bytes, DType from, DType to) {
  if (from == to) return bytes;
  const size_t in_size = DTypeBits(from) / 8, out_size = DTypeBits(to) / 8;
  const size_t n = bytes.size() / in_size;
  std::string out(n * out_size, '\0');
  for (size_t i = 0; i < n; ++i) {
    uint32_t f = 0;  // F32 bits of element i
    if (from == DType::kF32) {
      std::memcpy(&f, bytes.data() + 4 * i, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, bytes.data() + 2 * i, 2);
      f = from == DType::kBF16 ? RefBF16ToF32(h) : RefF16ToF32(h);
    }
    if (to == DType::kF32) {
      std::memcpy(out.data() + 4 * i, &f, 4);
    } else {
      uint16_t h = to == DType::kBF16 ? RefF32ToBF16(f) : RefF32ToF16(f);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

// --- inputs ----------------------------------------------------------------

std::vector<uint16_t> AllU16() {
  std::vector<uint16_t> v(65536);
  for (uint32_t i = 0; i < 65536; ++i) v[i] = static_cast<uint16_t>(i);
  return v;
}

/// F32 patterns: every sign and exponent with random mantissas, the exact
/// rounding midpoints (and their neighbours) for every bit position that F16
/// (normal and subnormal) or BF16 can round at, specials, and random bits.
std::vector<uint32_t> F32Patterns() {
  std::mt19937 rng(20240611);
  std::vector<uint32_t> v = {0x00000000u, 0x80000000u, 0x7F800000u, 0xFF800000u, 0x7FC00000u,
                             0xFFC00000u, 0x7F800001u, 0xFF800001u, 0x7FA00000u, 0x7FFFFFFFu,
                             0xFFFFFFFFu, 0x7FC12345u, 0x7F7FFFFFu, 0xFF7FFFFFu, 0x00000001u,
                             0x807FFFFFu, 0x477FE000u, 0x477FEFFFu, 0x477FF000u, 0x477FF001u,
                             0x47800000u, 0x33000000u, 0x33000001u, 0x32FFFFFFu, 0x387FE000u,
                             0x387FF000u, 0x38800000u, 0x7F7F8000u, 0x7F7F7FFFu};
  for (uint32_t sign : {0u, 0x80000000u}) {
    for (uint32_t exp = 0; exp < 256; ++exp) {
      const uint32_t base = sign | (exp << 23);
      for (uint32_t m : {0u, 1u, 0x7FFFFFu, 0x400000u}) v.push_back(base | m);
      for (int i = 0; i < 64; ++i) v.push_back(base | (rng() & 0x7FFFFFu));
      for (int k = 1; k <= 23; ++k) {
        const uint32_t half = 1u << (k - 1);
        const uint32_t high = rng() & 0x7FFFFFu & ~((1u << k) - 1);
        for (uint32_t parity : {0u, 1u}) {
          const uint32_t kept = k < 23 ? (high & ~(1u << k)) | (parity << k) : high;
          for (uint32_t low : {half - 1, half, half + 1}) v.push_back(base | kept | low);
        }
      }
    }
  }
  for (int i = 0; i < 200000; ++i) v.push_back(static_cast<uint32_t>(rng()));
  return v;
}

template <typename To, typename From>
std::vector<To> Convert(DType from, const std::vector<From>& in, DType to) {
  std::vector<To> out(in.size());
  Status s = CastElements(from, in.data(), to, out.data(), in.size());
  EXPECT_TRUE(s.ok()) << s.ToString();
  return out;
}

template <typename T>
std::string Bytes(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

template <typename T>
std::vector<T> FromBytes(const std::string& s) {
  std::vector<T> v(s.size() / sizeof(T));
  std::memcpy(v.data(), s.data(), v.size() * sizeof(T));
  return v;
}

/// Exact equality of two conversions of `in`, reporting the first few mismatches.
template <typename In, typename Out>
void ExpectSame(const std::vector<In>& in, const std::vector<Out>& got,
                const std::vector<Out>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < got.size() && bad < 10; ++i) {
    if (got[i] != want[i]) {
      ++bad;
      ADD_FAILURE() << what << ": input 0x" << std::hex << +in[i] << " gave 0x" << +got[i]
                    << ", expected 0x" << +want[i];
    }
  }
}

// --- kernels against the reference ---------------------------------------

TEST(HostCastKernels, AllSixDirectionsMatchTheReference) {
  const auto u16 = AllU16();
  const auto f32 = F32Patterns();
  auto ref = [](DType from, const auto& in, DType to, auto tag) {
    return FromBytes<decltype(tag)>(RefCast(Bytes(in), from, to));
  };
  ExpectSame(f32, Convert<uint16_t>(DType::kF32, f32, DType::kBF16),
             ref(DType::kF32, f32, DType::kBF16, uint16_t{}), "F32->BF16");
  ExpectSame(f32, Convert<uint16_t>(DType::kF32, f32, DType::kF16),
             ref(DType::kF32, f32, DType::kF16, uint16_t{}), "F32->F16");
  ExpectSame(u16, Convert<uint32_t>(DType::kBF16, u16, DType::kF32),
             ref(DType::kBF16, u16, DType::kF32, uint32_t{}), "BF16->F32");
  ExpectSame(u16, Convert<uint32_t>(DType::kF16, u16, DType::kF32),
             ref(DType::kF16, u16, DType::kF32, uint32_t{}), "F16->F32");
  ExpectSame(u16, Convert<uint16_t>(DType::kBF16, u16, DType::kF16),
             ref(DType::kBF16, u16, DType::kF16, uint16_t{}), "BF16->F16");
  ExpectSame(u16, Convert<uint16_t>(DType::kF16, u16, DType::kBF16),
             ref(DType::kF16, u16, DType::kBF16, uint16_t{}), "F16->BF16");
}

TEST(HostCastKernels, RoundTripsThroughF32AreIdentityForNonNaN) {
  const auto u16 = AllU16();
  const auto bf = Convert<uint16_t>(DType::kF32, Convert<uint32_t>(DType::kBF16, u16, DType::kF32),
                                    DType::kBF16);
  const auto h =
      Convert<uint16_t>(DType::kF32, Convert<uint32_t>(DType::kF16, u16, DType::kF32), DType::kF16);
  for (uint32_t i = 0; i < 65536; ++i) {
    const auto x = static_cast<uint16_t>(i);
    if (!IsNaNBF16(x)) {
      EXPECT_EQ(bf[i], x) << "BF16 0x" << std::hex << i;
    }
    if (!IsNaN16(x)) {
      EXPECT_EQ(h[i], x) << "F16 0x" << std::hex << i;
    }
  }
}

TEST(HostCastKernels, NaNsFollowTheDocumentedBitPatterns) {
  const std::vector<uint32_t> nans = {0x7FC00000u, 0xFFC00000u, 0x7F800001u,
                                      0x7FA00000u, 0x7FFFFFFFu, 0xFFFFFFFFu};
  const auto bf = Convert<uint16_t>(DType::kF32, nans, DType::kBF16);
  const auto h = Convert<uint16_t>(DType::kF32, nans, DType::kF16);
  for (size_t i = 0; i < nans.size(); ++i) EXPECT_EQ(bf[i], 0x7FC0) << i;
  EXPECT_THAT(h, ::testing::ElementsAre(0x7E00, 0xFE00, 0x7E00, 0x7F00, 0x7FFF, 0xFFFF));
  const auto f = Convert<uint32_t>(DType::kF16, std::vector<uint16_t>{0x7C01, 0xFE00},
                                   DType::kF32);  // signalling NaN comes back quiet
  EXPECT_THAT(f, ::testing::ElementsAre(0x7FC02000u, 0xFFC00000u));
}

TEST(HostCastKernels, EveryLengthAndTheSameDTypeCopy) {
  // Vectorized loops have scalar tails: every short length must be right.
  const auto f32 = F32Patterns();
  for (size_t n = 0; n < 70; ++n) {
    std::vector<uint32_t> in(f32.begin() + 1000, f32.begin() + 1000 + n);
    std::vector<uint16_t> out(n + 1, 0xABCD);
    ASSERT_TRUE(CastElements(DType::kF32, in.data(), DType::kF16, out.data(), n).ok());
    for (size_t i = 0; i < n; ++i) EXPECT_EQ(out[i], RefF32ToF16(in[i])) << n << "/" << i;
    EXPECT_EQ(out[n], 0xABCD) << "wrote past the end for n=" << n;
  }
  std::vector<uint32_t> copy(f32.size());
  ASSERT_TRUE(CastElements(DType::kF32, f32.data(), DType::kF32, copy.data(), f32.size()).ok());
  EXPECT_EQ(copy, f32);
}

TEST(HostCastKernels, RefusesNonFloatDTypes) {
  int64_t in = 0, out = 0;
  Status s = CastElements(DType::kI64, &in, DType::kF32, &out, 1);
  EXPECT_EQ(s.code(), ErrorCode::kUnsupported);
  EXPECT_THAT(s.message(), ::testing::HasSubstr("I64"));
  EXPECT_FALSE(broker::IsHostCastable(DType::kF8_E4M3));
}

// --- kernels against torch -------------------------------------------------

/// Converts the inputs with torch (CPU) the way a user's `.to()` would.
constexpr const char* kTorchScript = R"PY(
import sys, torch
d = sys.argv[1]
def load(name, dt):
    with open(f"{d}/{name}", "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=dt)
def save(name, t):
    with open(f"{d}/{name}", "wb") as f:
        f.write(bytes(t.contiguous().view(torch.uint8).numpy()))
f32, bf, h = load("f32", torch.float32), load("bf16", torch.bfloat16), load("f16", torch.float16)
save("f32_bf16", f32.to(torch.bfloat16)); save("f32_f16", f32.to(torch.float16))
save("bf16_f32", bf.to(torch.float32)); save("bf16_f16", bf.to(torch.float16))
save("f16_f32", h.to(torch.float32)); save("f16_bf16", h.to(torch.bfloat16))
)PY";

/// Equal bits, except that where torch gives a NaN any NaN is accepted: torch's
/// NaN patterns differ between its scalar and vectorized paths (see host_cast.cc).
template <typename In, typename Out>
void ExpectMatchesTorch(const std::vector<In>& in, const std::vector<Out>& got,
                        const std::string& torch_bytes, const char* what) {
  const auto want = FromBytes<Out>(torch_bytes);
  ASSERT_EQ(got.size(), want.size()) << what;
  auto is_nan = [&](Out x) {
    if constexpr (sizeof(Out) == 4) return IsNaN32(x);
    return std::string_view(what).ends_with("BF16") ? IsNaNBF16(x) : IsNaN16(x);
  };
  int bad = 0;
  for (size_t i = 0; i < got.size() && bad < 10; ++i) {
    const bool ok = is_nan(want[i]) ? is_nan(got[i]) : got[i] == want[i];
    if (!ok) {
      ++bad;
      ADD_FAILURE() << what << ": input 0x" << std::hex << +in[i] << " gave 0x" << +got[i]
                    << ", torch gives 0x" << +want[i];
    }
  }
}

TEST(HostCastKernels, MatchTorch) {
  if (RunCommand("python3 -c 'import torch, numpy' >/dev/null 2>&1").exit_code != 0)
    GTEST_SKIP() << "python3 cannot import torch and numpy (put a venv with torch first on "
                    "PATH, e.g. /work/main/.venv/bin); the reference tests still ran";
  TempDir dir("wbroker-cast");
  const auto u16 = AllU16();
  const auto f32 = F32Patterns();
  WriteFile(dir / "f32", Bytes(f32));
  WriteFile(dir / "bf16", Bytes(u16));
  WriteFile(dir / "f16", Bytes(u16));
  WriteFile(dir / "convert.py", kTorchScript);
  auto r = RunCommand("python3 " + (dir / "convert.py").string() + " " + dir.path().string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  ExpectMatchesTorch(f32, Convert<uint16_t>(DType::kF32, f32, DType::kBF16),
                     ReadFile(dir / "f32_bf16"), "F32->BF16");
  ExpectMatchesTorch(f32, Convert<uint16_t>(DType::kF32, f32, DType::kF16),
                     ReadFile(dir / "f32_f16"), "F32->F16");
  ExpectMatchesTorch(u16, Convert<uint32_t>(DType::kBF16, u16, DType::kF32),
                     ReadFile(dir / "bf16_f32"), "BF16->F32");
  ExpectMatchesTorch(u16, Convert<uint16_t>(DType::kBF16, u16, DType::kF16),
                     ReadFile(dir / "bf16_f16"), "BF16->F16");
  ExpectMatchesTorch(u16, Convert<uint32_t>(DType::kF16, u16, DType::kF32),
                     ReadFile(dir / "f16_f32"), "F16->F32");
  ExpectMatchesTorch(u16, Convert<uint16_t>(DType::kF16, u16, DType::kBF16),
                     ReadFile(dir / "f16_bf16"), "F16->BF16");
}

// --- end to end: wbrokerd --dtype on the host backend ----------------------

/// Mixed tensors: every F16/BF16 pattern, F32 edge cases, integers and bools
/// (never converted), a scalar, and a 20 MB F32 tensor that spans several
/// fill chunks and conversion steps.
std::vector<FixtureTensor> CastTensors() {
  const auto f32 = F32Patterns();
  return {
      {"a.f32", DType::kF32, {f32.size()}, Bytes(f32)},
      {"b.bf16", DType::kBF16, {256, 256}, Bytes(AllU16())},
      {"c.f16", DType::kF16, {65536}, Bytes(AllU16())},
      {"d.ids", DType::kI64, {7}, ""},
      {"e.big", DType::kF32, {5'000'001}, ""},
      {"f.mask", DType::kBool, {3}, ""},
      {"g.scalar", DType::kF16, {}, ""},
      {"h.odd", DType::kBF16, {3}, ""},
  };
}

class HostCastE2E : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    cache_ = dir_.path() / "hub";
    socket_ = dir_.path() / "wb.sock";
    HubRepoBuilder repo(cache_, "org/mixed");
    repo.SetRef("main", repo.AddCommit({{"model.safetensors", SerializeSafetensors(CastTensors())},
                                        {"config.json", "{}"}}));
  }

  TempDir dir_;
  std::filesystem::path cache_, socket_;
};

TEST_P(HostCastE2E, FloatsConvertedIntsUntouchedAligned) {
  const std::string flag = GetParam();
  const DType target = *broker::ParseCastDType(flag);
  BrokerProcess::Options o;
  o.socket = socket_;
  o.cache_dir = cache_;
  o.extra_args = {"--device", "cpu", "--dtype", flag};
  BrokerProcess broker(o);
  client::ClientOptions co;
  co.socket_path = socket_.string();
  auto c = client::Client::Connect(co);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  auto lease = (*c)->Attach("org/mixed");
  ASSERT_TRUE(lease.ok()) << lease.status().ToString() << "\n" << broker.Log();
  EXPECT_EQ((*lease)->backend(), "host");

  uint64_t end = 0;
  for (const auto& t : CastTensors()) {
    SCOPED_TRACE(t.name);
    const auto* v = (*lease)->Find(t.name);
    ASSERT_NE(v, nullptr);
    const bool floaty = broker::IsHostCastable(t.dtype);
    const DType want_dtype = floaty ? target : t.dtype;
    EXPECT_EQ(v->dtype, want_dtype);
    EXPECT_EQ(std::vector<uint64_t>(v->shape.begin(), v->shape.end()), t.shape);
    const std::string want = RefCast(FixtureTensorData(t), t.dtype, want_dtype);
    ASSERT_EQ(v->nbytes, want.size());
    EXPECT_EQ(v->offset % 256, 0u) << "offset not 256-aligned";
    EXPECT_GE(v->offset, end) << "overlaps the previous tensor";
    end = v->offset + v->nbytes;
    ASSERT_LE(end, (*lease)->arena_size());
    if (std::memcmp(v->data, want.data(), want.size()) != 0) {
      const char* got = static_cast<const char*>(v->data);
      size_t i = 0;
      while (got[i] == want[i]) ++i;
      ADD_FAILURE() << "bytes differ first at byte " << i << " of " << want.size();
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Targets, HostCastE2E, ::testing::Values("bf16", "fp16", "fp32"));

}  // namespace
}  // namespace wbroker::testing
