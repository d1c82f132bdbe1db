// wbroker runtime: greedy and seeded temperature/top-k/top-p sampling.
#include "wbroker/runtime/sampler.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/multinomial.h>
#include <c10/core/InferenceMode.h>

#include <limits>
#include <tuple>

namespace wbroker::runtime {

Sampler::Sampler(const SamplingParams& params)
    : params_(params), gen_(at::make_generator<at::CPUGeneratorImpl>(params.seed)) {}

int32_t Sampler::Next(const at::Tensor& logits) {
  c10::InferenceMode guard;
  at::Tensor l = logits.to(c10::kCPU, c10::kFloat).reshape({-1});
  // Greedy is torch.argmax over the float32 logits, as transformers' greedy search.
  if (params_.greedy()) return static_cast<int32_t>(l.argmax().item<int64_t>());
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  l = l.div(params_.temperature);
  const int64_t vocab = l.size(0);
  if (params_.top_k > 0 && params_.top_k < vocab) {
    at::Tensor kth = std::get<0>(l.topk(params_.top_k)).min();
    l = l.masked_fill(l.lt(kth), kNegInf);
  }
  if (params_.top_p < 1.0) {
    auto [sorted, index] = l.sort(/*dim=*/-1, /*descending=*/true);
    at::Tensor probs = sorted.softmax(-1);
    // Drop a token when the mass before it already reaches top_p (the most
    // likely token always survives).
    at::Tensor drop = probs.cumsum(-1).sub(probs).gt(params_.top_p);
    sorted = sorted.masked_fill(drop, kNegInf);
    l = at::full_like(l, kNegInf).scatter(0, index, sorted);
  }
  at::Tensor probs = l.softmax(-1);
  return static_cast<int32_t>(
      at::multinomial(probs, 1, /*replacement=*/false, gen_).item<int64_t>());
}

}  // namespace wbroker::runtime
