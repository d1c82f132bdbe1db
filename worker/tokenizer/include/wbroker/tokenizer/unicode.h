// wbroker tokenizer: UTF-8 helpers and the Unicode character classes the
// tokenizer components need, defined the way the HF `tokenizers` library
// (Rust) defines them.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace wbroker::tokenizer::unicode {

/// Decodes the code point at s[*pos] of valid UTF-8 and advances *pos past it.
char32_t NextCodePoint(std::string_view s, size_t* pos);
/// Length in bytes of the UTF-8 sequence starting with lead byte `b`.
size_t SequenceLength(unsigned char b);
/// Appends the UTF-8 encoding of `c`.
void AppendUtf8(std::string* out, char32_t c);
/// Number of code points in valid UTF-8 `s`.
size_t CodePointCount(std::string_view s);
/// Like Rust's String::from_utf8_lossy: each maximal invalid subsequence becomes U+FFFD.
std::string ToValidUtf8(std::string_view bytes);
/// True when `bytes` is well-formed UTF-8.
bool IsValidUtf8(std::string_view bytes);

// Rust `char` predicates (current Unicode, via ICU).
/// char::is_whitespace: the White_Space property.
bool IsWhitespace(char32_t c);
/// char::is_numeric: general category Nd, Nl or No.
bool IsNumeric(char32_t c);
/// char::is_alphanumeric: Alphabetic or numeric.
bool IsAlphanumeric(char32_t c);
/// `\w` of the Rust regex crate: Alphabetic, M*, Nd, Pc or Join_Control.
bool IsWordChar(char32_t c);
/// The CJK ideograph blocks BertNormalizer pads with spaces.
bool IsChineseChar(char32_t c);

// Sets from the Rust crates' own (older) tables; generated into
// unicode_tables.cc by tests/worker/tokenizer/gen_unicode_tables.py.
/// Removed by BertNormalizer's clean_text (NUL, U+FFFD and "other" characters).
bool IsBertControl(char32_t c);
/// Mapped to ' ' by BertNormalizer's clean_text.
bool IsBertWhitespace(char32_t c);
/// Removed by BertNormalizer's strip_accents (after NFD).
bool IsBertNonspacingMark(char32_t c);
/// Removed by the StripAccents normalizer.
bool IsCombiningMark(char32_t c);
/// Isolated by BertPreTokenizer and Punctuation.
bool IsPunctuation(char32_t c);

/// Unicode normalization forms (ICU); the input must be valid UTF-8.
enum class NormalForm { kNfc, kNfd, kNfkc, kNfkd };
/// `s` in normal form `form`.
std::string Normalize(std::string_view s, NormalForm form);
/// Lowercases code point by code point (Rust char::to_lowercase, no context rules).
std::string LowercasePerChar(std::string_view s);

}  // namespace wbroker::tokenizer::unicode
