// wbroker-worker: TorchEngine: tokenizer + libtorch runtime behind http::Engine.
#include "torch_engine.h"

#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <span>
#include <sstream>
#include <string_view>

#include "wbroker/client/client.h"
#include "wbroker/common/hf_cache.h"
#include "wbroker/runtime/decoder_model.h"
#include "wbroker/runtime/encoder_model.h"
#include "wbroker/runtime/generator.h"
#include "wbroker/runtime/model_config.h"
#include "wbroker/runtime/weights.h"
#include "wbroker/tokenizer/tokenizer.h"

namespace wbroker::app {
namespace {

namespace fs = std::filesystem;
using tokenizer::Tokenizer;

std::string DTypeName(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat:
      return "float32";
    case c10::kBFloat16:
      return "bfloat16";
    case c10::kHalf:
      return "float16";
    case c10::kDouble:
      return "float64";
    default:
      return c10::toString(t);
  }
}

/// The last U+FFFD bytes: a decode ending in it may still be waiting for the
/// rest of a multi-byte character spread over several tokens.
bool EndsWithReplacement(std::string_view s) {
  return s.size() >= 3 && s.substr(s.size() - 3) == "\xEF\xBF\xBD";
}

/// Moves `pos` back to the start of the UTF-8 character it points into.
size_t CharBoundary(std::string_view s, size_t pos) {
  while (pos > 0 && pos < s.size() && (static_cast<unsigned char>(s[pos]) & 0xC0) == 0x80) --pos;
  return pos;
}

/// Incremental detokenization (the prefix/read-offset scheme of vLLM and
/// text-generation-inference): each step decodes a short window that starts
/// a few tokens back, so tokenizers whose decoders depend on context (e.g.
/// Metaspace's leading space) decode as they would the whole sequence, and
/// text is released only once it does not end in a partial character.
class IncrementalDecoder {
 public:
  IncrementalDecoder(const Tokenizer& tok, std::vector<int32_t> prompt_ids)
      : tok_(tok), ids_(std::move(prompt_ids)) {
    read_ = ids_.size();
    prefix_ = read_ > kContext ? read_ - kContext : 0;
  }

  /// Adds a generated token; returns the text it completes (often "").
  std::string Push(int32_t token) {
    ids_.push_back(token);
    return Step(/*final=*/false);
  }
  /// Text still held back at the end of generation (a partial character).
  std::string Flush() { return Step(/*final=*/true); }

 private:
  static constexpr size_t kContext = 5;  ///< tokens of left context in each window

  std::string Step(bool final) {
    std::span<const int32_t> all(ids_);
    std::string before = tok_.Decode(all.subspan(prefix_, read_ - prefix_), true);
    std::string now = tok_.Decode(all.subspan(prefix_), true);
    if (now.size() <= before.size()) return "";  // nothing new, e.g. a skipped special token
    if (!final && EndsWithReplacement(now)) return "";
    prefix_ = read_;
    read_ = ids_.size();
    return now.substr(before.size());
  }

  const Tokenizer& tok_;
  std::vector<int32_t> ids_;  ///< prompt + generated ids
  size_t prefix_ = 0;         ///< window start
  size_t read_ = 0;           ///< ids before this are already turned into text
};

/// Generated text with stop strings: finds the first stop string, and holds
/// back a tail that could still become one, so no stop text is ever streamed.
class StopScanner {
 public:
  explicit StopScanner(const std::vector<std::string>& stops) {
    for (const auto& s : stops)
      if (!s.empty()) stops_.push_back(s);
  }

  /// Appends `delta`; true once a stop string occurs (the text is cut before it).
  bool Append(std::string_view delta) {
    if (stopped_) return true;
    size_t from = text_.size();
    text_.append(delta);
    size_t cut = std::string::npos;
    for (const auto& s : stops_) {
      size_t start = from >= s.size() - 1 ? from - (s.size() - 1) : 0;
      size_t at = text_.find(s, start);
      if (at != std::string::npos) cut = std::min(cut, at);
    }
    if (cut != std::string::npos) {
      text_.resize(cut);
      stopped_ = true;
    }
    return stopped_;
  }

  /// The next piece that is safe to send (complete characters, not a
  /// possible start of a stop string); `all` releases everything left.
  std::string TakeReady(bool all) {
    size_t end = text_.size();
    if (!all && !stopped_) {
      // Longest tail of text_ that is a proper prefix of a stop string.
      size_t hold = 0;
      for (const auto& s : stops_) {
        for (size_t n = std::min(s.size() - 1, text_.size()); n > hold; --n) {
          if (text_.compare(text_.size() - n, n, s, 0, n) == 0) {
            hold = n;
            break;
          }
        }
      }
      end = CharBoundary(text_, text_.size() - hold);
    }
    if (end <= sent_) return "";
    std::string out = text_.substr(sent_, end - sent_);
    sent_ = end;
    return out;
  }

  const std::string& text() const { return text_; }
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;  ///< non-empty stop strings
  std::string text_;                ///< generated text so far (cut at a stop string)
  size_t sent_ = 0;                 ///< bytes of text_ already released
  bool stopped_ = false;            ///< a stop string was found
};

Result<std::string> ReadText(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return ErrnoStatus("cannot open " + path.string());
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

/// Encoder input limit: sentence_bert_config.json's max_seq_length, else the
/// tokenizer's truncation, else the position table; never beyond the latter.
Result<size_t> EncoderMaxLength(const fs::path& snapshot, const Tokenizer& tok,
                                const runtime::ModelConfig& config) {
  size_t limit = static_cast<size_t>(config.max_position_embeddings);
  std::optional<size_t> wanted = tok.truncation_max_length();
  const fs::path st = snapshot / "sentence_bert_config.json";
  if (fs::exists(st)) {
    WB_ASSIGN_OR_RETURN(std::string text, ReadText(st));
    auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object())
      return Status(ErrorCode::kInvalidArgument, st.string() + ": not a JSON object");
    if (j.contains("max_seq_length") && j["max_seq_length"].is_number_integer() &&
        j["max_seq_length"].get<int64_t>() > 0)
      wanted = j["max_seq_length"].get<size_t>();
  }
  if (wanted) limit = std::min(limit, *wanted);
  if (limit < 2) return Status(ErrorCode::kInvalidArgument, "encoder max length below 2 tokens");
  return limit;
}

}  // namespace

struct TorchEngine::State {
  std::shared_ptr<client::Client> client;                ///< keeps the broker connection open
  std::shared_ptr<const client::Lease> lease;            ///< null for --from-disk
  http::ModelInfo info;                                  ///< what /v1/models reports
  std::string source;                                    ///< for the startup log
  std::unique_ptr<Tokenizer> tok;                        ///< the model's tokenizer.json
  std::shared_ptr<const runtime::DecoderModel> decoder;  ///< decoder models
  std::unique_ptr<runtime::Generator> generator;         ///< decoder models
  std::unique_ptr<runtime::EncoderModel> encoder;        ///< encoder models
  size_t max_length = 0;                                 ///< encoder input limit (tokens)
  size_t context_length = 0;              ///< decoder: max_position_embeddings (0 = no limit known)
  size_t embed_batch = 32;                ///< encoder batch size
  std::atomic<uint64_t> seed_counter{0};  ///< seeds for requests without one
  uint64_t seed_base = 0;                 ///< random per process
};

TorchEngine::TorchEngine(std::unique_ptr<State> state) : state_(std::move(state)) {}
TorchEngine::~TorchEngine() = default;

Result<std::unique_ptr<TorchEngine>> TorchEngine::Create(const TorchEngineOptions& options) {
  auto st = std::make_unique<State>();
  st->client = options.client;
  st->embed_batch = std::max<size_t>(1, options.embed_batch_size);
  st->info.id = options.model;
  st->seed_base = std::random_device{}();
  if (options.intra_op_threads > 0) at::set_num_threads(static_cast<int>(options.intra_op_threads));

  const std::string label =
      options.model + (options.revision.empty() ? "" : "@" + options.revision);
  fs::path snapshot;
  runtime::WeightMap weights;
  if (options.client) {
    auto lease = options.client->Attach(options.model, options.revision, options.device);
    if (!lease.ok()) return lease.status().WithContext("attaching " + label);
    st->lease = std::shared_ptr<const client::Lease>(std::move(lease).value());
    snapshot = st->lease->snapshot_dir();
    st->info.revision = st->lease->revision();
    st->info.device = st->lease->device();
    st->info.backend = st->lease->backend();
    st->info.weights = "attached";
    st->source = "broker " + st->lease->backend() + " arena (" +
                 std::to_string(st->lease->arena_size() >> 20) + " MiB, shared)";
    auto w = runtime::WeightsFromLease(st->lease);
    if (!w.ok()) return w.status().WithContext(label);
    weights = std::move(w).value();
  } else {
    fs::path cache = options.cache_dir.empty() ? HubCacheDir() : fs::path(options.cache_dir);
    auto resolved = ResolveModel(cache, options.model, options.revision);
    if (!resolved.ok()) return resolved.status();
    snapshot = resolved->snapshot_dir;
    st->info.revision = resolved->commit;
    st->info.device = options.device.empty() ? "cpu" : options.device;
    st->info.backend = "none";
    st->info.weights = "disk";
    st->source = "private copy read from " + snapshot.string();
    auto w = runtime::WeightsFromFiles(snapshot, /*private_copy=*/true);
    if (!w.ok()) return w.status().WithContext(label);
    weights = std::move(w).value();
    if (st->info.device != "cpu") {
      try {
        c10::Device device(st->info.device);
        for (auto& [name, t] : weights) t = t.to(device);
      } catch (const std::exception& e) {
        return Status(ErrorCode::kInvalidArgument,
                      "--device " + st->info.device + ": " + std::string(e.what()));
      }
    }
  }

  auto config = runtime::ModelConfig::FromFile(snapshot);
  if (!config.ok()) return config.status();
  auto tok = Tokenizer::FromFile((snapshot / "tokenizer.json").string());
  if (!tok.ok()) return tok.status().WithContext(label);
  st->tok = std::move(tok).value();

  if (config->is_decoder()) {
    st->info.kind = "decoder";
    st->context_length = static_cast<size_t>(std::max<int64_t>(0, config->max_position_embeddings));
    auto defaults = runtime::LoadGenerationDefaults(snapshot, *config);
    if (!defaults.ok()) return defaults.status();
    auto model = runtime::DecoderModel::Create(*config, std::move(weights));
    if (!model.ok()) return model.status().WithContext(label);
    st->info.dtype = DTypeName((*model)->dtype());
    st->decoder = std::shared_ptr<const runtime::DecoderModel>(std::move(model).value());
    auto gen = runtime::Generator::Create(st->decoder, std::move(defaults).value());
    if (!gen.ok()) return gen.status();
    st->generator = std::move(gen).value();
  } else {
    st->info.kind = "encoder";
    if (!weights.empty()) st->info.dtype = DTypeName(weights.begin()->second.scalar_type());
    auto limit = EncoderMaxLength(snapshot, *st->tok, *config);
    if (!limit.ok()) return limit.status();
    st->max_length = *limit;
    auto model = runtime::EncoderModel::Load(snapshot, std::move(weights));
    if (!model.ok()) return model.status().WithContext(label);
    st->encoder = std::move(model).value();
  }
  return std::unique_ptr<TorchEngine>(new TorchEngine(std::move(st)));
}

http::ModelInfo TorchEngine::Info() const {
  return state_->info;
}

bool TorchEngine::Ready() const {
  return true;
}

std::string TorchEngine::weights_source() const {
  return state_->source;
}

bool TorchEngine::LeaseLost() const {
  return state_->lease && state_->lease->released();
}

std::optional<client::SupersededEvent> TorchEngine::Superseded() const {
  return state_->lease ? state_->lease->superseded_event() : std::nullopt;
}

Result<http::CompletionResult> TorchEngine::Complete(const http::CompletionRequest& req,
                                                     const http::TextCallback& on_text) {
  if (!state_->generator)
    return Status(ErrorCode::kInvalidArgument, state_->info.id + " does not generate text");
  const Tokenizer& tok = *state_->tok;
  // As transformers' tokenizer(prompt): the post-processor decides which
  // special tokens are added (none for Qwen2/GPT-2 byte-level BPE, <s> for Llama).
  std::vector<int32_t> prompt_ids = tok.Encode(req.prompt, /*add_special_tokens=*/true);
  if (prompt_ids.empty())
    return Status(ErrorCode::kInvalidArgument, "the prompt is empty (it encodes to no tokens)");
  // As OpenAI's API: a request that cannot fit the context is refused up
  // front rather than generating past the positions the model was trained on.
  if (const size_t ctx = state_->context_length;
      ctx > 0 && prompt_ids.size() + static_cast<size_t>(req.max_tokens) > ctx)
    return Status(ErrorCode::kInvalidArgument,
                  "this model's maximum context length is " + std::to_string(ctx) +
                      " tokens, but the request asks for " + std::to_string(prompt_ids.size()) +
                      " prompt tokens + " + std::to_string(req.max_tokens) +
                      " max_tokens; shorten the prompt or lower max_tokens");

  runtime::GenerationOptions options;
  options.max_new_tokens = req.max_tokens;
  options.sampling = state_->generator->defaults().sampling;
  if (req.temperature <= 0) {
    options.sampling.do_sample = false;
  } else {
    options.sampling.do_sample = true;
    options.sampling.temperature = req.temperature;
    options.sampling.top_p = req.top_p;
    options.sampling.seed =
        req.seed ? *req.seed : state_->seed_base + state_->seed_counter.fetch_add(1);
  }

  IncrementalDecoder decoder(tok, prompt_ids);
  StopScanner text(req.stop);
  bool client_gone = false;
  auto release = [&](bool all) {
    std::string piece = text.TakeReady(all);
    if (!piece.empty() && on_text && !on_text(piece)) client_gone = true;
  };
  auto on_token = [&](int32_t token) {
    if (text.Append(decoder.Push(token))) {
      release(true);
      return false;  // a stop string: generation ends here
    }
    release(false);
    return !client_gone;
  };
  auto generated = state_->generator->Generate(prompt_ids, options, on_token);
  if (!generated.ok()) return generated.status();
  if (client_gone) return Status(ErrorCode::kUnavailable, "the client went away");
  if (!text.stopped()) text.Append(decoder.Flush());
  release(true);

  http::CompletionResult result;
  result.text =
      req.echo ? tok.Decode(prompt_ids, /*skip_special_tokens=*/true) + text.text() : text.text();
  result.prompt_tokens = static_cast<int>(prompt_ids.size());
  result.completion_tokens = static_cast<int>(generated->tokens.size());
  result.finish_reason =
      text.stopped() || generated->finish_reason == runtime::FinishReason::kEos ? "stop" : "length";
  return result;
}

Result<std::vector<std::vector<float>>> TorchEngine::Embed(const std::vector<std::string>& inputs) {
  if (!state_->encoder)
    return Status(ErrorCode::kInvalidArgument, state_->info.id + " does not produce embeddings");
  const Tokenizer& tok = *state_->tok;
  const size_t limit = state_->max_length;
  std::vector<std::vector<float>> out;
  out.reserve(inputs.size());
  for (size_t begin = 0; begin < inputs.size(); begin += state_->embed_batch) {
    size_t end = std::min(inputs.size(), begin + state_->embed_batch);
    std::vector<std::vector<int32_t>> batch;
    batch.reserve(end - begin);
    for (size_t i = begin; i < end; ++i) {
      std::vector<int32_t> ids = tok.Encode(inputs[i], /*add_special_tokens=*/true);
      if (ids.size() > limit) {
        // Keep [CLS] ... [SEP], as sentence-transformers truncates the text
        // tokens and then adds the special ones.
        bool sep = tok.IsSpecialId(ids.back());
        int32_t last = ids.back();
        ids.resize(sep ? limit - 1 : limit);
        if (sep) ids.push_back(last);
      }
      batch.push_back(std::move(ids));
    }
    auto vectors = state_->encoder->Embed(batch);
    if (!vectors.ok()) return vectors.status();
    for (auto& v : *vectors) out.push_back(std::move(v));
  }
  return out;
}

}  // namespace wbroker::app
