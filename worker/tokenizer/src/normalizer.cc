// wbroker tokenizer: the normalizers: NFC, NFD, NFKC, NFKD, Lowercase,
// StripAccents, Strip, BertNormalizer and Sequence.
#include "wbroker/tokenizer/normalizer.h"

#include <vector>

#include "wbroker/tokenizer/json_util.h"
#include "wbroker/tokenizer/unicode.h"

namespace wbroker::tokenizer {

namespace {

using unicode::AppendUtf8;
using unicode::NextCodePoint;

/// NFC / NFD / NFKC / NFKD.
class UnicodeFormNormalizer : public Normalizer {
 public:
  explicit UnicodeFormNormalizer(unicode::NormalForm form) : form_(form) {}
  void Normalize(std::string* text) const override { *text = unicode::Normalize(*text, form_); }

 private:
  unicode::NormalForm form_;  ///< the form produced
};

/// Lowercase: per-character full lowercase mapping.
class LowercaseNormalizer : public Normalizer {
 public:
  void Normalize(std::string* text) const override { *text = unicode::LowercasePerChar(*text); }
};

/// Drops characters for which `drop` holds.
template <typename Pred>
std::string FilterChars(const std::string& text, Pred drop) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    const size_t start = i;
    const char32_t c = NextCodePoint(text, &i);
    if (!drop(c)) out.append(text, start, i - start);
  }
  return out;
}

/// StripAccents: removes combining marks (the input is usually NFD already).
class StripAccentsNormalizer : public Normalizer {
 public:
  void Normalize(std::string* text) const override {
    *text = FilterChars(*text, unicode::IsCombiningMark);
  }
};

/// Strip: trims whitespace on the left and/or right.
class StripNormalizer : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  void Normalize(std::string* text) const override {
    size_t begin = 0, end = text->size();
    if (left_) {
      while (begin < end) {
        size_t next = begin;
        if (!unicode::IsWhitespace(NextCodePoint(*text, &next))) break;
        begin = next;
      }
    }
    if (right_) {
      while (end > begin) {
        size_t start = end - 1;
        while (start > begin && (static_cast<unsigned char>((*text)[start]) & 0xC0) == 0x80) {
          --start;
        }
        size_t probe = start;
        if (!unicode::IsWhitespace(NextCodePoint(*text, &probe))) break;
        end = start;
      }
    }
    *text = text->substr(begin, end - begin);
  }

 private:
  bool left_;   ///< trim leading whitespace
  bool right_;  ///< trim trailing whitespace
};

/// BertNormalizer: control-character cleanup, CJK spacing, accent stripping, lowercasing.
class BertNormalizer : public Normalizer {
 public:
  BertNormalizer(bool clean_text, bool handle_chinese_chars, bool strip_accents, bool lowercase)
      : clean_text_(clean_text),
        handle_chinese_chars_(handle_chinese_chars),
        strip_accents_(strip_accents),
        lowercase_(lowercase) {}

  void Normalize(std::string* text) const override {
    if (clean_text_) {
      std::string out;
      out.reserve(text->size());
      for (size_t i = 0; i < text->size();) {
        const size_t start = i;
        const char32_t c = NextCodePoint(*text, &i);
        if (unicode::IsBertControl(c)) continue;
        if (unicode::IsBertWhitespace(c)) {
          out.push_back(' ');
        } else {
          out.append(*text, start, i - start);
        }
      }
      *text = std::move(out);
    }
    if (handle_chinese_chars_) {
      std::string out;
      out.reserve(text->size() + 16);
      for (size_t i = 0; i < text->size();) {
        const char32_t c = NextCodePoint(*text, &i);
        if (unicode::IsChineseChar(c)) {
          out.push_back(' ');
          AppendUtf8(&out, c);
          out.push_back(' ');
        } else {
          AppendUtf8(&out, c);
        }
      }
      *text = std::move(out);
    }
    if (strip_accents_) {
      *text = FilterChars(unicode::Normalize(*text, unicode::NormalForm::kNfd),
                          unicode::IsBertNonspacingMark);
    }
    if (lowercase_) *text = unicode::LowercasePerChar(*text);
  }

 private:
  bool clean_text_;            ///< drop control characters, map whitespace to ' '
  bool handle_chinese_chars_;  ///< surround CJK ideographs with spaces
  bool strip_accents_;         ///< NFD, then drop nonspacing marks
  bool lowercase_;             ///< lowercase every character
};

/// Sequence: the normalizers in order.
class SequenceNormalizer : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> steps)
      : steps_(std::move(steps)) {}
  void Normalize(std::string* text) const override {
    for (const auto& s : steps_) s->Normalize(text);
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> steps_;  ///< applied first to last
};

}  // namespace

Result<std::unique_ptr<Normalizer>> ParseNormalizer(const nlohmann::json& j) {
  constexpr std::string_view kWhat = "normalizer";
  if (j.is_null()) return std::unique_ptr<Normalizer>();
  WB_ASSIGN_OR_RETURN(std::string type, TypeOf(j, kWhat));
  if (type == "NFC")
    return std::unique_ptr<Normalizer>(new UnicodeFormNormalizer(unicode::NormalForm::kNfc));
  if (type == "NFD")
    return std::unique_ptr<Normalizer>(new UnicodeFormNormalizer(unicode::NormalForm::kNfd));
  if (type == "NFKC")
    return std::unique_ptr<Normalizer>(new UnicodeFormNormalizer(unicode::NormalForm::kNfkc));
  if (type == "NFKD")
    return std::unique_ptr<Normalizer>(new UnicodeFormNormalizer(unicode::NormalForm::kNfkd));
  if (type == "Lowercase") return std::unique_ptr<Normalizer>(new LowercaseNormalizer());
  if (type == "StripAccents") return std::unique_ptr<Normalizer>(new StripAccentsNormalizer());
  if (type == "Strip") {
    WB_ASSIGN_OR_RETURN(bool left, GetBool(j, "Strip normalizer", "strip_left", true));
    WB_ASSIGN_OR_RETURN(bool right, GetBool(j, "Strip normalizer", "strip_right", true));
    return std::unique_ptr<Normalizer>(new StripNormalizer(left, right));
  }
  if (type == "BertNormalizer") {
    constexpr std::string_view kBert = "BertNormalizer";
    WB_ASSIGN_OR_RETURN(bool clean, GetBool(j, kBert, "clean_text", true));
    WB_ASSIGN_OR_RETURN(bool chinese, GetBool(j, kBert, "handle_chinese_chars", true));
    WB_ASSIGN_OR_RETURN(bool lower, GetBool(j, kBert, "lowercase", true));
    // strip_accents null means "follow lowercase".
    WB_ASSIGN_OR_RETURN(bool strip, GetBool(j, kBert, "strip_accents", lower));
    return std::unique_ptr<Normalizer>(new BertNormalizer(clean, chinese, strip, lower));
  }
  if (type == "Sequence") {
    WB_ASSIGN_OR_RETURN(const nlohmann::json* list,
                        GetArray(j, "Sequence normalizer", "normalizers"));
    std::vector<std::unique_ptr<Normalizer>> steps;
    for (const auto& item : *list) {
      WB_ASSIGN_OR_RETURN(auto step, ParseNormalizer(item));
      if (step) steps.push_back(std::move(step));
    }
    return std::unique_ptr<Normalizer>(new SequenceNormalizer(std::move(steps)));
  }
  return UnsupportedType(kWhat, type);
}

}  // namespace wbroker::tokenizer
