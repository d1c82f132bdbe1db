// wbroker tokenizer: a compiled PCRE2 regular expression (UTF + UCP, JIT when
// available) that lists its matches the way the Rust onig crate iterates them.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "wbroker/common/status.h"

struct pcre2_real_code_8;

namespace wbroker::tokenizer {

/// A compiled pattern; immutable after Compile(), safe to share across threads.
class Regex {
 public:
  /// Compiles `pattern` (Perl/Oniguruma-style syntax) or names the compile error.
  static Result<Regex> Compile(std::string_view pattern);
  /// A pattern matching `literal` exactly.
  static Result<Regex> Literal(std::string_view literal);

  /// Byte ranges of the successive non-overlapping matches in valid UTF-8 `text`.
  /// An empty match right where the previous match ended is skipped, as onig does.
  std::vector<std::pair<size_t, size_t>> FindAll(std::string_view text) const;

  const std::string& pattern() const { return pattern_; }

 private:
  Regex() = default;

  struct CodeDeleter {
    void operator()(pcre2_real_code_8* code) const;
  };

  std::string pattern_;                                   ///< source text, for messages
  std::unique_ptr<pcre2_real_code_8, CodeDeleter> code_;  ///< compiled (and JIT-compiled) code
};

}  // namespace wbroker::tokenizer
