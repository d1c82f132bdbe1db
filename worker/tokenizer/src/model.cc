// wbroker tokenizer: Vocab and the "model" dispatch by type.
#include "wbroker/tokenizer/model.h"

#include "wbroker/tokenizer/bpe_model.h"
#include "wbroker/tokenizer/json_util.h"
#include "wbroker/tokenizer/wordpiece_model.h"

namespace wbroker::tokenizer {

namespace {
// Ids index a dense table; refuse absurd ones rather than allocate gigabytes.
constexpr int64_t kMaxId = 1 << 26;
}  // namespace

void Vocab::Add(std::string token, int32_t id) {
  if (static_cast<size_t>(id) >= tokens_.size()) {
    tokens_.resize(static_cast<size_t>(id) + 1);
    has_.resize(static_cast<size_t>(id) + 1, 0);
  }
  tokens_[id] = token;
  has_[id] = 1;
  map_[std::move(token)] = id;
}

Result<Vocab> Vocab::FromJson(const nlohmann::json& j, std::string_view component) {
  if (!j.is_object()) return JsonError(std::string(component) + " vocab is not an object");
  Vocab v;
  v.map_.reserve(j.size());
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() >= kMaxId) {
      return JsonError(std::string(component) + " vocab entry '" + it.key() + "' has no valid id");
    }
    v.Add(it.key(), static_cast<int32_t>(it.value().get<int64_t>()));
  }
  return v;
}

Result<std::unique_ptr<Model>> ParseModel(const nlohmann::json& j) {
  if (j.is_null()) return JsonError("model is missing");
  WB_ASSIGN_OR_RETURN(std::string type, TypeOf(j, "model"));
  if (type == "BPE") {
    WB_ASSIGN_OR_RETURN(auto m, BpeModel::FromJson(j));
    return std::unique_ptr<Model>(std::move(m));
  }
  if (type == "WordPiece") {
    WB_ASSIGN_OR_RETURN(auto m, WordPieceModel::FromJson(j));
    return std::unique_ptr<Model>(std::move(m));
  }
  return UnsupportedType("model", type);
}

}  // namespace wbroker::tokenizer
