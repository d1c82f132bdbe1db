// wbroker HTTP worker: the OpenAI wire format.
#include "wbroker/http/openai_api.h"

#include <fmt/format.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

namespace wbroker::http {
namespace {

using nlohmann::json;

Status Invalid(std::string message) {
  return Status(ErrorCode::kInvalidArgument, std::move(message));
}

Result<json> ParseObject(std::string_view body) {
  json doc;
  try {
    doc = json::parse(body);
  } catch (const json::parse_error& e) {
    return Invalid(fmt::format("the request body is not valid JSON: {}", e.what()));
  }
  if (!doc.is_object()) return Invalid("the request body must be a JSON object");
  return doc;
}

// The field's value, or nullptr when absent or null (both mean "default").
const json* Field(const json& doc, const char* name) {
  auto it = doc.find(name);
  if (it == doc.end() || it->is_null()) return nullptr;
  return &*it;
}

// An integer in [lo, hi]; integral floats such as 16.0 are accepted too.
Result<int64_t> IntField(const json& value, const char* name, int64_t lo, int64_t hi) {
  auto bad = [&] {
    return Invalid(fmt::format("'{}' must be an integer from {} to {}", name, lo, hi));
  };
  if (value.is_number_unsigned()) {
    uint64_t v = value.get<uint64_t>();
    if (v > static_cast<uint64_t>(hi) || static_cast<int64_t>(v) < lo) return bad();
    return static_cast<int64_t>(v);
  }
  if (value.is_number_integer()) {
    int64_t v = value.get<int64_t>();
    if (v < lo || v > hi) return bad();
    return v;
  }
  if (value.is_number_float()) {
    double v = value.get<double>();
    if (std::floor(v) != v || v < static_cast<double>(lo) || v > static_cast<double>(hi))
      return bad();
    return static_cast<int64_t>(v);
  }
  return bad();
}

Result<float> FloatField(const json& value, const char* name, double lo, bool lo_open, double hi) {
  auto bad = [&] {
    return Invalid(
        fmt::format("'{}' must be a number {} {} and <= {}", name, lo_open ? ">" : ">=", lo, hi));
  };
  if (!value.is_number()) return bad();
  double v = value.get<double>();
  if (!std::isfinite(v) || v < lo || (lo_open && v == lo) || v > hi) return bad();
  return static_cast<float>(v);
}

Result<bool> BoolField(const json& value, const char* name) {
  if (!value.is_boolean()) return Invalid(fmt::format("'{}' must be true or false", name));
  return value.get<bool>();
}

Result<std::optional<std::string>> ModelField(const json& doc) {
  const json* model = Field(doc, "model");
  if (!model) return std::optional<std::string>();
  if (!model->is_string()) return Invalid("'model' must be a string");
  return std::optional<std::string>(model->get<std::string>());
}

constexpr size_t kMaxStopStrings = 16;

}  // namespace

Result<CompletionBody> ParseCompletionBody(std::string_view body, const BodyLimits& limits) {
  WB_ASSIGN_OR_RETURN(json doc, ParseObject(body));
  CompletionBody out;
  WB_ASSIGN_OR_RETURN(out.model, ModelField(doc));
  CompletionRequest& req = out.request;

  const json* prompt = Field(doc, "prompt");
  if (!prompt) return Invalid("'prompt' is required");
  if (prompt->is_string()) {
    req.prompt = prompt->get<std::string>();
  } else if (prompt->is_array() && prompt->size() == 1 && (*prompt)[0].is_string()) {
    req.prompt = (*prompt)[0].get<std::string>();
  } else if (prompt->is_array() && prompt->size() > 1 && (*prompt)[0].is_string()) {
    return Invalid("'prompt' holds several prompts; send one string per request");
  } else if (prompt->is_array() && !prompt->empty() && (*prompt)[0].is_number()) {
    return Invalid("'prompt' as token ids is not supported; send a string");
  } else {
    return Invalid("'prompt' must be a string (or a list of one string)");
  }

  if (const json* v = Field(doc, "max_tokens")) {
    WB_ASSIGN_OR_RETURN(int64_t n, IntField(*v, "max_tokens", 1, limits.max_tokens));
    req.max_tokens = static_cast<int>(n);
  }
  if (const json* v = Field(doc, "temperature")) {
    WB_ASSIGN_OR_RETURN(req.temperature, FloatField(*v, "temperature", 0.0, false, 2.0));
  }
  if (const json* v = Field(doc, "top_p")) {
    WB_ASSIGN_OR_RETURN(req.top_p, FloatField(*v, "top_p", 0.0, true, 1.0));
  }
  if (const json* v = Field(doc, "seed")) {
    if (v->is_number_unsigned()) {
      req.seed = v->get<uint64_t>();
    } else {
      WB_ASSIGN_OR_RETURN(int64_t seed,
                          IntField(*v, "seed", 0, std::numeric_limits<int64_t>::max()));
      req.seed = static_cast<uint64_t>(seed);
    }
  }
  if (const json* v = Field(doc, "stop")) {
    auto bad = [] {
      return Invalid(
          fmt::format("'stop' must be a non-empty string or a list of at most {} "
                      "non-empty strings",
                      kMaxStopStrings));
    };
    if (v->is_string()) {
      req.stop.push_back(v->get<std::string>());
    } else if (v->is_array() && v->size() <= kMaxStopStrings) {
      for (const json& s : *v) {
        if (!s.is_string()) return bad();
        req.stop.push_back(s.get<std::string>());
      }
    } else {
      return bad();
    }
    for (const std::string& s : req.stop) {
      if (s.empty()) return bad();
    }
  }
  if (const json* v = Field(doc, "stream")) {
    WB_ASSIGN_OR_RETURN(out.stream, BoolField(*v, "stream"));
  }
  if (const json* v = Field(doc, "stream_options")) {
    if (!v->is_object()) return Invalid("'stream_options' must be an object");
    if (const json* u = Field(*v, "include_usage")) {
      WB_ASSIGN_OR_RETURN(out.include_usage, BoolField(*u, "stream_options.include_usage"));
    }
  }
  // Fields this server cannot honour are refused rather than silently ignored.
  for (const char* name : {"n", "best_of"}) {
    if (const json* v = Field(doc, name); v && !(v->is_number() && *v == 1))
      return Invalid(fmt::format("'{}' must be 1: one completion per request", name));
  }
  if (const json* v = Field(doc, "echo"); v && *v != false)
    return Invalid("'echo' is not supported");
  if (const json* v = Field(doc, "logprobs"); v && *v != false && *v != 0)
    return Invalid("'logprobs' is not supported");
  return out;
}

Result<EmbeddingBody> ParseEmbeddingBody(std::string_view body, const BodyLimits& limits) {
  WB_ASSIGN_OR_RETURN(json doc, ParseObject(body));
  EmbeddingBody out;
  WB_ASSIGN_OR_RETURN(out.model, ModelField(doc));
  const json* input = Field(doc, "input");
  if (!input) return Invalid("'input' is required");
  if (input->is_string()) {
    out.inputs.push_back(input->get<std::string>());
  } else if (input->is_array()) {
    if (input->empty()) return Invalid("'input' must not be an empty list");
    if (input->size() > limits.max_inputs)
      return Invalid(fmt::format("'input' has {} items; at most {} are accepted", input->size(),
                                 limits.max_inputs));
    for (const json& s : *input) {
      if (!s.is_string())
        return Invalid(
            "'input' must be a string or a list of strings (token ids are not "
            "supported)");
      out.inputs.push_back(s.get<std::string>());
    }
  } else {
    return Invalid("'input' must be a string or a list of strings");
  }
  if (const json* v = Field(doc, "encoding_format")) {
    if (*v == "base64") {
      out.base64 = true;
    } else if (*v != "float") {
      return Invalid("'encoding_format' must be \"float\" or \"base64\"");
    }
  }
  if (Field(doc, "dimensions")) return Invalid("'dimensions' is not supported");
  return out;
}

std::string NewCompletionId() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  return fmt::format("cmpl-{:016x}{:08x}", rng(), static_cast<uint32_t>(rng()));
}

json UsageJson(int prompt_tokens, int completion_tokens) {
  return {{"prompt_tokens", prompt_tokens},
          {"completion_tokens", completion_tokens},
          {"total_tokens", prompt_tokens + completion_tokens}};
}

json CompletionJson(const std::string& id, int64_t created, const std::string& model,
                    const CompletionResult& result) {
  return {{"id", id},
          {"object", "text_completion"},
          {"created", created},
          {"model", model},
          {"choices", json::array({{{"index", 0},
                                    {"text", result.text},
                                    {"logprobs", nullptr},
                                    {"finish_reason", result.finish_reason}}})},
          {"usage", UsageJson(result.prompt_tokens, result.completion_tokens)}};
}

json CompletionChunkJson(const std::string& id, int64_t created, const std::string& model,
                         std::string_view text, std::optional<std::string_view> finish_reason) {
  json choice = {{"index", 0}, {"text", text}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
  if (finish_reason) choice["finish_reason"] = *finish_reason;
  return {{"id", id},
          {"object", "text_completion"},
          {"created", created},
          {"model", model},
          {"choices", json::array({std::move(choice)})}};
}

namespace {

std::string Base64Floats(const std::vector<float>& v) {
  static constexpr char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string bytes(v.size() * 4, '\0');
  for (size_t i = 0; i < v.size(); ++i) {
    uint32_t u = std::bit_cast<uint32_t>(v[i]);
    for (int b = 0; b < 4; ++b) bytes[i * 4 + b] = static_cast<char>((u >> (8 * b)) & 0xff);
  }
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  for (size_t i = 0; i < bytes.size(); i += 3) {
    uint32_t n = static_cast<uint8_t>(bytes[i]) << 16;
    if (i + 1 < bytes.size()) n |= static_cast<uint8_t>(bytes[i + 1]) << 8;
    if (i + 2 < bytes.size()) n |= static_cast<uint8_t>(bytes[i + 2]);
    out.push_back(kAlphabet[(n >> 18) & 63]);
    out.push_back(kAlphabet[(n >> 12) & 63]);
    out.push_back(i + 1 < bytes.size() ? kAlphabet[(n >> 6) & 63] : '=');
    out.push_back(i + 2 < bytes.size() ? kAlphabet[n & 63] : '=');
  }
  return out;
}

}  // namespace

json EmbeddingsJson(const std::string& model, const std::vector<std::vector<float>>& vectors,
                    bool base64) {
  json data = json::array();
  for (size_t i = 0; i < vectors.size(); ++i) {
    json embedding = base64 ? json(Base64Floats(vectors[i])) : json(vectors[i]);
    data.push_back({{"object", "embedding"}, {"index", i}, {"embedding", std::move(embedding)}});
  }
  // Engine::Embed() reports no token counts.
  return {{"object", "list"},
          {"data", std::move(data)},
          {"model", model},
          {"usage", {{"prompt_tokens", 0}, {"total_tokens", 0}}}};
}

json ModelsJson(const std::string& name, const ModelInfo& info,
                const std::vector<std::string>& aliases, int64_t created) {
  json model = {{"id", name},          {"object", "model"},
                {"created", created},  {"owned_by", "wbroker"},
                {"root", info.id},     {"revision", info.revision},
                {"kind", info.kind},   {"device", info.device},
                {"dtype", info.dtype}, {"aliases", aliases}};
  return {{"object", "list"}, {"data", json::array({std::move(model)})}};
}

size_t CompleteUtf8Prefix(std::string_view text) {
  size_t n = text.size();
  for (size_t back = 1; back <= 4 && back <= n; ++back) {
    auto c = static_cast<unsigned char>(text[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // a continuation byte: look further back
    size_t need = c < 0x80           ? 1
                  : (c >> 5) == 0x6  ? 2
                  : (c >> 4) == 0xE  ? 3
                  : (c >> 3) == 0x1E ? 4
                                     : 1;
    return back < need ? n - back : n;
  }
  return n;  // no lead byte in the last four: invalid anyway, pass it on
}

}  // namespace wbroker::http
