// wbroker tokenizer: BPE: merge table, per-word merging with a priority
// queue over a linked list of symbols (as tokenizers' Word::merge_all), and
// the bounded word cache.
#include "wbroker/tokenizer/bpe_model.h"

#include <cstdio>
#include <mutex>
#include <queue>

#include "wbroker/tokenizer/json_util.h"
#include "wbroker/tokenizer/unicode.h"

namespace wbroker::tokenizer {

namespace {

// Words this long or longer are not cached (tokenizers' MAX_LENGTH).
constexpr size_t kMaxCachedWordBytes = 256;

struct Symbol {
  int32_t id;
  int32_t prev;  ///< index of the previous live symbol, -1 at the start
  int32_t next;  ///< index of the next live symbol, -1 at the end
  bool live;     ///< false once merged into its left neighbour
};

struct QueuedMerge {
  int32_t rank;
  int32_t pos;  ///< index of the left symbol
  int32_t new_id;
  // std::priority_queue pops the largest: invert so the lowest rank, then
  // the leftmost position, comes first.
  bool operator<(const QueuedMerge& o) const {
    return rank != o.rank ? rank > o.rank : pos > o.pos;
  }
};

}  // namespace

Result<std::unique_ptr<BpeModel>> BpeModel::FromJson(const nlohmann::json& j) {
  constexpr std::string_view kWhat = "BPE model";
  auto vit = j.find("vocab");
  if (vit == j.end()) return JsonError("BPE model has no vocab");
  WB_ASSIGN_OR_RETURN(Vocab vocab, Vocab::FromJson(*vit, kWhat));
  Options opt;
  WB_ASSIGN_OR_RETURN(opt.unk_token, GetOptionalString(j, kWhat, "unk_token"));
  WB_ASSIGN_OR_RETURN(opt.continuing_subword_prefix,
                      GetString(j, kWhat, "continuing_subword_prefix", std::string()));
  WB_ASSIGN_OR_RETURN(opt.end_of_word_suffix,
                      GetString(j, kWhat, "end_of_word_suffix", std::string()));
  WB_ASSIGN_OR_RETURN(opt.fuse_unk, GetBool(j, kWhat, "fuse_unk", false));
  WB_ASSIGN_OR_RETURN(opt.byte_fallback, GetBool(j, kWhat, "byte_fallback", false));
  WB_ASSIGN_OR_RETURN(opt.ignore_merges, GetBool(j, kWhat, "ignore_merges", false));
  if (auto d = j.find("dropout"); d != j.end() && !d->is_null()) {
    if (!d->is_number() || d->get<double>() != 0.0) {
      return Status(ErrorCode::kUnsupported, "tokenizer.json: BPE model dropout is not supported");
    }
  }
  WB_ASSIGN_OR_RETURN(const nlohmann::json* merges_json, GetArray(j, kWhat, "merges"));
  std::vector<std::pair<std::string, std::string>> merges;
  merges.reserve(merges_json->size());
  for (const auto& m : *merges_json) {
    if (m.is_string()) {
      const auto& s = m.get_ref<const std::string&>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
        return JsonError("BPE model merge '" + s + "' is not two space-separated tokens");
      }
      merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
    } else {
      return JsonError("BPE model merges entry is neither \"a b\" nor [\"a\", \"b\"]");
    }
  }
  return Create(std::move(vocab), merges, std::move(opt));
}

Result<std::unique_ptr<BpeModel>> BpeModel::Create(
    Vocab vocab, const std::vector<std::pair<std::string, std::string>>& merges, Options options) {
  if (options.unk_token && !vocab.Find(*options.unk_token)) {
    return JsonError("BPE model unk_token '" + *options.unk_token + "' is not in the vocab");
  }
  std::unique_ptr<BpeModel> m(new BpeModel(std::move(vocab), std::move(options)));
  m->merges_.reserve(merges.size());
  const size_t prefix_len = m->options_.continuing_subword_prefix.size();
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [a, b] = merges[rank];
    auto a_id = m->vocab_.Find(a);
    auto b_id = m->vocab_.Find(b);
    if (!a_id || !b_id) {
      return JsonError("BPE model merge '" + a + " " + b + "' uses a token not in the vocab");
    }
    if (b.size() < prefix_len) {
      return JsonError("BPE model merge '" + a + " " + b + "' lacks the subword prefix");
    }
    auto new_id = m->vocab_.Find(a + b.substr(prefix_len));
    if (!new_id) {
      return JsonError("BPE model merge '" + a + " " + b + "' makes a token not in the vocab");
    }
    // A repeated pair keeps its last rank, as tokenizers' HashMap collect does.
    m->merges_[PairKey(*a_id, *b_id)] = MergeInfo{static_cast<int32_t>(rank), *new_id};
  }
  return m;
}

std::vector<int32_t> BpeModel::MergeWord(std::string_view word) const {
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  auto push = [&](int32_t id) {
    const int32_t idx = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, idx - 1, -1, true});
    if (idx > 0) symbols[idx - 1].next = idx;
  };
  std::optional<int32_t> unk_id;
  if (options_.unk_token) unk_id = vocab_.Find(*options_.unk_token);
  bool pending_unk = false;
  std::string piece;
  for (size_t i = 0; i < word.size();) {
    const size_t start = i;
    unicode::NextCodePoint(word, &i);
    piece.clear();
    if (start > 0) piece += options_.continuing_subword_prefix;
    piece.append(word.substr(start, i - start));
    if (i == word.size()) piece += options_.end_of_word_suffix;
    if (auto id = vocab_.Find(piece)) {
      if (pending_unk) push(*unk_id);
      pending_unk = false;
      push(*id);
      continue;
    }
    if (options_.byte_fallback) {
      std::vector<int32_t> bytes;
      for (unsigned char b : piece) {
        char code[8];
        snprintf(code, sizeof(code), "<0x%02X>", b);
        auto id = vocab_.Find(code);
        if (!id) break;
        bytes.push_back(*id);
      }
      if (bytes.size() == piece.size()) {
        // tokenizers keeps a pending unk across byte-fallback pieces.
        for (int32_t id : bytes) push(id);
        continue;
      }
    }
    if (unk_id) {
      if (pending_unk && !options_.fuse_unk) push(*unk_id);
      pending_unk = true;
    }
  }
  if (pending_unk) push(*unk_id);

  std::priority_queue<QueuedMerge> queue;
  auto consider = [&](int32_t left) {
    const int32_t right = symbols[left].next;
    if (right < 0) return;
    auto it = merges_.find(PairKey(symbols[left].id, symbols[right].id));
    if (it != merges_.end()) queue.push({it->second.rank, left, it->second.new_id});
  };
  for (int32_t k = 0; k + 1 < static_cast<int32_t>(symbols.size()); ++k) consider(k);
  while (!queue.empty()) {
    const QueuedMerge top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (!left.live || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    // Skip stale entries: the pair at this position changed since it was queued.
    auto it = merges_.find(PairKey(left.id, right.id));
    if (it == merges_.end() || it->second.new_id != top.new_id) continue;
    left.id = top.new_id;
    right.live = false;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    if (left.prev >= 0) consider(left.prev);
    consider(top.pos);
  }
  std::vector<int32_t> ids;
  for (const auto& s : symbols) {
    if (s.live) ids.push_back(s.id);
  }
  return ids;
}

void BpeModel::Tokenize(std::string_view word, std::vector<int32_t>* ids) const {
  if (word.empty()) return;
  if (options_.ignore_merges) {
    if (auto id = vocab_.Find(word)) {
      ids->push_back(*id);
      return;
    }
  }
  const bool cacheable = options_.cache_capacity > 0 && word.size() < kMaxCachedWordBytes;
  if (cacheable) {
    std::shared_lock lock(cache_mu_);
    auto it = cache_.find(word);
    if (it != cache_.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> merged = MergeWord(word);
  ids->insert(ids->end(), merged.begin(), merged.end());
  if (cacheable) {
    std::unique_lock lock(cache_mu_);
    if (cache_.size() >= options_.cache_capacity) cache_.clear();
    cache_.emplace(std::string(word), std::move(merged));
  }
}

}  // namespace wbroker::tokenizer
