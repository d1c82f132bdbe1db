// wbroker runtime: rotary position embeddings, computed as transformers does.
//
// Inverse frequencies follow transformers' modeling_rope_utils for the
// default, linear, dynamic (NTK), llama3 and yarn rope types, op for op in
// float32, so cos/sin match bit for bit on the same device; cos/sin are then
// cast to the activations' dtype as LlamaRotaryEmbedding does.
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>

#include "wbroker/common/status.h"
#include "wbroker/runtime/model_config.h"

namespace wbroker::runtime {

/// Per-sequence RoPE state: dynamic NTK scaling regrows the frequencies as
/// the sequence passes max_position_embeddings (transformers keeps this in
/// the module; here each sequence owns it, so concurrent calls don't race).
struct RotaryState {
  at::Tensor inv_freq;     ///< current inverse frequencies (float32, model device)
  int64_t cached_len = 0;  ///< sequence length inv_freq was computed for
};

/// The rotary embedding of one model; immutable after Create.
class RotaryEmbedding {
 public:
  /// Computes the inverse frequencies for `config` on `device`.
  static Result<RotaryEmbedding> Create(const ModelConfig& config, c10::Device device);

  /// A fresh state for a new sequence.
  RotaryState NewState() const;

  /// cos and sin, each [1, length, head_dim] in `dtype`, for positions
  /// start .. start+length-1. Updates `state` (dynamic rope). Throws c10::Error.
  std::pair<at::Tensor, at::Tensor> CosSin(int64_t start, int64_t length, c10::ScalarType dtype,
                                           RotaryState& state) const;

  /// The factor cos/sin are multiplied by (yarn; 1 otherwise).
  double attention_scaling() const { return attention_scaling_; }
  /// The base inverse frequencies (float32, [head_dim / 2]).
  const at::Tensor& inv_freq() const { return inv_freq_; }

 private:
  RotaryEmbedding() = default;
  /// Recomputes dynamic-NTK frequencies for a sequence of `seq_len` tokens.
  at::Tensor DynamicInvFreq(int64_t seq_len) const;

  RopeConfig rope_;                      ///< the config's rope parameters
  int64_t dim_ = 0;                      ///< rotated dimensions (head_dim)
  int64_t max_position_embeddings_ = 0;  ///< dynamic: the length scaling starts after
  c10::Device device_{c10::kCPU};        ///< where cos/sin are computed
  at::Tensor inv_freq_;                  ///< float32 [dim / 2] on device_
  double attention_scaling_ = 1.0;       ///< yarn's cos/sin factor
};

}  // namespace wbroker::runtime
