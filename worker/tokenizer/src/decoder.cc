// wbroker tokenizer: the decoders: ByteLevel, WordPiece, BPE, Replace,
// Strip, Fuse, ByteFallback and Sequence.
#include "wbroker/tokenizer/decoder.h"

#include "wbroker/tokenizer/json_util.h"
#include "wbroker/tokenizer/pre_tokenizer.h"
#include "wbroker/tokenizer/regex.h"
#include "wbroker/tokenizer/unicode.h"

namespace wbroker::tokenizer {

namespace {

void ReplaceAll(std::string* s, std::string_view from, std::string_view to) {
  if (from.empty()) return;
  std::string out;
  size_t pos = 0;
  for (size_t hit; (hit = s->find(from, pos)) != std::string::npos; pos = hit + from.size()) {
    out.append(*s, pos, hit - pos);
    out.append(to);
  }
  if (pos == 0) return;
  out.append(*s, pos, std::string::npos);
  *s = std::move(out);
}

/// ByteLevel: alphabet chars back to bytes, then lossy UTF-8.
class ByteLevelDecoder : public Decoder {
 public:
  ByteLevelDecoder() {
    const auto& alphabet = ByteLevelAlphabet();
    for (int b = 0; b < 256; ++b) {
      size_t pos = 0;
      char_to_byte_[unicode::NextCodePoint(alphabet[b], &pos)] = static_cast<unsigned char>(b);
    }
  }

  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::string bytes;
    std::string token_bytes;
    for (const auto& t : *tokens) {
      token_bytes.clear();
      bool all_mapped = true;
      for (size_t i = 0; i < t.size();) {
        auto it = char_to_byte_.find(unicode::NextCodePoint(t, &i));
        if (it == char_to_byte_.end()) {
          all_mapped = false;
          break;
        }
        token_bytes.push_back(static_cast<char>(it->second));
      }
      // A token outside the byte alphabet (e.g. an added token) keeps its own bytes.
      bytes += all_mapped ? token_bytes : t;
    }
    *tokens = {unicode::ToValidUtf8(bytes)};
  }

 private:
  std::unordered_map<char32_t, unsigned char> char_to_byte_;  ///< alphabet char -> byte
};

/// WordPiece: strip the continuation prefix, else prepend a space; optional cleanup.
class WordPieceDecoder : public Decoder {
 public:
  WordPieceDecoder(std::string prefix, bool cleanup)
      : prefix_(std::move(prefix)), cleanup_(cleanup) {}

  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (size_t i = 0; i < tokens->size(); ++i) {
      std::string& t = (*tokens)[i];
      if (i != 0) {
        if (t.compare(0, prefix_.size(), prefix_) == 0) {
          t.erase(0, prefix_.size());
        } else {
          t = " " + t;
        }
      }
      if (cleanup_) Cleanup(&t);
    }
  }

  /// tokenizers' wordpiece::cleanup: undo tokenization spaces around punctuation.
  static void Cleanup(std::string* t) {
    ReplaceAll(t, " .", ".");
    ReplaceAll(t, " ?", "?");
    ReplaceAll(t, " !", "!");
    ReplaceAll(t, " ,", ",");
    ReplaceAll(t, " ' ", "'");
    ReplaceAll(t, " n't", "n't");
    ReplaceAll(t, " 'm", "'m");
    ReplaceAll(t, " do not", " don't");
    ReplaceAll(t, " 's", "'s");
    ReplaceAll(t, " 've", "'ve");
    ReplaceAll(t, " 're", "'re");
  }

 private:
  std::string prefix_;  ///< continuation prefix, usually "##"
  bool cleanup_;        ///< apply Cleanup() to every token
};

/// BPE (suffix style): the end-of-word suffix becomes a space, except at the end.
class BpeDecoder : public Decoder {
 public:
  explicit BpeDecoder(std::string suffix) : suffix_(std::move(suffix)) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (size_t i = 0; i < tokens->size(); ++i) {
      ReplaceAll(&(*tokens)[i], suffix_, i + 1 == tokens->size() ? "" : " ");
    }
  }

 private:
  std::string suffix_;  ///< end-of-word suffix, e.g. "</w>"
};

/// Replace: every match of a pattern in each token becomes `content`.
class ReplaceDecoder : public Decoder {
 public:
  ReplaceDecoder(Regex regex, std::string content)
      : regex_(std::move(regex)), content_(std::move(content)) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (auto& t : *tokens) {
      auto matches = regex_.FindAll(t);
      if (matches.empty()) continue;
      std::string out;
      size_t prev = 0;
      for (const auto& [s, e] : matches) {
        out.append(t, prev, s - prev);
        out.append(content_);
        prev = e;
      }
      out.append(t, prev, std::string::npos);
      t = std::move(out);
    }
  }

 private:
  Regex regex_;          ///< what to replace
  std::string content_;  ///< replacement text
};

/// Strip: removes up to `start`/`stop` copies of one char from each token's ends.
class StripDecoder : public Decoder {
 public:
  StripDecoder(char32_t content, size_t start, size_t stop)
      : content_(content), start_(start), stop_(stop) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (auto& t : *tokens) {
      std::vector<std::pair<size_t, char32_t>> chars;  // (byte offset, char)
      for (size_t i = 0; i < t.size();) {
        const size_t b = i;
        chars.emplace_back(b, unicode::NextCodePoint(t, &i));
      }
      size_t start_cut = 0;
      for (size_t i = 0; i < start_ && i < chars.size() && chars[i].second == content_; ++i) {
        start_cut = i + 1;
      }
      size_t stop_cut = chars.size();
      for (size_t i = 0; i < stop_ && i < chars.size(); ++i) {
        const size_t index = chars.size() - i - 1;
        if (chars[index].second != content_) break;
        stop_cut = index;
      }
      if (stop_cut <= start_cut) {
        t.clear();
        continue;
      }
      const size_t b = start_cut < chars.size() ? chars[start_cut].first : t.size();
      const size_t e = stop_cut < chars.size() ? chars[stop_cut].first : t.size();
      t = t.substr(b, e - b);
    }
  }

 private:
  char32_t content_;  ///< the character stripped
  size_t start_;      ///< at most this many from the left
  size_t stop_;       ///< at most this many from the right
};

/// Fuse: all tokens into one.
class FuseDecoder : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::string all;
    for (const auto& t : *tokens) all += t;
    *tokens = {std::move(all)};
  }
};

/// ByteFallback: runs of <0xXX> tokens become their UTF-8 text (or U+FFFD per byte).
class ByteFallbackDecoder : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::vector<std::string> out;
    std::string pending;
    auto flush = [&] {
      if (pending.empty()) return;
      if (unicode::IsValidUtf8(pending)) {
        out.push_back(pending);
      } else {
        for (size_t i = 0; i < pending.size(); ++i) out.emplace_back("\xEF\xBF\xBD");
      }
      pending.clear();
    };
    for (auto& t : *tokens) {
      if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' && isxdigit(t[3]) &&
          isxdigit(t[4])) {
        pending.push_back(static_cast<char>(std::stoi(t.substr(3, 2), nullptr, 16)));
        continue;
      }
      flush();
      out.push_back(std::move(t));
    }
    flush();
    *tokens = std::move(out);
  }
};

/// Sequence: the decoders' chains in order.
class SequenceDecoder : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> steps)
      : steps_(std::move(steps)) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (const auto& s : steps_) s->DecodeChain(tokens);
  }

 private:
  std::vector<std::unique_ptr<Decoder>> steps_;  ///< applied first to last
};

}  // namespace

Result<std::unique_ptr<Decoder>> ParseDecoder(const nlohmann::json& j) {
  constexpr std::string_view kWhat = "decoder";
  using Ptr = std::unique_ptr<Decoder>;
  if (j.is_null()) return Ptr();
  WB_ASSIGN_OR_RETURN(std::string type, TypeOf(j, kWhat));
  if (type == "ByteLevel") return Ptr(new ByteLevelDecoder());
  if (type == "WordPiece") {
    WB_ASSIGN_OR_RETURN(std::string prefix,
                        GetString(j, "WordPiece decoder", "prefix", std::string("##")));
    WB_ASSIGN_OR_RETURN(bool cleanup, GetBool(j, "WordPiece decoder", "cleanup", true));
    return Ptr(new WordPieceDecoder(std::move(prefix), cleanup));
  }
  if (type == "BPEDecoder") {
    WB_ASSIGN_OR_RETURN(std::string suffix,
                        GetString(j, "BPEDecoder", "suffix", std::string("</w>")));
    return Ptr(new BpeDecoder(std::move(suffix)));
  }
  if (type == "Replace") {
    auto pit = j.find("pattern");
    if (pit == j.end() || !pit->is_object()) return JsonError("Replace decoder has no pattern");
    std::optional<Regex> regex;
    if (auto r = pit->find("Regex"); r != pit->end() && r->is_string()) {
      WB_ASSIGN_OR_RETURN(Regex re, Regex::Compile(r->get<std::string>()));
      regex.emplace(std::move(re));
    } else if (auto s = pit->find("String"); s != pit->end() && s->is_string()) {
      WB_ASSIGN_OR_RETURN(Regex re, Regex::Literal(s->get<std::string>()));
      regex.emplace(std::move(re));
    } else {
      return JsonError("Replace decoder pattern is neither {\"Regex\": ...} nor {\"String\": ...}");
    }
    WB_ASSIGN_OR_RETURN(std::string content, GetString(j, "Replace decoder", "content"));
    return Ptr(new ReplaceDecoder(std::move(*regex), std::move(content)));
  }
  if (type == "Strip") {
    WB_ASSIGN_OR_RETURN(std::string content, GetString(j, "Strip decoder", "content"));
    if (content.empty() || unicode::CodePointCount(content) != 1) {
      return JsonError("Strip decoder content must be one character");
    }
    size_t pos = 0;
    const char32_t c = unicode::NextCodePoint(content, &pos);
    WB_ASSIGN_OR_RETURN(uint64_t start, GetUint(j, "Strip decoder", "start", 0));
    WB_ASSIGN_OR_RETURN(uint64_t stop, GetUint(j, "Strip decoder", "stop", 0));
    return Ptr(new StripDecoder(c, start, stop));
  }
  if (type == "Fuse") return Ptr(new FuseDecoder());
  if (type == "ByteFallback") return Ptr(new ByteFallbackDecoder());
  if (type == "Sequence") {
    WB_ASSIGN_OR_RETURN(const nlohmann::json* list, GetArray(j, "Sequence decoder", "decoders"));
    std::vector<Ptr> steps;
    for (const auto& item : *list) {
      WB_ASSIGN_OR_RETURN(Ptr step, ParseDecoder(item));
      if (step) steps.push_back(std::move(step));
    }
    return Ptr(new SequenceDecoder(std::move(steps)));
  }
  return UnsupportedType(kWhat, type);
}

}  // namespace wbroker::tokenizer
