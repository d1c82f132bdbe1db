// wbroker runtime: Generator, the token loop over a DecoderModel.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "wbroker/common/status.h"
#include "wbroker/runtime/decoder_model.h"
#include "wbroker/runtime/sampler.h"

namespace wbroker::runtime {

/// Per-request generation settings.
struct GenerationOptions {
  int64_t max_new_tokens = 64;  ///< upper bound on generated tokens
  /// Tokens that end generation (the eos is emitted, then it stops);
  /// nullopt = the model's (generation_config.json, else config.json),
  /// empty = never stop early.
  std::optional<std::vector<int32_t>> eos_token_ids;
  SamplingParams sampling;  ///< greedy by default
};

/// Why generation stopped.
enum class FinishReason { kLength, kEos, kCancelled };

/// The output of one Generate call.
struct GenerationResult {
  std::vector<int32_t> tokens;  ///< generated ids (an eos included)
  FinishReason finish_reason = FinishReason::kLength;
  int64_t prompt_tokens = 0;  ///< length of the prompt
};

/// Defaults from a snapshot's generation_config.json (and config.json).
struct GenerationDefaults {
  std::vector<int32_t> eos_token_ids;  ///< generation_config's eos_token_id, else config's
  SamplingParams sampling;             ///< do_sample, temperature, top_p, top_k
};

/// Reads `<snapshot_dir>/generation_config.json` (absent: config's eos, greedy).
Result<GenerationDefaults> LoadGenerationDefaults(const std::filesystem::path& snapshot_dir,
                                                  const ModelConfig& config);

/// Runs generation requests against one shared model; Generate is
/// thread-safe (each call owns its KV cache and sampler).
class Generator {
 public:
  static Result<std::unique_ptr<Generator>> Create(std::shared_ptr<const DecoderModel> model,
                                                   GenerationDefaults defaults);

  /// Generates after `prompt_ids`. `on_token` (may be empty) sees each new
  /// token as it is chosen; returning false stops with kCancelled.
  Result<GenerationResult> Generate(const std::vector<int32_t>& prompt_ids,
                                    const GenerationOptions& options,
                                    const std::function<bool(int32_t token)>& on_token) const;

  const DecoderModel& model() const { return *model_; }
  const GenerationDefaults& defaults() const { return defaults_; }

 private:
  Generator() = default;
  std::shared_ptr<const DecoderModel> model_;  ///< shared, read-only
  GenerationDefaults defaults_;                ///< eos ids and sampling defaults
};

}  // namespace wbroker::runtime
