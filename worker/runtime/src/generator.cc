// wbroker runtime: the generation loop (prefill, then one token per step).
#include "wbroker/runtime/generator.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <sstream>

namespace wbroker::runtime {
namespace {

using nlohmann::json;

Status FieldError(const std::filesystem::path& path, const char* key, const json& v) {
  return Status(ErrorCode::kInvalidArgument,
                path.string() + ": field '" + key + "' has an invalid value " + v.dump());
}

}  // namespace

Result<GenerationDefaults> LoadGenerationDefaults(const std::filesystem::path& snapshot_dir,
                                                  const ModelConfig& config) {
  GenerationDefaults d;
  d.eos_token_ids = config.eos_token_ids;
  const auto path = snapshot_dir / "generation_config.json";
  std::ifstream in(path);
  if (!in) return d;
  std::stringstream ss;
  ss << in.rdbuf();
  json g = json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (g.is_discarded() || !g.is_object())
    return Status(ErrorCode::kInvalidArgument, path.string() + ": not a JSON object");
  auto has = [&](const char* k) { return g.contains(k) && !g[k].is_null(); };
  if (has("eos_token_id")) {
    const json& v = g["eos_token_id"];
    d.eos_token_ids.clear();
    for (const json& e : v.is_array() ? v : json::array({v})) {
      if (!e.is_number_integer() || e.get<int64_t>() < 0)
        return FieldError(path, "eos_token_id", v);
      d.eos_token_ids.push_back(static_cast<int32_t>(e.get<int64_t>()));
    }
  }
  if (has("do_sample")) {
    if (!g["do_sample"].is_boolean()) return FieldError(path, "do_sample", g["do_sample"]);
    d.sampling.do_sample = g["do_sample"].get<bool>();
  }
  for (const char* k : {"temperature", "top_p"}) {
    if (!has(k)) continue;
    if (!g[k].is_number() || g[k].get<double>() < 0) return FieldError(path, k, g[k]);
    (std::string(k) == "temperature" ? d.sampling.temperature : d.sampling.top_p) =
        g[k].get<double>();
  }
  if (has("top_k")) {
    if (!g["top_k"].is_number_integer() || g["top_k"].get<int64_t>() < 0)
      return FieldError(path, "top_k", g["top_k"]);
    d.sampling.top_k = g["top_k"].get<int64_t>();
  }
  return d;
}

Result<std::unique_ptr<Generator>> Generator::Create(std::shared_ptr<const DecoderModel> model,
                                                     GenerationDefaults defaults) {
  if (!model) return Status(ErrorCode::kInvalidArgument, "Generator: null model");
  std::unique_ptr<Generator> g(new Generator());
  g->model_ = std::move(model);
  g->defaults_ = std::move(defaults);
  return g;
}

Result<GenerationResult> Generator::Generate(
    const std::vector<int32_t>& prompt_ids, const GenerationOptions& options,
    const std::function<bool(int32_t token)>& on_token) const {
  if (prompt_ids.empty()) return Status(ErrorCode::kInvalidArgument, "Generate: empty prompt");
  if (options.max_new_tokens < 0)
    return Status(ErrorCode::kInvalidArgument, "Generate: max_new_tokens must be >= 0");
  const SamplingParams& sp = options.sampling;
  if (!sp.greedy() && (sp.top_p <= 0 || sp.top_p > 1 || sp.top_k < 0))
    return Status(ErrorCode::kInvalidArgument, "Generate: top_p must be in (0, 1], top_k >= 0");
  const std::vector<int32_t>& eos =
      options.eos_token_ids ? *options.eos_token_ids : defaults_.eos_token_ids;
  GenerationResult result;
  result.prompt_tokens = static_cast<int64_t>(prompt_ids.size());
  if (options.max_new_tokens == 0) return result;

  KvCache cache = model_->NewCache();
  Sampler sampler(sp);
  WB_ASSIGN_OR_RETURN(at::Tensor logits, model_->Forward(prompt_ids, cache));
  result.tokens.reserve(static_cast<size_t>(options.max_new_tokens));
  while (true) {
    int32_t token = 0;
    try {
      token = sampler.Next(logits);
    } catch (const std::exception& e) {
      return Status(ErrorCode::kInternal, std::string("sampling: ") + e.what());
    }
    result.tokens.push_back(token);
    if (on_token && !on_token(token)) {
      result.finish_reason = FinishReason::kCancelled;
      break;
    }
    if (std::find(eos.begin(), eos.end(), token) != eos.end()) {
      result.finish_reason = FinishReason::kEos;
      break;
    }
    if (static_cast<int64_t>(result.tokens.size()) >= options.max_new_tokens) {
      result.finish_reason = FinishReason::kLength;
      break;
    }
    WB_ASSIGN_OR_RETURN(logits, model_->Forward({token}, cache));
  }
  return result;
}

}  // namespace wbroker::runtime
