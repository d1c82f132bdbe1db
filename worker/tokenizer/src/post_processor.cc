// wbroker tokenizer: the post-processors for single sequences:
// TemplateProcessing, BertProcessing, RobertaProcessing, ByteLevel and Sequence.
#include "wbroker/tokenizer/post_processor.h"

#include "wbroker/tokenizer/json_util.h"

namespace wbroker::tokenizer {

namespace {

/// A fixed list of ids before and after the sequence (Template, Bert, Roberta).
class WrapProcessor : public PostProcessor {
 public:
  WrapProcessor(std::vector<int32_t> before, std::vector<int32_t> after)
      : before_(std::move(before)), after_(std::move(after)) {}
  void Process(std::vector<int32_t>* ids) const override {
    ids->insert(ids->begin(), before_.begin(), before_.end());
    ids->insert(ids->end(), after_.begin(), after_.end());
  }

 private:
  std::vector<int32_t> before_;  ///< ids prepended
  std::vector<int32_t> after_;   ///< ids appended
};

/// ByteLevel post-processing changes offsets only: ids pass through.
class NoopProcessor : public PostProcessor {
 public:
  void Process(std::vector<int32_t>*) const override {}
};

/// Sequence: the processors in order.
class SequenceProcessor : public PostProcessor {
 public:
  explicit SequenceProcessor(std::vector<std::unique_ptr<PostProcessor>> steps)
      : steps_(std::move(steps)) {}
  void Process(std::vector<int32_t>* ids) const override {
    for (const auto& s : steps_) s->Process(ids);
  }

 private:
  std::vector<std::unique_ptr<PostProcessor>> steps_;  ///< applied first to last
};

/// A ["token", id] pair of Bert/RobertaProcessing.
Result<int32_t> PairId(const nlohmann::json& j, std::string_view component, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_array() || it->size() != 2 || !(*it)[1].is_number_integer()) {
    return JsonError(std::string(component) + " field '" + key + "' is not [token, id]");
  }
  return static_cast<int32_t>((*it)[1].get<int64_t>());
}

Result<std::unique_ptr<PostProcessor>> ParseTemplate(const nlohmann::json& j) {
  constexpr std::string_view kWhat = "TemplateProcessing post_processor";
  WB_ASSIGN_OR_RETURN(const nlohmann::json* single, GetArray(j, kWhat, "single"));
  auto specials = j.find("special_tokens");
  std::vector<int32_t> before, after;
  bool seen_sequence = false;
  for (const auto& piece : *single) {
    if (!piece.is_object() || piece.size() != 1) {
      return JsonError(std::string(kWhat) + " single entry is not {SpecialToken|Sequence: ...}");
    }
    if (piece.contains("Sequence")) {
      if (seen_sequence) return JsonError(std::string(kWhat) + " single has two sequences");
      seen_sequence = true;
      continue;
    }
    auto st = piece.find("SpecialToken");
    if (st == piece.end() || !st->is_object() || !st->contains("id") || !(*st)["id"].is_string()) {
      return JsonError(std::string(kWhat) + " single entry is not {SpecialToken|Sequence: ...}");
    }
    const std::string name = (*st)["id"].get<std::string>();
    if (specials == j.end() || !specials->is_object() || !specials->contains(name)) {
      return JsonError(std::string(kWhat) + " special token '" + name +
                       "' is missing from special_tokens");
    }
    const auto& entry = (*specials)[name];
    auto ids = entry.find("ids");
    if (ids == entry.end() || !ids->is_array()) {
      return JsonError(std::string(kWhat) + " special token '" + name + "' has no ids");
    }
    for (const auto& id : *ids) {
      if (!id.is_number_integer()) {
        return JsonError(std::string(kWhat) + " special token '" + name + "' has a bad id");
      }
      (seen_sequence ? after : before).push_back(static_cast<int32_t>(id.get<int64_t>()));
    }
  }
  if (!seen_sequence) return JsonError(std::string(kWhat) + " single has no Sequence");
  return std::unique_ptr<PostProcessor>(new WrapProcessor(std::move(before), std::move(after)));
}

}  // namespace

Result<std::unique_ptr<PostProcessor>> ParsePostProcessor(const nlohmann::json& j) {
  constexpr std::string_view kWhat = "post_processor";
  using Ptr = std::unique_ptr<PostProcessor>;
  if (j.is_null()) return Ptr();
  WB_ASSIGN_OR_RETURN(std::string type, TypeOf(j, kWhat));
  if (type == "TemplateProcessing") return ParseTemplate(j);
  if (type == "BertProcessing" || type == "RobertaProcessing") {
    const std::string what = type + " post_processor";
    WB_ASSIGN_OR_RETURN(int32_t cls, PairId(j, what, "cls"));
    WB_ASSIGN_OR_RETURN(int32_t sep, PairId(j, what, "sep"));
    return Ptr(new WrapProcessor({cls}, {sep}));
  }
  if (type == "ByteLevel") return Ptr(new NoopProcessor());
  if (type == "Sequence") {
    WB_ASSIGN_OR_RETURN(const nlohmann::json* list,
                        GetArray(j, "Sequence post_processor", "processors"));
    std::vector<Ptr> steps;
    for (const auto& item : *list) {
      WB_ASSIGN_OR_RETURN(Ptr step, ParsePostProcessor(item));
      if (step) steps.push_back(std::move(step));
    }
    return Ptr(new SequenceProcessor(std::move(steps)));
  }
  return UnsupportedType(kWhat, type);
}

}  // namespace wbroker::tokenizer
