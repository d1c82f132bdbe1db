// wbroker runtime: RoPE inverse frequencies and cos/sin, as transformers computes them.
//
// Python scalar arithmetic on tensors is reproduced with the same ATen ops:
// `1.0 / t` is t.reciprocal() (Tensor.__rtruediv__), `s ** t` is
// at::pow(Scalar, Tensor), `1 - t` is at::rsub, and float32 stays float32
// throughout. Tensor methods rather than operators: <ATen/TensorOperators.h>
// drags in every op header and triples the compile time.
#include "wbroker/runtime/rotary.h"

#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/rsub.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/where.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>
#include <numbers>

namespace wbroker::runtime {
namespace {

const auto kF32 = at::TensorOptions().dtype(c10::kFloat);

/// torch.arange(0, dim, 2, dtype=int64).float() / dim
at::Tensor Exponents(int64_t dim) {
  return at::arange(0, dim, 2, at::TensorOptions().dtype(c10::kLong))
      .to(c10::kFloat)
      .div(static_cast<double>(dim));
}

/// 1.0 / (base ** exponents)
at::Tensor DefaultInvFreq(double base, int64_t dim) {
  return at::pow(base, Exponents(dim)).reciprocal();
}

at::Tensor Llama3InvFreq(const RopeConfig& r, int64_t dim) {
  at::Tensor inv_freq = DefaultInvFreq(r.theta, dim);
  const double old_context_len = static_cast<double>(r.original_max_position_embeddings);
  const double low_freq_wavelen = old_context_len / r.low_freq_factor;
  const double high_freq_wavelen = old_context_len / r.high_freq_factor;
  at::Tensor wavelen = inv_freq.reciprocal().mul(2 * std::numbers::pi);
  at::Tensor llama = at::where(wavelen.gt(low_freq_wavelen), inv_freq.div(r.factor), inv_freq);
  at::Tensor smooth = wavelen.reciprocal()
                          .mul(old_context_len)
                          .sub(r.low_freq_factor)
                          .div(r.high_freq_factor - r.low_freq_factor);
  // (1 - smooth) * llama / factor + smooth * llama
  at::Tensor smoothed = at::rsub(smooth, 1).mul(llama).div(r.factor).add(smooth.mul(llama));
  at::Tensor medium =
      wavelen.lt(high_freq_wavelen).logical_not().mul(wavelen.gt(low_freq_wavelen).logical_not());
  return at::where(medium, smoothed, llama);
}

double YarnMscale(double scale, double mscale = 1.0) {
  return scale <= 1 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

at::Tensor YarnInvFreq(const RopeConfig& r, int64_t dim, double* attention_factor) {
  const double base = r.theta, factor = r.factor;
  if (r.attention_factor) {
    *attention_factor = *r.attention_factor;
  } else if (r.mscale && r.mscale_all_dim && *r.mscale != 0 && *r.mscale_all_dim != 0) {
    *attention_factor = YarnMscale(factor, *r.mscale) / YarnMscale(factor, *r.mscale_all_dim);
  } else {
    *attention_factor = YarnMscale(factor);
  }
  const double beta_fast = r.beta_fast.value_or(0) != 0 ? *r.beta_fast : 32;
  const double beta_slow = r.beta_slow.value_or(0) != 0 ? *r.beta_slow : 1;
  const double max_pos = static_cast<double>(r.original_max_position_embeddings);
  auto correction_dim = [&](double rotations) {
    return (dim * std::log(max_pos / (rotations * 2 * std::numbers::pi))) / (2 * std::log(base));
  };
  double low = correction_dim(beta_fast), high = correction_dim(beta_slow);
  if (r.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;  // transformers: prevent a singular ramp

  at::Tensor pos_freqs =
      at::pow(base, at::arange(0, dim, 2).to(c10::kFloat).div(static_cast<double>(dim)));
  at::Tensor extrapolation = pos_freqs.reciprocal();
  at::Tensor interpolation = pos_freqs.mul(factor).reciprocal();
  at::Tensor ramp = at::arange(dim / 2, kF32).sub(low).div(high - low).clamp(0, 1);
  at::Tensor extrapolation_factor = at::rsub(ramp, 1);
  return interpolation.mul(at::rsub(extrapolation_factor, 1))
      .add(extrapolation.mul(extrapolation_factor));
}

}  // namespace

Result<RotaryEmbedding> RotaryEmbedding::Create(const ModelConfig& config, c10::Device device) {
  try {
    c10::InferenceMode guard;
    RotaryEmbedding r;
    r.rope_ = config.rope;
    r.dim_ = config.head_dim;
    r.max_position_embeddings_ = config.max_position_embeddings;
    r.device_ = device;
    at::Tensor inv_freq;
    switch (config.rope.type) {
      case RopeType::kDefault:
      case RopeType::kDynamic:  // starts unscaled; grows in CosSin
        inv_freq = DefaultInvFreq(r.rope_.theta, r.dim_);
        break;
      case RopeType::kLinear:
        inv_freq = DefaultInvFreq(r.rope_.theta, r.dim_).div(r.rope_.factor);
        break;
      case RopeType::kLlama3:
        inv_freq = Llama3InvFreq(r.rope_, r.dim_);
        break;
      case RopeType::kYarn:
        inv_freq = YarnInvFreq(r.rope_, r.dim_, &r.attention_scaling_);
        break;
    }
    r.inv_freq_ = inv_freq.to(device);
    return r;
  } catch (const std::exception& e) {
    return Status(ErrorCode::kInternal, std::string("computing rotary frequencies: ") + e.what());
  }
}

RotaryState RotaryEmbedding::NewState() const {
  return RotaryState{inv_freq_, max_position_embeddings_};
}

at::Tensor RotaryEmbedding::DynamicInvFreq(int64_t seq_len) const {
  // _compute_dynamic_ntk_parameters with seq_len a 0-d int64 tensor, so the
  // base is rescaled in float32 like in transformers' forward-time update.
  const double dim = static_cast<double>(dim_);
  at::Tensor len = at::scalar_tensor(std::max(seq_len, max_position_embeddings_),
                                     at::TensorOptions().dtype(c10::kLong));
  at::Tensor scaled = len.mul(rope_.factor)
                          .div(static_cast<double>(max_position_embeddings_))
                          .sub(rope_.factor - 1);
  at::Tensor base = at::pow(scaled, dim / (dim - 2)).mul(rope_.theta);
  return at::pow(base, Exponents(dim_)).reciprocal().to(device_);
}

std::pair<at::Tensor, at::Tensor> RotaryEmbedding::CosSin(int64_t start, int64_t length,
                                                          c10::ScalarType dtype,
                                                          RotaryState& state) const {
  if (rope_.type == RopeType::kDynamic) {
    // dynamic_rope_update: grow past the cached length, reset when short again.
    const int64_t seq_len = start + length;
    if (seq_len > state.cached_len) {
      state.inv_freq = DynamicInvFreq(seq_len);
      state.cached_len = seq_len;
    }
    if (seq_len < max_position_embeddings_ && state.cached_len > max_position_embeddings_) {
      state.inv_freq = inv_freq_;
      state.cached_len = max_position_embeddings_;
    }
  }
  const at::Tensor& inv_freq = state.inv_freq.defined() ? state.inv_freq : inv_freq_;
  at::Tensor positions =
      at::arange(start, start + length, at::TensorOptions().dtype(c10::kLong).device(device_));
  // position_ids[..., None].float() * inv_freq; emb = cat(freqs, freqs)
  at::Tensor freqs = positions.unsqueeze(0).unsqueeze(-1).to(c10::kFloat).mul(inv_freq);
  at::Tensor emb = at::cat({freqs, freqs}, -1);
  at::Tensor cos = emb.cos().mul(attention_scaling_);
  at::Tensor sin = emb.sin().mul(attention_scaling_);
  return {cos.to(dtype), sin.to(dtype)};
}

}  // namespace wbroker::runtime
