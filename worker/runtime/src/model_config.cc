// wbroker runtime: config.json parsing for decoders and BERT encoders.
#include "wbroker/runtime/model_config.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <sstream>

namespace wbroker::runtime {
namespace {

using nlohmann::json;

/// Reads typed fields of one JSON object; the first problem becomes the Status.
class Fields {
 public:
  Fields(std::string_view label, const json& obj, std::string prefix = "")
      : label_(label), obj_(obj), prefix_(std::move(prefix)) {}

  bool Has(const char* key) const { return obj_.contains(key) && !obj_.at(key).is_null(); }

  Status Error(const char* key, const std::string& what) const {
    return Status(ErrorCode::kInvalidArgument,
                  std::string(label_) + ": field '" + prefix_ + key + "' " + what);
  }

  Status Int(const char* key, int64_t* out, bool required, int64_t min = 1) const {
    if (!Has(key)) return required ? Error(key, "is missing") : Status::Ok();
    const json& v = obj_.at(key);
    if (!v.is_number_integer()) return Error(key, "must be an integer, got " + v.dump());
    int64_t x = v.get<int64_t>();
    if (x < min) return Error(key, "must be >= " + std::to_string(min) + ", got " + v.dump());
    *out = x;
    return Status::Ok();
  }

  Status Double(const char* key, double* out, bool required) const {
    if (!Has(key)) return required ? Error(key, "is missing") : Status::Ok();
    const json& v = obj_.at(key);
    if (!v.is_number()) return Error(key, "must be a number, got " + v.dump());
    *out = v.get<double>();
    if (!std::isfinite(*out)) return Error(key, "must be finite");
    return Status::Ok();
  }

  Status OptDouble(const char* key, std::optional<double>* out) const {
    if (!Has(key)) return Status::Ok();
    double x = 0;
    WB_RETURN_IF_ERROR(Double(key, &x, true));
    *out = x;
    return Status::Ok();
  }

  Status Bool(const char* key, bool* out) const {
    if (!Has(key)) return Status::Ok();
    const json& v = obj_.at(key);
    if (!v.is_boolean()) return Error(key, "must be true or false, got " + v.dump());
    *out = v.get<bool>();
    return Status::Ok();
  }

  Status String(const char* key, std::string* out, bool required) const {
    if (!Has(key)) return required ? Error(key, "is missing") : Status::Ok();
    const json& v = obj_.at(key);
    if (!v.is_string()) return Error(key, "must be a string, got " + v.dump());
    *out = v.get<std::string>();
    return Status::Ok();
  }

  /// An int or a list of ints (eos_token_id).
  Status TokenIds(const char* key, std::vector<int32_t>* out) const {
    if (!Has(key)) return Status::Ok();
    const json& v = obj_.at(key);
    out->clear();
    auto add = [&](const json& e) -> Status {
      if (!e.is_number_integer() || e.get<int64_t>() < 0 || e.get<int64_t>() > INT32_MAX)
        return Error(key, "must be a token id or a list of them, got " + v.dump());
      out->push_back(static_cast<int32_t>(e.get<int64_t>()));
      return Status::Ok();
    };
    if (v.is_array()) {
      for (const json& e : v) WB_RETURN_IF_ERROR(add(e));
      return Status::Ok();
    }
    return add(v);
  }

  Status OptTokenId(const char* key, std::optional<int32_t>* out) const {
    std::vector<int32_t> ids;
    WB_RETURN_IF_ERROR(TokenIds(key, &ids));
    if (ids.size() == 1) *out = ids[0];
    return Status::Ok();
  }

 private:
  std::string_view label_;  ///< error prefix
  const json& obj_;         ///< the object read
  std::string prefix_;      ///< "rope_parameters." for nested fields
};

Status ParseRope(std::string_view label, const json& cfg, ModelConfig* out) {
  Fields top(label, cfg);
  RopeConfig& rope = out->rope;
  WB_RETURN_IF_ERROR(top.Double("rope_theta", &rope.theta, false));
  // transformers 5 writes `rope_parameters` (with rope_theta inside); 4.x
  // wrote `rope_scaling` (null for the default) next to a top-level rope_theta.
  const char* key = nullptr;
  if (top.Has("rope_parameters")) {
    key = "rope_parameters";
  } else if (top.Has("rope_scaling")) {
    key = "rope_scaling";
  }
  if (key == nullptr) return Status::Ok();
  const json& rp = cfg.at(key);
  if (!rp.is_object()) return top.Error(key, "must be an object, got " + rp.dump());
  Fields f(label, rp, std::string(key) + ".");
  if (!f.Has("rope_type") && !f.Has("type") && !f.Has("rope_theta") && !rp.empty()) {
    // Per-layer-type dicts ({"full_attention": {...}, ...}) belong to other families.
    return top.Error(key, "has no rope_type (per-layer RoPE parameters are not supported)");
  }
  std::string type = "default";
  WB_RETURN_IF_ERROR(f.String(f.Has("rope_type") ? "rope_type" : "type", &type, false));
  WB_RETURN_IF_ERROR(f.Double("rope_theta", &rope.theta, false));
  WB_RETURN_IF_ERROR(f.Double("partial_rotary_factor", &rope.partial_rotary_factor, false));
  if (rope.partial_rotary_factor != 1.0)
    return f.Error("partial_rotary_factor", "must be 1.0 (partial rotary is not supported)");
  if (rope.theta <= 0) return f.Error("rope_theta", "must be > 0");

  auto factor = [&](bool required) -> Status {
    WB_RETURN_IF_ERROR(f.Double("factor", &rope.factor, required));
    if (rope.factor <= 0) return f.Error("factor", "must be > 0");
    return Status::Ok();
  };
  if (type == "default") {
    rope.type = RopeType::kDefault;
  } else if (type == "linear") {
    rope.type = RopeType::kLinear;
    WB_RETURN_IF_ERROR(factor(true));
  } else if (type == "dynamic") {
    rope.type = RopeType::kDynamic;
    WB_RETURN_IF_ERROR(factor(true));
  } else if (type == "llama3") {
    rope.type = RopeType::kLlama3;
    WB_RETURN_IF_ERROR(factor(true));
    WB_RETURN_IF_ERROR(f.Double("low_freq_factor", &rope.low_freq_factor, true));
    WB_RETURN_IF_ERROR(f.Double("high_freq_factor", &rope.high_freq_factor, true));
    WB_RETURN_IF_ERROR(
        f.Int("original_max_position_embeddings", &rope.original_max_position_embeddings, true));
    if (rope.high_freq_factor == rope.low_freq_factor)
      return f.Error("high_freq_factor", "must differ from low_freq_factor");
  } else if (type == "yarn") {
    rope.type = RopeType::kYarn;
    rope.original_max_position_embeddings = out->max_position_embeddings;
    WB_RETURN_IF_ERROR(
        f.Int("original_max_position_embeddings", &rope.original_max_position_embeddings, false));
    rope.factor = 0;
    WB_RETURN_IF_ERROR(f.Double("factor", &rope.factor, false));
    if (rope.factor == 0) {
      // transformers derives it from the context extension.
      rope.factor = static_cast<double>(out->max_position_embeddings) /
                    static_cast<double>(rope.original_max_position_embeddings);
    }
    if (rope.factor <= 0) return f.Error("factor", "must be > 0");
    WB_RETURN_IF_ERROR(f.OptDouble("attention_factor", &rope.attention_factor));
    WB_RETURN_IF_ERROR(f.OptDouble("beta_fast", &rope.beta_fast));
    WB_RETURN_IF_ERROR(f.OptDouble("beta_slow", &rope.beta_slow));
    WB_RETURN_IF_ERROR(f.OptDouble("mscale", &rope.mscale));
    WB_RETURN_IF_ERROR(f.OptDouble("mscale_all_dim", &rope.mscale_all_dim));
    WB_RETURN_IF_ERROR(f.Bool("truncate", &rope.truncate));
  } else {
    return f.Error(f.Has("rope_type") ? "rope_type" : "type",
                   "is '" + type + "', not supported (default, linear, dynamic, llama3, yarn)");
  }
  return Status::Ok();
}

Status ParseDecoder(std::string_view label, const json& cfg, ModelConfig* out) {
  Fields f(label, cfg);
  WB_RETURN_IF_ERROR(f.Int("vocab_size", &out->vocab_size, true));
  WB_RETURN_IF_ERROR(f.Int("hidden_size", &out->hidden_size, true));
  WB_RETURN_IF_ERROR(f.Int("intermediate_size", &out->intermediate_size, true));
  WB_RETURN_IF_ERROR(f.Int("num_hidden_layers", &out->num_hidden_layers, true));
  WB_RETURN_IF_ERROR(f.Int("num_attention_heads", &out->num_attention_heads, true));
  out->num_key_value_heads = out->num_attention_heads;
  WB_RETURN_IF_ERROR(f.Int("num_key_value_heads", &out->num_key_value_heads, false));
  if (out->num_attention_heads % out->num_key_value_heads != 0)
    return f.Error("num_key_value_heads", "must divide num_attention_heads (" +
                                              std::to_string(out->num_attention_heads) + ")");
  out->head_dim = out->hidden_size / out->num_attention_heads;
  WB_RETURN_IF_ERROR(f.Int("head_dim", &out->head_dim, false));
  if (!f.Has("head_dim") && out->hidden_size % out->num_attention_heads != 0)
    return f.Error("hidden_size",
                   "must be a multiple of num_attention_heads when head_dim is absent");
  if (out->head_dim % 2 != 0) return f.Error("head_dim", "must be even for rotary embeddings");
  out->max_position_embeddings = 2048;
  WB_RETURN_IF_ERROR(f.Int("max_position_embeddings", &out->max_position_embeddings, false));
  WB_RETURN_IF_ERROR(f.Double("rms_norm_eps", &out->rms_norm_eps, false));
  out->hidden_act = "silu";
  WB_RETURN_IF_ERROR(f.String("hidden_act", &out->hidden_act, false));
  if (out->hidden_act != "silu")
    return f.Error("hidden_act", "is '" + out->hidden_act + "', only silu is supported");
  out->tie_word_embeddings = false;  // the Llama/Qwen2/MistralConfig default
  WB_RETURN_IF_ERROR(f.Bool("tie_word_embeddings", &out->tie_word_embeddings));

  if (out->family == ModelFamily::kQwen2) {
    out->attention_bias = true;  // Qwen2Attention: q/k/v always biased, o_proj never
  } else if (out->family == ModelFamily::kLlama) {
    WB_RETURN_IF_ERROR(f.Bool("attention_bias", &out->attention_bias));
    out->o_proj_bias = out->attention_bias;
    WB_RETURN_IF_ERROR(f.Bool("mlp_bias", &out->mlp_bias));
  }
  int64_t tp = 1;
  WB_RETURN_IF_ERROR(f.Int("pretraining_tp", &tp, false));

  // Sliding-window attention: mistral uses `sliding_window` when set; qwen2
  // only with use_sliding_window. The decoder refuses sequences longer than
  // the window instead of masking (identical results below it).
  bool use_sliding = out->family == ModelFamily::kMistral;
  WB_RETURN_IF_ERROR(f.Bool("use_sliding_window", &use_sliding));
  if (use_sliding && f.Has("sliding_window")) {
    int64_t w = 0;
    WB_RETURN_IF_ERROR(f.Int("sliding_window", &w, true));
    out->sliding_window = w;
  }
  WB_RETURN_IF_ERROR(f.TokenIds("eos_token_id", &out->eos_token_ids));
  WB_RETURN_IF_ERROR(f.OptTokenId("bos_token_id", &out->bos_token_id));
  WB_RETURN_IF_ERROR(f.OptTokenId("pad_token_id", &out->pad_token_id));
  return ParseRope(label, cfg, out);
}

Status ParseBert(std::string_view label, const json& cfg, ModelConfig* out) {
  Fields f(label, cfg);
  WB_RETURN_IF_ERROR(f.Int("vocab_size", &out->vocab_size, true));
  WB_RETURN_IF_ERROR(f.Int("hidden_size", &out->hidden_size, true));
  WB_RETURN_IF_ERROR(f.Int("intermediate_size", &out->intermediate_size, true));
  WB_RETURN_IF_ERROR(f.Int("num_hidden_layers", &out->num_hidden_layers, true));
  WB_RETURN_IF_ERROR(f.Int("num_attention_heads", &out->num_attention_heads, true));
  if (out->hidden_size % out->num_attention_heads != 0)
    return f.Error("hidden_size", "must be a multiple of num_attention_heads");
  out->num_key_value_heads = out->num_attention_heads;
  out->head_dim = out->hidden_size / out->num_attention_heads;
  out->max_position_embeddings = 512;
  WB_RETURN_IF_ERROR(f.Int("max_position_embeddings", &out->max_position_embeddings, false));
  WB_RETURN_IF_ERROR(f.Int("type_vocab_size", &out->type_vocab_size, false));
  WB_RETURN_IF_ERROR(f.Double("layer_norm_eps", &out->layer_norm_eps, false));
  out->hidden_act = "gelu";
  WB_RETURN_IF_ERROR(f.String("hidden_act", &out->hidden_act, false));
  if (out->hidden_act != "gelu")
    return f.Error("hidden_act", "is '" + out->hidden_act + "', only gelu is supported for bert");
  std::string pos = "absolute";
  WB_RETURN_IF_ERROR(f.String("position_embedding_type", &pos, false));
  if (pos != "absolute")
    return f.Error("position_embedding_type", "is '" + pos + "', only absolute is supported");
  bool is_decoder = false;
  WB_RETURN_IF_ERROR(f.Bool("is_decoder", &is_decoder));
  if (is_decoder) return f.Error("is_decoder", "must be false (bert is run as an encoder)");
  WB_RETURN_IF_ERROR(f.OptTokenId("pad_token_id", &out->pad_token_id));
  return Status::Ok();
}

}  // namespace

std::string_view RopeTypeName(RopeType type) {
  switch (type) {
    case RopeType::kDefault:
      return "default";
    case RopeType::kLinear:
      return "linear";
    case RopeType::kDynamic:
      return "dynamic";
    case RopeType::kLlama3:
      return "llama3";
    case RopeType::kYarn:
      return "yarn";
  }
  return "?";
}

Result<ModelConfig> ModelConfig::Parse(std::string_view label, std::string_view text) {
  json cfg = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (cfg.is_discarded() || !cfg.is_object())
    return Status(ErrorCode::kInvalidArgument, std::string(label) + ": not a JSON object");
  ModelConfig out;
  Fields f(label, cfg);
  WB_RETURN_IF_ERROR(f.String("model_type", &out.model_type, true));
  if (out.model_type == "llama") {
    out.family = ModelFamily::kLlama;
  } else if (out.model_type == "qwen2") {
    out.family = ModelFamily::kQwen2;
  } else if (out.model_type == "mistral") {
    out.family = ModelFamily::kMistral;
  } else if (out.model_type == "bert") {
    out.family = ModelFamily::kBert;
  } else {
    return f.Error("model_type",
                   "is '" + out.model_type + "', not supported (llama, qwen2, mistral, bert)");
  }
  // transformers 5 writes "dtype", 4.x "torch_dtype".
  const char* dtype_key = f.Has("dtype") ? "dtype" : "torch_dtype";
  WB_RETURN_IF_ERROR(f.String(dtype_key, &out.dtype, false));
  if (out.dtype == "float" || out.dtype == "fp32") out.dtype = "float32";
  if (out.dtype == "half" || out.dtype == "fp16") out.dtype = "float16";
  if (out.dtype == "bf16") out.dtype = "bfloat16";
  if (out.dtype != "float32" && out.dtype != "bfloat16" && out.dtype != "float16")
    return f.Error(dtype_key, "is '" + out.dtype + "', not supported (float32, bfloat16, float16)");
  if (out.family == ModelFamily::kBert) {
    WB_RETURN_IF_ERROR(ParseBert(label, cfg, &out));
  } else {
    WB_RETURN_IF_ERROR(ParseDecoder(label, cfg, &out));
  }
  return out;
}

Result<ModelConfig> ModelConfig::FromFile(const std::filesystem::path& snapshot_dir) {
  auto path = snapshot_dir / "config.json";
  std::ifstream in(path);
  if (!in) return Status(ErrorCode::kNotFound, path.string() + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  return Parse(path.string(), ss.str());
}

}  // namespace wbroker::runtime
