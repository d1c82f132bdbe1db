// wbroker runtime: EncoderModel, BERT embeddings for sentence-transformers models.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <vector>

#include "wbroker/common/status.h"
#include "wbroker/runtime/model_config.h"
#include "wbroker/runtime/pooling.h"
#include "wbroker/runtime/weights.h"

namespace wbroker::runtime {

/// A BERT encoder plus pooling over borrowed weights; Embed is thread-safe.
class EncoderModel {
 public:
  /// Binds `weights` (with or without the "bert." prefix) to `config`'s layers.
  static Result<std::unique_ptr<EncoderModel>> Create(ModelConfig config, WeightMap weights,
                                                      PoolingConfig pooling);
  /// Reads config.json and the sentence-transformers modules of `snapshot_dir`.
  static Result<std::unique_ptr<EncoderModel>> Load(const std::filesystem::path& snapshot_dir,
                                                    WeightMap weights);
  ~EncoderModel();

  /// One embedding per id list (already tokenized, with [CLS]/[SEP]); the
  /// batch is padded and masked, token_type_ids are zero.
  Result<std::vector<std::vector<float>>> Embed(
      const std::vector<std::vector<int32_t>>& ids_batch) const;

  const ModelConfig& config() const { return config_; }
  const PoolingConfig& pooling() const { return pooling_; }
  const WeightMap& weights() const { return weights_; }

 private:
  struct Layer;
  EncoderModel() = default;
  at::Tensor Encode(const at::Tensor& ids, const at::Tensor& mask, bool padded) const;

  ModelConfig config_;             ///< hyper-parameters
  PoolingConfig pooling_;          ///< sentence-transformers head
  WeightMap weights_;              ///< owns every tensor below
  c10::Device device_{c10::kCPU};  ///< weights' device
  at::Tensor word_, position_, token_type_, emb_norm_w_, emb_norm_b_;  ///< embeddings
  std::vector<Layer> layers_;                                          ///< encoder layers
};

}  // namespace wbroker::runtime
