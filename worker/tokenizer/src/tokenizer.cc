// wbroker tokenizer: Tokenizer: tokenizer.json loading and the
// encode/decode pipeline.
#include "wbroker/tokenizer/tokenizer.h"

#include <nlohmann/json.hpp>

#include <fstream>
#include <sstream>

#include "wbroker/tokenizer/added_vocabulary.h"
#include "wbroker/tokenizer/decoder.h"
#include "wbroker/tokenizer/json_util.h"
#include "wbroker/tokenizer/model.h"
#include "wbroker/tokenizer/normalizer.h"
#include "wbroker/tokenizer/post_processor.h"
#include "wbroker/tokenizer/pre_tokenizer.h"
#include "wbroker/tokenizer/unicode.h"

namespace wbroker::tokenizer {

namespace {

const nlohmann::json& Field(const nlohmann::json& j, const char* key) {
  static const nlohmann::json kNull;
  auto it = j.find(key);
  return it == j.end() ? kNull : *it;
}

}  // namespace

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;

Result<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& tokenizer_json_path) {
  std::ifstream in(tokenizer_json_path, std::ios::binary);
  if (!in) return ErrnoStatus("cannot open tokenizer file " + tokenizer_json_path);
  std::ostringstream buf;
  buf << in.rdbuf();
  if (in.bad()) return ErrnoStatus("cannot read tokenizer file " + tokenizer_json_path);
  auto t = FromJson(buf.str());
  if (!t.ok()) return t.status().WithContext(tokenizer_json_path);
  return t;
}

Result<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(std::string_view json_text) {
  // nlohmann throws on malformed input and bad accesses: nothing escapes this boundary.
  try {
    nlohmann::json j = nlohmann::json::parse(json_text.begin(), json_text.end(), nullptr,
                                             /*allow_exceptions=*/false);
    if (j.is_discarded()) return JsonError("not valid JSON");
    if (!j.is_object()) return JsonError("top level is not an object");
    std::unique_ptr<Tokenizer> t(new Tokenizer());
    const nlohmann::json& model = Field(j, "model");
    if (model.is_null()) return JsonError("model is missing");
    WB_ASSIGN_OR_RETURN(t->model_, ParseModel(model));
    WB_ASSIGN_OR_RETURN(t->normalizer_, ParseNormalizer(Field(j, "normalizer")));
    WB_ASSIGN_OR_RETURN(t->pre_tokenizer_, ParsePreTokenizer(Field(j, "pre_tokenizer")));
    WB_ASSIGN_OR_RETURN(t->post_processor_, ParsePostProcessor(Field(j, "post_processor")));
    WB_ASSIGN_OR_RETURN(t->decoder_, ParseDecoder(Field(j, "decoder")));
    WB_ASSIGN_OR_RETURN(
        AddedVocabulary added,
        AddedVocabulary::FromJson(Field(j, "added_tokens"), *t->model_, t->normalizer_.get()));
    t->added_ = std::make_unique<AddedVocabulary>(std::move(added));
    const nlohmann::json& trunc = Field(j, "truncation");
    if (trunc.is_object()) {
      WB_ASSIGN_OR_RETURN(uint64_t max_length, GetUint(trunc, "truncation", "max_length"));
      t->truncation_max_length_ = max_length;
    }
    t->vocab_size_ = t->model_->vocab().size();
    for (const auto& tok : t->added_->tokens()) {
      if (!t->model_->vocab().Find(tok.content)) ++t->vocab_size_;
    }
    return t;
  } catch (const std::exception& e) {
    return JsonError(std::string("malformed: ") + e.what());
  }
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool add_special_tokens) const {
  const std::string valid = unicode::ToValidUtf8(text);
  std::vector<int32_t> ids;
  ids.reserve(valid.size() / 3 + 4);
  std::vector<std::string> words;
  for (auto& piece : added_->ExtractAndNormalize(valid, normalizer_.get())) {
    if (piece.id >= 0) {
      ids.push_back(piece.id);
      continue;
    }
    words.clear();
    words.push_back(std::move(piece.text));
    if (pre_tokenizer_) pre_tokenizer_->PreTokenize(&words);
    for (const auto& w : words) {
      if (!w.empty()) model_->Tokenize(w, &ids);
    }
  }
  if (add_special_tokens && post_processor_) post_processor_->Process(&ids);
  return ids;
}

std::string Tokenizer::Decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    const std::string* token = nullptr;
    if (const AddedToken* added = added_->ById(id)) {
      token = &added->content;
    } else {
      token = model_->vocab().Token(id);
    }
    if (token == nullptr) continue;
    if (skip_special_tokens && added_->IsSpecialContent(*token)) continue;
    tokens.push_back(*token);
  }
  std::string out;
  if (decoder_) {
    decoder_->DecodeChain(&tokens);
    for (const auto& t : tokens) out += t;
  } else {
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (i) out.push_back(' ');
      out += tokens[i];
    }
  }
  return out;
}

std::optional<int32_t> Tokenizer::TokenToId(std::string_view token) const {
  if (auto id = added_->TokenToId(token)) return id;
  return model_->vocab().Find(token);
}

std::string Tokenizer::IdToToken(int32_t id) const {
  if (const AddedToken* added = added_->ById(id)) return added->content;
  const std::string* t = model_->vocab().Token(id);
  return t ? *t : std::string();
}

size_t Tokenizer::vocab_size() const {
  return vocab_size_;
}

bool Tokenizer::IsSpecialId(int32_t id) const {
  const AddedToken* added = added_->ById(id);
  return added != nullptr && added->special;
}

}  // namespace wbroker::tokenizer
