// wbroker runtime: sentence-transformers pooling and normalization.
//
// modules.json lists the pipeline (Transformer, Pooling, optional
// Normalize); the Pooling module's config.json picks the modes (mean, cls,
// max, mean_sqrt_len_tokens, weightedmean, lasttoken; several are
// concatenated in that order) in either the legacy pooling_mode_* booleans
// or the newer "pooling_mode" key. Numerics follow sentence-transformers.
#pragma once

#include <ATen/core/Tensor.h>

#include <filesystem>
#include <string>
#include <vector>

#include "wbroker/common/status.h"

namespace wbroker::runtime {

/// How token embeddings become one sentence embedding.
struct PoolingConfig {
  std::vector<std::string> modes = {"mean"};  ///< pooling modes, concatenated in this order
  bool normalize = false;                     ///< L2-normalize (a Normalize module follows)
};

/// Reads modules.json and the Pooling module's config.json under
/// `snapshot_dir`; without modules.json: mean pooling, no normalization.
/// Modules other than Transformer, Pooling and Normalize are refused.
Result<PoolingConfig> LoadPoolingConfig(const std::filesystem::path& snapshot_dir);

/// Pools `hidden` [batch, seq, dim] under `mask` [batch, seq] (1 = token).
/// Throws c10::Error.
at::Tensor Pool(const at::Tensor& hidden, const at::Tensor& mask, const PoolingConfig& config);

}  // namespace wbroker::runtime
