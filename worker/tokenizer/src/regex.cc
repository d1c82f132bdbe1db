// wbroker tokenizer: PCRE2-backed Regex.
#include "wbroker/tokenizer/regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "wbroker/tokenizer/unicode.h"

namespace wbroker::tokenizer {

namespace {

struct MatchDataDeleter {
  void operator()(pcre2_match_data* d) const { pcre2_match_data_free(d); }
};
struct MatchContextDeleter {
  void operator()(pcre2_match_context* c) const { pcre2_match_context_free(c); }
};
struct JitStackDeleter {
  void operator()(pcre2_jit_stack* s) const { pcre2_jit_stack_free(s); }
};

}  // namespace

void Regex::CodeDeleter::operator()(pcre2_real_code_8* code) const {
  pcre2_code_free(code);
}

Result<Regex> Regex::Compile(std::string_view pattern) {
  int err = 0;
  PCRE2_SIZE err_offset = 0;
  pcre2_code* code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                    PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &err, &err_offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR buf[256];
    pcre2_get_error_message(err, buf, sizeof(buf));
    return Status(ErrorCode::kInvalidArgument,
                  "regex '" + std::string(pattern) + "' does not compile at offset " +
                      std::to_string(err_offset) + ": " + reinterpret_cast<char*>(buf));
  }
  // JIT is an optimization only: without it pcre2_match interprets.
  (void)pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  Regex re;
  re.pattern_ = std::string(pattern);
  re.code_.reset(code);
  return re;
}

Result<Regex> Regex::Literal(std::string_view literal) {
  std::string escaped;
  for (size_t i = 0; i < literal.size();) {
    const size_t start = i;
    const char32_t c = unicode::NextCodePoint(literal, &i);
    if (c < 0x80 && !((c >= '0' && c <= '9') || ((c | 0x20) >= 'a' && (c | 0x20) <= 'z'))) {
      // Escape every ASCII non-alphanumeric; \x{..} also covers whitespace and NUL.
      char buf[16];
      snprintf(buf, sizeof(buf), "\\x{%X}", static_cast<unsigned>(c));
      escaped += buf;
    } else {
      escaped.append(literal.substr(start, i - start));
    }
  }
  return Compile(escaped);
}

std::vector<std::pair<size_t, size_t>> Regex::FindAll(std::string_view text) const {
  std::vector<std::pair<size_t, size_t>> out;
  std::unique_ptr<pcre2_match_data, MatchDataDeleter> md(
      pcre2_match_data_create_from_pattern(code_.get(), nullptr));
  std::unique_ptr<pcre2_match_context, MatchContextDeleter> ctx(
      pcre2_match_context_create(nullptr));
  // A larger JIT stack than the 32 KiB default, for long whitespace or letter runs.
  std::unique_ptr<pcre2_jit_stack, JitStackDeleter> stack(
      pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr));
  if (!md || !ctx) return out;
  if (stack) pcre2_jit_stack_assign(ctx.get(), nullptr, stack.get());
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t pos = 0;
  bool have_last = false;
  size_t last_end = 0;
  while (pos <= text.size()) {
    int rc = pcre2_match(code_.get(), subject, text.size(), pos, PCRE2_NO_UTF_CHECK, md.get(),
                         ctx.get());
    if (rc < 0) break;  // PCRE2_ERROR_NOMATCH, or a resource limit: stop matching
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
    const size_t s = ov[0], e = ov[1];
    if (s == e && have_last && last_end == e) {
      // onig's iterator: skip an empty match touching the previous match, move one char on.
      if (pos >= text.size()) break;
      pos += unicode::SequenceLength(static_cast<unsigned char>(text[pos]));
      continue;
    }
    out.emplace_back(s, e);
    have_last = true;
    last_end = e;
    pos = e;
    if (s == e && pos >= text.size()) break;
  }
  return out;
}

}  // namespace wbroker::tokenizer
