// wbroker tokenizer: the pre-tokenizers: ByteLevel, Split, BertPreTokenizer,
// Whitespace, WhitespaceSplit, Punctuation, Digits and Sequence, with the
// delimiter behaviors of tokenizers' NormalizedString::split.
#include "wbroker/tokenizer/pre_tokenizer.h"

#include <functional>
#include <utility>

#include "wbroker/tokenizer/json_util.h"
#include "wbroker/tokenizer/regex.h"
#include "wbroker/tokenizer/unicode.h"

namespace wbroker::tokenizer {

namespace {

using unicode::NextCodePoint;

constexpr char kGpt2Pattern[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

/// A span of the split text and whether the pattern matched it.
struct Piece {
  size_t begin;
  size_t end;
  bool is_match;
};

/// Pieces covering `text` from a list of match ranges (tokenizers' Pattern::find_matches).
std::vector<Piece> PiecesFromMatches(std::string_view text,
                                     const std::vector<std::pair<size_t, size_t>>& matches) {
  std::vector<Piece> out;
  if (text.empty()) return {{0, 0, false}};
  size_t prev = 0;
  for (const auto& [s, e] : matches) {
    if (prev != s) out.push_back({prev, s, false});
    out.push_back({s, e, true});
    prev = e;
  }
  if (prev != text.size()) out.push_back({prev, text.size(), false});
  return out;
}

/// Pieces where every character satisfying `pred` is its own match.
template <typename Pred>
std::vector<Piece> PiecesFromCharPredicate(std::string_view text, Pred pred) {
  if (text.empty()) return {{0, 0, false}};
  std::vector<Piece> out;
  size_t last = 0;
  for (size_t i = 0; i < text.size();) {
    const size_t b = i;
    if (pred(NextCodePoint(text, &i))) {
      if (last < b) out.push_back({last, b, false});
      out.push_back({b, i, true});
      last = i;
    }
  }
  if (text.size() > last) out.push_back({last, text.size(), false});
  return out;
}

/// Appends the non-empty slices of `text` that `behavior` keeps.
void SplitByBehavior(std::string_view text, std::vector<Piece> pieces, Behavior behavior,
                     bool invert, std::vector<std::string>* out) {
  if (invert) {
    for (auto& p : pieces) p.is_match = !p.is_match;
  }
  // (range, remove) after applying the behavior.
  std::vector<std::pair<std::pair<size_t, size_t>, bool>> splits;
  switch (behavior) {
    case Behavior::kIsolated:
      for (const auto& p : pieces) splits.push_back({{p.begin, p.end}, false});
      break;
    case Behavior::kRemoved:
      for (const auto& p : pieces) splits.push_back({{p.begin, p.end}, p.is_match});
      break;
    case Behavior::kContiguous: {
      bool prev_match = false;
      for (const auto& p : pieces) {
        if (p.is_match == prev_match && !splits.empty()) {
          splits.back().first.second = p.end;
        } else {
          splits.push_back({{p.begin, p.end}, false});
        }
        prev_match = p.is_match;
      }
      break;
    }
    case Behavior::kMergedWithPrevious: {
      bool prev_match = false;
      for (const auto& p : pieces) {
        if (p.is_match && !prev_match && !splits.empty()) {
          splits.back().first.second = p.end;
        } else {
          splits.push_back({{p.begin, p.end}, false});
        }
        prev_match = p.is_match;
      }
      break;
    }
    case Behavior::kMergedWithNext: {
      bool prev_match = false;
      for (auto it = pieces.rbegin(); it != pieces.rend(); ++it) {
        if (it->is_match && !prev_match && !splits.empty()) {
          splits.back().first.first = it->begin;
        } else {
          splits.push_back({{it->begin, it->end}, false});
        }
        prev_match = it->is_match;
      }
      std::reverse(splits.begin(), splits.end());
      break;
    }
  }
  for (const auto& [range, remove] : splits) {
    if (!remove && range.second > range.first) {
      out->emplace_back(text.substr(range.first, range.second - range.first));
    }
  }
}

/// Applies `fn(split, out)` to every split.
template <typename Fn>
void ForEachSplit(std::vector<std::string>* splits, Fn fn) {
  std::vector<std::string> out;
  out.reserve(splits->size());
  for (const auto& s : *splits) fn(std::string_view(s), &out);
  *splits = std::move(out);
}

Result<Behavior> ParseBehavior(const nlohmann::json& j, std::string_view component,
                               const char* fallback) {
  WB_ASSIGN_OR_RETURN(std::string b, GetString(j, component, "behavior", std::string(fallback)));
  if (b == "Removed") return Behavior::kRemoved;
  if (b == "Isolated") return Behavior::kIsolated;
  if (b == "MergedWithPrevious") return Behavior::kMergedWithPrevious;
  if (b == "MergedWithNext") return Behavior::kMergedWithNext;
  if (b == "Contiguous") return Behavior::kContiguous;
  return JsonError(std::string(component) + " behavior '" + b + "' is not supported");
}

/// ByteLevel: optional prefix space, optional GPT-2 regex split, then bytes -> alphabet chars.
class ByteLevelPreTokenizer : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, std::optional<Regex> regex)
      : add_prefix_space_(add_prefix_space), regex_(std::move(regex)) {}

  void PreTokenize(std::vector<std::string>* splits) const override {
    const auto& alphabet = ByteLevelAlphabet();
    ForEachSplit(splits, [&](std::string_view s, std::vector<std::string>* out) {
      std::string text;
      if (add_prefix_space_ && (s.empty() || s[0] != ' ')) text.push_back(' ');
      text.append(s);
      std::vector<std::string> pieces;
      if (regex_) {
        SplitByBehavior(text, PiecesFromMatches(text, regex_->FindAll(text)), Behavior::kIsolated,
                        false, &pieces);
      } else if (!text.empty()) {
        pieces.push_back(std::move(text));
      }
      for (const auto& p : pieces) {
        std::string mapped;
        mapped.reserve(p.size() * 2);
        for (unsigned char b : p) mapped += alphabet[b];
        out->push_back(std::move(mapped));
      }
    });
  }

 private:
  bool add_prefix_space_;       ///< prepend ' ' to splits not starting with one
  std::optional<Regex> regex_;  ///< the GPT-2 pattern when use_regex
};

/// Split: a regex (or literal) with a delimiter behavior, optionally inverted.
class SplitPreTokenizer : public PreTokenizer {
 public:
  SplitPreTokenizer(Regex regex, Behavior behavior, bool invert)
      : regex_(std::move(regex)), behavior_(behavior), invert_(invert) {}

  void PreTokenize(std::vector<std::string>* splits) const override {
    ForEachSplit(splits, [&](std::string_view s, std::vector<std::string>* out) {
      SplitByBehavior(s, PiecesFromMatches(s, regex_.FindAll(s)), behavior_, invert_, out);
    });
  }

 private:
  Regex regex_;        ///< what delimits pieces
  Behavior behavior_;  ///< what happens to the delimiters
  bool invert_;        ///< the pattern matches the pieces, not the delimiters
};

/// A split on single characters selected by a predicate (Bert, WhitespaceSplit, Punctuation,
/// Digits).
class CharSplitPreTokenizer : public PreTokenizer {
 public:
  struct Step {
    std::function<bool(char32_t)> pred;  ///< characters that delimit
    Behavior behavior;                   ///< what happens to them
  };
  explicit CharSplitPreTokenizer(std::vector<Step> steps) : steps_(std::move(steps)) {}

  void PreTokenize(std::vector<std::string>* splits) const override {
    for (const auto& step : steps_) {
      ForEachSplit(splits, [&](std::string_view s, std::vector<std::string>* out) {
        SplitByBehavior(s, PiecesFromCharPredicate(s, step.pred), step.behavior, false, out);
      });
    }
  }

 private:
  std::vector<Step> steps_;  ///< applied in order
};

/// Whitespace: the Rust-regex split `\w+|[^\w\s]+`, keeping the matches.
class WhitespacePreTokenizer : public PreTokenizer {
 public:
  void PreTokenize(std::vector<std::string>* splits) const override {
    ForEachSplit(splits, [&](std::string_view s, std::vector<std::string>* out) {
      // Runs of word chars, or runs of chars that are neither word chars nor whitespace.
      size_t i = 0;
      int run_kind = 0;  // 0 none, 1 word, 2 other
      size_t run_start = 0;
      auto flush = [&](size_t end) {
        if (run_kind != 0 && end > run_start)
          out->emplace_back(s.substr(run_start, end - run_start));
        run_kind = 0;
      };
      while (i < s.size()) {
        const size_t b = i;
        const char32_t c = NextCodePoint(s, &i);
        const int kind = unicode::IsWordChar(c) ? 1 : (unicode::IsWhitespace(c) ? 0 : 2);
        if (kind != run_kind) {
          flush(b);
          run_kind = kind;
          run_start = b;
        }
      }
      flush(s.size());
    });
  }
};

/// Sequence: the pre-tokenizers in order.
class SequencePreTokenizer : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> steps)
      : steps_(std::move(steps)) {}
  void PreTokenize(std::vector<std::string>* splits) const override {
    for (const auto& s : steps_) s->PreTokenize(splits);
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> steps_;  ///< applied first to last
};

bool IsAsciiPunctuation(char32_t c) {
  return (c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) || (c >= 0x5B && c <= 0x60) ||
         (c >= 0x7B && c <= 0x7E);
}

bool IsPunct(char32_t c) {
  return IsAsciiPunctuation(c) || unicode::IsPunctuation(c);
}

}  // namespace

const std::vector<std::string>& ByteLevelAlphabet() {
  // GPT-2's bytes_to_unicode(): printable bytes map to themselves, the others
  // to U+0100 onwards in byte order.
  static const std::vector<std::string> table = [] {
    std::vector<std::string> t(256);
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      char32_t c = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
      unicode::AppendUtf8(&t[b], c);
    }
    return t;
  }();
  return table;
}

Result<std::unique_ptr<PreTokenizer>> ParsePreTokenizer(const nlohmann::json& j) {
  constexpr std::string_view kWhat = "pre_tokenizer";
  if (j.is_null()) return std::unique_ptr<PreTokenizer>();
  WB_ASSIGN_OR_RETURN(std::string type, TypeOf(j, kWhat));
  using Ptr = std::unique_ptr<PreTokenizer>;
  if (type == "ByteLevel") {
    WB_ASSIGN_OR_RETURN(bool prefix,
                        GetBool(j, "ByteLevel pre_tokenizer", "add_prefix_space", true));
    WB_ASSIGN_OR_RETURN(bool use_regex, GetBool(j, "ByteLevel pre_tokenizer", "use_regex", true));
    std::optional<Regex> regex;
    if (use_regex) {
      WB_ASSIGN_OR_RETURN(Regex re, Regex::Compile(kGpt2Pattern));
      regex.emplace(std::move(re));
    }
    return Ptr(new ByteLevelPreTokenizer(prefix, std::move(regex)));
  }
  if (type == "Split") {
    constexpr std::string_view kSplit = "Split pre_tokenizer";
    auto pit = j.find("pattern");
    if (pit == j.end() || !pit->is_object()) return JsonError("Split pre_tokenizer has no pattern");
    std::optional<Regex> regex;
    if (auto r = pit->find("Regex"); r != pit->end() && r->is_string()) {
      auto re = Regex::Compile(r->get<std::string>());
      if (!re.ok()) return re.status().WithContext("tokenizer.json: Split pre_tokenizer");
      regex.emplace(std::move(re).value());
    } else if (auto s = pit->find("String"); s != pit->end() && s->is_string()) {
      WB_ASSIGN_OR_RETURN(Regex re, Regex::Literal(s->get<std::string>()));
      regex.emplace(std::move(re));
    } else {
      return JsonError(
          "Split pre_tokenizer pattern is neither {\"Regex\": ...} nor {\"String\": ...}");
    }
    WB_ASSIGN_OR_RETURN(Behavior behavior, ParseBehavior(j, kSplit, "Removed"));
    WB_ASSIGN_OR_RETURN(bool invert, GetBool(j, kSplit, "invert", false));
    return Ptr(new SplitPreTokenizer(std::move(*regex), behavior, invert));
  }
  if (type == "BertPreTokenizer") {
    return Ptr(new CharSplitPreTokenizer(
        {{unicode::IsWhitespace, Behavior::kRemoved}, {IsPunct, Behavior::kIsolated}}));
  }
  if (type == "WhitespaceSplit") {
    return Ptr(new CharSplitPreTokenizer({{unicode::IsWhitespace, Behavior::kRemoved}}));
  }
  if (type == "Whitespace") return Ptr(new WhitespacePreTokenizer());
  if (type == "Punctuation") {
    WB_ASSIGN_OR_RETURN(Behavior behavior,
                        ParseBehavior(j, "Punctuation pre_tokenizer", "Isolated"));
    return Ptr(new CharSplitPreTokenizer({{IsPunct, behavior}}));
  }
  if (type == "Digits") {
    WB_ASSIGN_OR_RETURN(bool individual,
                        GetBool(j, "Digits pre_tokenizer", "individual_digits", false));
    return Ptr(new CharSplitPreTokenizer(
        {{unicode::IsNumeric, individual ? Behavior::kIsolated : Behavior::kContiguous}}));
  }
  if (type == "Sequence") {
    WB_ASSIGN_OR_RETURN(const nlohmann::json* list,
                        GetArray(j, "Sequence pre_tokenizer", "pretokenizers"));
    std::vector<Ptr> steps;
    for (const auto& item : *list) {
      WB_ASSIGN_OR_RETURN(Ptr step, ParsePreTokenizer(item));
      if (step) steps.push_back(std::move(step));
    }
    return Ptr(new SequencePreTokenizer(std::move(steps)));
  }
  return UnsupportedType(kWhat, type);
}

}  // namespace wbroker::tokenizer
