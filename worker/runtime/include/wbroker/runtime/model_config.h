// wbroker runtime: ModelConfig, the parts of a Hugging Face config.json the runtime uses.
//
// Decoders (model_type llama, qwen2, mistral) and BERT encoders. RoPE scaling
// is read from both spellings transformers has used: the 4.x `rope_scaling`
// dict (+ top-level `rope_theta`) and the 5.x `rope_parameters` dict.
// Anything the runtime cannot run faithfully is refused with an error that
// names the field. No libtorch here: dtypes are kept as their config spelling.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "wbroker/common/status.h"

namespace wbroker::runtime {

/// Which forward pass a config describes.
enum class ModelFamily { kLlama, kQwen2, kMistral, kBert };

/// How rotary inverse frequencies are derived (transformers' rope_type).
enum class RopeType { kDefault, kLinear, kDynamic, kLlama3, kYarn };

/// RoPE parameters, as transformers' modeling_rope_utils reads them.
struct RopeConfig {
  RopeType type = RopeType::kDefault;            ///< rope_type
  double theta = 10000.0;                        ///< rope_theta (base)
  double factor = 1.0;                           ///< linear/dynamic/llama3/yarn scale
  double low_freq_factor = 1.0;                  ///< llama3
  double high_freq_factor = 4.0;                 ///< llama3
  int64_t original_max_position_embeddings = 0;  ///< llama3/yarn
  std::optional<double> attention_factor;        ///< yarn: scales cos/sin
  std::optional<double> beta_fast, beta_slow;    ///< yarn ramp (defaults 32/1)
  std::optional<double> mscale, mscale_all_dim;  ///< yarn attention_factor inputs
  bool truncate = true;                          ///< yarn: floor/ceil the ramp bounds
  double partial_rotary_factor = 1.0;            ///< fraction of head_dim rotated
};

/// The architecture hyper-parameters of one model.
struct ModelConfig {
  std::string model_type;                    ///< as written ("llama", "qwen2", "mistral", "bert")
  ModelFamily family = ModelFamily::kLlama;  ///< derived from model_type
  std::string dtype = "float32";  ///< torch_dtype / dtype: "float32", "bfloat16", "float16"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  ///< = num_attention_heads when absent
  int64_t head_dim = 0;             ///< = hidden_size / num_attention_heads when absent
  int64_t max_position_embeddings = 0;
  std::string hidden_act;  ///< "silu" (decoders), "gelu" (bert)

  // Decoders.
  double rms_norm_eps = 1e-6;
  RopeConfig rope;                        ///< rotary embedding parameters
  bool tie_word_embeddings = false;       ///< lm_head shares embed_tokens
  bool attention_bias = false;            ///< q/k/v(/o) biases (always q/k/v for qwen2)
  bool o_proj_bias = false;               ///< o_proj bias (llama attention_bias)
  bool mlp_bias = false;                  ///< llama mlp_bias
  std::optional<int64_t> sliding_window;  ///< mistral/qwen2 window when in use
  std::vector<int32_t> eos_token_ids;     ///< eos_token_id (int or list)
  std::optional<int32_t> bos_token_id, pad_token_id;

  // BERT.
  double layer_norm_eps = 1e-12;
  int64_t type_vocab_size = 2;

  /// Parses config.json text; `label` (usually the path) starts every error.
  static Result<ModelConfig> Parse(std::string_view label, std::string_view json);
  /// Reads and parses `<snapshot_dir>/config.json`.
  static Result<ModelConfig> FromFile(const std::filesystem::path& snapshot_dir);

  bool is_decoder() const { return family != ModelFamily::kBert; }
};

/// The spelling of a RopeType ("default", "linear", ...).
std::string_view RopeTypeName(RopeType type);

}  // namespace wbroker::runtime
