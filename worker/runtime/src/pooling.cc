// wbroker runtime: sentence-transformers Pooling/Normalize config and math.
#include "wbroker/runtime/pooling.h"

#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/where.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <limits>
#include <sstream>

namespace wbroker::runtime {
namespace {

using nlohmann::json;

constexpr const char* kModes[] = {"cls",          "max",      "mean", "mean_sqrt_len_tokens",
                                  "weightedmean", "lasttoken"};
/// The legacy boolean keys, in sentence-transformers' order of output.
constexpr std::pair<const char*, const char*> kLegacyKeys[] = {
    {"pooling_mode_cls_token", "cls"},
    {"pooling_mode_max_tokens", "max"},
    {"pooling_mode_mean_tokens", "mean"},
    {"pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"},
    {"pooling_mode_weightedmean_tokens", "weightedmean"},
    {"pooling_mode_lasttoken", "lasttoken"},
};

Result<json> ReadJson(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) return Status(ErrorCode::kNotFound, path.string() + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  json j = json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded())
    return Status(ErrorCode::kInvalidArgument, path.string() + ": invalid JSON");
  return j;
}

Status ParsePoolingModes(const std::filesystem::path& path, const json& cfg,
                         std::vector<std::string>* modes) {
  modes->clear();
  auto bad = [&](const std::string& what) {
    return Status(ErrorCode::kInvalidArgument, path.string() + ": " + what);
  };
  if (cfg.contains("pooling_mode")) {
    const json& m = cfg["pooling_mode"];
    for (const json& e : m.is_array() ? m : json::array({m})) {
      if (!e.is_string()) return bad("field 'pooling_mode' must be a string or a list of them");
      std::string mode = e.get<std::string>();
      if (mode == "mean_tokens") mode = "mean";
      if (mode == "cls_token") mode = "cls";
      if (mode == "max_tokens") mode = "max";
      if (std::find(std::begin(kModes), std::end(kModes), mode) == std::end(kModes))
        return bad("field 'pooling_mode' is '" + mode + "', not supported");
      modes->push_back(mode);
    }
  } else {
    for (const auto& [key, mode] : kLegacyKeys) {
      if (!cfg.contains(key)) continue;
      if (!cfg[key].is_boolean()) return bad("field '" + std::string(key) + "' must be a boolean");
      if (cfg[key].get<bool>()) modes->push_back(mode);
    }
  }
  if (modes->empty()) return bad("no pooling mode is enabled");
  return Status::Ok();
}

}  // namespace

Result<PoolingConfig> LoadPoolingConfig(const std::filesystem::path& snapshot_dir) {
  PoolingConfig config;
  const auto modules_path = snapshot_dir / "modules.json";
  if (!std::filesystem::exists(modules_path)) return config;
  WB_ASSIGN_OR_RETURN(json modules, ReadJson(modules_path));
  if (!modules.is_array())
    return Status(ErrorCode::kInvalidArgument, modules_path.string() + ": not a JSON list");
  bool have_pooling = false;
  for (const json& m : modules) {
    if (!m.is_object() || !m.contains("type") || !m["type"].is_string())
      return Status(ErrorCode::kInvalidArgument,
                    modules_path.string() + ": every module needs a string 'type'");
    const std::string type = m["type"].get<std::string>();
    const std::string kind = type.substr(type.rfind('.') + 1);
    const std::string rel =
        m.contains("path") && m["path"].is_string() ? m["path"].get<std::string>() : "";
    if (kind == "Transformer") continue;
    if (kind == "Normalize") {
      config.normalize = true;
    } else if (kind == "Pooling") {
      if (rel.find("..") != std::string::npos || (!rel.empty() && rel[0] == '/'))
        return Status(ErrorCode::kInvalidArgument,
                      modules_path.string() + ": bad module path '" + rel + "'");
      const auto cfg_path = snapshot_dir / rel / "config.json";
      WB_ASSIGN_OR_RETURN(json cfg, ReadJson(cfg_path));
      WB_RETURN_IF_ERROR(ParsePoolingModes(cfg_path, cfg, &config.modes));
      have_pooling = true;
    } else {
      return Status(ErrorCode::kUnsupported,
                    modules_path.string() + ": module type '" + type +
                        "' is not supported (Transformer, Pooling, Normalize)");
    }
  }
  if (!have_pooling) config.modes = {"mean"};
  return config;
}

at::Tensor Pool(const at::Tensor& hidden, const at::Tensor& mask, const PoolingConfig& config) {
  const auto dtype = hidden.scalar_type();
  const bool reduced = dtype == c10::kHalf || dtype == c10::kBFloat16;
  const auto accumulation = reduced ? c10::kFloat : dtype;
  const int64_t seq = hidden.size(1), dim = hidden.size(2);
  std::vector<at::Tensor> outputs;
  at::Tensor mean_sum, mean_mask;
  for (const std::string& mode : config.modes) {
    if (mode == "cls") {
      at::Tensor first = mask.to(c10::kInt).argmax(1);
      outputs.push_back(
          hidden.gather(1, first.unsqueeze(-1).unsqueeze(1).expand({-1, 1, dim})).squeeze(1));
    } else if (mode == "max") {
      at::Tensor m = mask.unsqueeze(-1).expand_as(hidden).to(dtype);
      outputs.push_back(std::get<0>(
          hidden.masked_fill(m.eq(0), -std::numeric_limits<double>::infinity()).max(1)));
    } else if (mode == "mean" || mode == "mean_sqrt_len_tokens") {
      if (!mean_sum.defined()) {
        at::Tensor m = mask.unsqueeze(-1).to(dtype);
        mean_sum = hidden.mul(m).sum(1, /*keepdim=*/false, accumulation);
        mean_mask = at::clamp(m.sum(1, /*keepdim=*/false, accumulation), 1e-9);
      }
      at::Tensor denom = mode == "mean" ? mean_mask : mean_mask.sqrt();
      outputs.push_back(mean_sum.div(denom).to(dtype));
    } else if (mode == "weightedmean") {
      at::Tensor m = mask.unsqueeze(-1).to(accumulation);
      at::Tensor weights =
          at::arange(1, seq + 1, hidden.options().dtype(accumulation)).view({1, -1, 1});
      weights = weights.sub(mask.to(c10::kInt).argmax(1).view({-1, 1, 1}));
      at::Tensor wm = m.mul(weights);
      outputs.push_back(hidden.mul(wm).sum(1).div(at::clamp(wm.sum(1), 1e-9)).to(dtype));
    } else if (mode == "lasttoken") {
      auto [values, indices] = mask.flip(1).max(1);
      indices = at::where(values.eq(0), seq - 1, indices);
      at::Tensor gather =
          indices.neg().add(seq - 1).unsqueeze(-1).unsqueeze(1).expand({-1, 1, dim});
      at::Tensor m = mask.unsqueeze(-1).expand_as(hidden).to(dtype);
      outputs.push_back(hidden.mul(m).gather(1, gather).squeeze(1));
    }
  }
  at::Tensor out = outputs.size() == 1 ? outputs[0] : at::cat(outputs, -1);
  if (config.normalize) {
    // F.normalize(p=2, dim=1)
    out = out.div(out.norm(2, {1}, /*keepdim=*/true).clamp_min(1e-12).expand_as(out));
  }
  return out;
}

}  // namespace wbroker::runtime
