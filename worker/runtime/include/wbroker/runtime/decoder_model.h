// wbroker runtime: DecoderModel, the llama-family forward pass (llama, qwen2, mistral).
//
// RMSNorm, rotary embeddings, grouped-query attention through
// at::scaled_dot_product_attention with a per-sequence KV cache, SwiGLU MLP
// and a tied or untied lm_head, computed in the weights' dtype with the same
// ops, in the same order and the same dtypes as transformers' sdpa path, so
// greedy decoding matches transformers token for token.
//
// The model only reads its weights: one DecoderModel serves any number of
// concurrent sequences, each with its own KvCache.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "wbroker/common/status.h"
#include "wbroker/runtime/model_config.h"
#include "wbroker/runtime/rotary.h"
#include "wbroker/runtime/weights.h"

namespace wbroker::runtime {

/// The attention state of one sequence.
struct KvCache {
  std::vector<at::Tensor> keys;    ///< per layer [1, kv_heads, length, head_dim] (after RoPE)
  std::vector<at::Tensor> values;  ///< per layer [1, kv_heads, length, head_dim]
  int64_t length = 0;              ///< tokens already processed
  RotaryState rope;                ///< the sequence's RoPE frequencies
};

/// A decoder-only language model over borrowed weights.
class DecoderModel {
 public:
  /// Binds `weights` (names as transformers saves them, with or without the
  /// "model." prefix) to the layers of `config`. Checks every shape and that
  /// all weights share one floating dtype and device. Keeps `weights` alive.
  static Result<std::unique_ptr<DecoderModel>> Create(ModelConfig config, WeightMap weights);
  ~DecoderModel();

  /// A cache for a new sequence.
  KvCache NewCache() const;

  /// Runs `ids` at positions cache.length.. and appends them to `cache`.
  /// Returns float32 logits [vocab] of the last position, or [ids, vocab]
  /// for every position when all_positions is set.
  Result<at::Tensor> Forward(const std::vector<int32_t>& ids, KvCache& cache,
                             bool all_positions = false) const;

  const ModelConfig& config() const { return config_; }
  /// The compute dtype (the weights' dtype).
  c10::ScalarType dtype() const { return dtype_; }
  /// Where the weights live (cpu or cuda:N).
  c10::Device device() const { return device_; }
  /// All weights by name (for checks such as "nothing was copied").
  const WeightMap& weights() const { return weights_; }

 private:
  struct Layer;
  DecoderModel() = default;
  at::Tensor ForwardOrThrow(const std::vector<int32_t>& ids, KvCache& cache,
                            bool all_positions) const;

  ModelConfig config_;                       ///< hyper-parameters
  WeightMap weights_;                        ///< owns every tensor the layers point at
  c10::ScalarType dtype_ = c10::kFloat;      ///< compute dtype
  c10::Device device_{c10::kCPU};            ///< weights' device
  std::unique_ptr<RotaryEmbedding> rotary_;  ///< RoPE frequencies
  std::vector<Layer> layers_;                ///< the decoder layers
  at::Tensor embed_tokens_;                  ///< [vocab, hidden]
  at::Tensor final_norm_;                    ///< [hidden]
  at::Tensor lm_head_;                       ///< [vocab, hidden]; embed_tokens_ when tied
};

}  // namespace wbroker::runtime
