// wbroker runtime: next-token selection (greedy, or temperature/top-k/top-p sampling).
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace wbroker::runtime {

/// How the next token is chosen.
struct SamplingParams {
  bool do_sample = false;    ///< false: greedy (argmax)
  double temperature = 1.0;  ///< <= 0 also means greedy
  double top_p = 1.0;        ///< nucleus: keep the smallest set with this much mass
  int64_t top_k = 0;         ///< keep the k most likely tokens; 0 = all
  uint64_t seed = 0;         ///< seeds the sampler's generator

  bool greedy() const { return !do_sample || temperature <= 0; }
};

/// Picks tokens from logits. One per sequence: owns a seeded CPU generator,
/// so the same seed gives the same tokens (logits are sampled on the CPU
/// whatever device produced them). Not thread-safe.
class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);

  /// The next token from float32 logits [vocab]. Throws c10::Error.
  int32_t Next(const at::Tensor& logits);

 private:
  SamplingParams params_;  ///< the strategy
  at::Generator gen_;      ///< CPU generator seeded with params_.seed
};

}  // namespace wbroker::runtime
