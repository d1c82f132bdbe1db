// wbroker tests: the C++ tokenizer against the Hugging Face `tokenizers`
// library (qwen2, gpt2 and bert fixtures built at test time), plus loading
// errors, vocabulary lookups and large inputs.
#include "wbroker/tokenizer/tokenizer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "temp_dir.h"

namespace wbroker::tokenizer {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing::TempDir;

const fs::path kSource = WBROKER_SOURCE_DIR;

std::string Quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

/// Runs a shell command; returns its exit status.
int RunShell(const std::string& cmd) {
  int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

bool PythonHasTokenizers() {
  static const bool ok = RunShell("python3 -c 'import tokenizers' >/dev/null 2>&1") == 0;
  return ok;
}

/// A printable form of a corpus line for failure messages.
std::string Show(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20) {
      char buf[8];
      snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out.size() > 120 ? out.substr(0, 120) + "..." : out;
}

/// Writes the `tokenizers` reference for the corpus and `tokenizer_json` to `out`; returns it.
nlohmann::json WriteReference(const fs::path& tokenizer_json, const fs::path& out) {
  const std::string reference = "python3 " +
                                Quote((kSource / "tests/worker/tokenizer/reference.py").string()) +
                                " --tokenizer " + Quote(tokenizer_json.string()) + " --corpus " +
                                Quote((kSource / "tests/worker/tokenizer/corpus.json").string()) +
                                " --out " + Quote(out.string());
  EXPECT_EQ(RunShell(reference), 0) << reference;
  std::ifstream in(out);
  return nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
}

/// Encode and Decode of `tokenizer_json` must equal the reference on every corpus line.
void CheckAgainstReference(const std::string& name, const fs::path& tokenizer_json,
                           const TempDir& dir) {
  const nlohmann::json ref = WriteReference(tokenizer_json, dir / (name + "-reference.json"));
  ASSERT_TRUE(ref.is_object()) << "no reference output for " << name;
  auto tok = Tokenizer::FromFile(tokenizer_json.string());
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  EXPECT_EQ((*tok)->vocab_size(), ref["vocab_size"].get<size_t>()) << name;
  size_t checked = 0;
  for (const auto& e : ref["entries"]) {
    const std::string text = e["text"].get<std::string>();
    const auto ids = e["ids"].get<std::vector<int32_t>>();
    const auto plain = e["ids_no_special"].get<std::vector<int32_t>>();
    EXPECT_EQ((*tok)->Encode(text, true), ids) << name << " encode: \"" << Show(text) << "\"";
    EXPECT_EQ((*tok)->Encode(text, false), plain)
        << name << " encode without special tokens: \"" << Show(text) << "\"";
    EXPECT_EQ((*tok)->Decode(ids, true), e["decode"].get<std::string>())
        << name << " decode: \"" << Show(text) << "\"";
    EXPECT_EQ((*tok)->Decode(ids, false), e["decode_keep_special"].get<std::string>())
        << name << " decode keeping special tokens: \"" << Show(text) << "\"";
    EXPECT_EQ((*tok)->Decode(plain, true), e["decode_no_special"].get<std::string>())
        << name << " decode of ids without special tokens: \"" << Show(text) << "\"";
    ++checked;
  }
  EXPECT_GE(checked, 100u) << name;
}

#define SKIP_WITHOUT_TOKENIZERS()                                                 \
  if (!PythonHasTokenizers()) {                                                   \
    GTEST_SKIP() << "python3 cannot import the `tokenizers` library (put a venv " \
                    "with it first on PATH, e.g. /work/main/.venv/bin)";          \
  }

/// Builds the `kind` fixture with make_tokenizer.py and checks it.
void CheckFixture(const std::string& kind) {
  TempDir dir("wbroker-tokenizer");
  const fs::path tok_dir = dir / kind;
  const std::string make = "python3 " +
                           Quote((kSource / "tests/fixtures/make_tokenizer.py").string()) +
                           " --kind " + kind + " --out " + Quote(tok_dir.string()) + " >/dev/null";
  ASSERT_EQ(RunShell(make), 0) << make;
  CheckAgainstReference(kind, tok_dir / "tokenizer.json", dir);
}

TEST(TokenizerReference, Qwen2MatchesTokenizers) {
  SKIP_WITHOUT_TOKENIZERS();
  CheckFixture("qwen2");
}
TEST(TokenizerReference, Gpt2MatchesTokenizers) {
  SKIP_WITHOUT_TOKENIZERS();
  CheckFixture("gpt2");
}
TEST(TokenizerReference, BertMatchesTokenizers) {
  SKIP_WITHOUT_TOKENIZERS();
  CheckFixture("bert");
}

// Other normalizers, pre-tokenizers, split behaviors, decoders and
// post-processors: tests/worker/tokenizer/variants.py.
TEST(TokenizerReference, ComponentVariantsMatchTokenizers) {
  SKIP_WITHOUT_TOKENIZERS();
  TempDir dir("wbroker-tokenizer");
  const std::string list = (dir / "variants.txt").string();
  const std::string cmd = "python3 " +
                          Quote((kSource / "tests/worker/tokenizer/variants.py").string()) +
                          " --out " + Quote(dir.path().string()) + " > " + Quote(list);
  ASSERT_EQ(RunShell(cmd), 0) << cmd;
  std::ifstream in(list);
  size_t count = 0;
  for (std::string name; std::getline(in, name);) {
    if (name.empty()) continue;
    SCOPED_TRACE(name);
    CheckAgainstReference(name, dir / name / "tokenizer.json", dir);
    ++count;
  }
  EXPECT_GE(count, 6u);
}

// --- hand-written tokenizer.json documents ---

/// A byte-level BPE over the full byte alphabet plus a few merges.
nlohmann::json TinyByteLevel() {
  // GPT-2 bytes_to_unicode().
  std::vector<std::string> alphabet(256);
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    const uint32_t c = printable ? b : 256 + n++;
    std::string s;
    if (c < 0x80) {
      s.push_back(static_cast<char>(c));
    } else {
      s.push_back(static_cast<char>(0xC0 | (c >> 6)));
      s.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
    alphabet[b] = s;
  }
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) vocab[alphabet[b]] = b;
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"a", "a"},   {"aa", "aa"},  {"\xC4\xA0", "\xC4\xA0"}, {"h", "e"}, {"he", "l"},
      {"hel", "l"}, {"hell", "o"}, {"\xC4\xA0", "w"},        {"1", "2"}};
  nlohmann::json merges_json = nlohmann::json::array();
  int id = 256;
  for (const auto& [a, b] : merges) {
    vocab[a + b] = id++;
    merges_json.push_back(a + " " + b);
  }
  nlohmann::json j;
  j["version"] = "1.0";
  j["added_tokens"] = nlohmann::json::array({{{"id", id},
                                              {"content", "<|end|>"},
                                              {"special", true},
                                              {"normalized", false},
                                              {"lstrip", false},
                                              {"rstrip", false},
                                              {"single_word", false}}});
  j["normalizer"] = {{"type", "NFC"}};
  j["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       {{{"type", "Split"},
         {"pattern",
          {{"Regex",
            R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}}},
         {"behavior", "Isolated"},
         {"invert", false}},
        {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  j["post_processor"] = {{"type", "ByteLevel"}};
  j["decoder"] = {{"type", "ByteLevel"}};
  j["model"] = {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges_json}};
  return j;
}

Result<std::unique_ptr<Tokenizer>> Load(const nlohmann::json& j) {
  return Tokenizer::FromJson(j.dump());
}

std::string LoadError(const nlohmann::json& j) {
  auto t = Load(j);
  return t.ok() ? std::string("(loaded)") : t.status().message();
}

TEST(TokenizerLoad, RejectsNonJson) {
  auto t = Tokenizer::FromJson("this is { not json");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(t.status().message(), HasSubstr("not valid JSON"));
  EXPECT_FALSE(Tokenizer::FromJson("[1, 2, 3]").ok());
  EXPECT_FALSE(Tokenizer::FromJson("").ok());
}

TEST(TokenizerLoad, RejectsMissingModel) {
  nlohmann::json j = TinyByteLevel();
  j.erase("model");
  EXPECT_THAT(LoadError(j), HasSubstr("model is missing"));
  j["model"] = {{"vocab", nlohmann::json::object()}};
  EXPECT_THAT(LoadError(j), HasSubstr("model has no string 'type'"));
}

TEST(TokenizerLoad, NamesUnsupportedComponents) {
  {
    nlohmann::json j = TinyByteLevel();
    j["model"] = {{"type", "Unigram"}, {"vocab", nlohmann::json::array()}};
    auto t = Load(j);
    ASSERT_FALSE(t.ok());
    EXPECT_EQ(t.status().code(), ErrorCode::kUnsupported);
    EXPECT_THAT(t.status().message(),
                HasSubstr("tokenizer.json: model type 'Unigram' is not supported"));
  }
  {
    nlohmann::json j = TinyByteLevel();
    j["normalizer"] = {{"type", "Precompiled"}, {"precompiled_charsmap", "AAAA"}};
    EXPECT_THAT(LoadError(j), HasSubstr("normalizer type 'Precompiled' is not supported"));
  }
  {
    nlohmann::json j = TinyByteLevel();
    j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "_"}};
    EXPECT_THAT(LoadError(j),
                HasSubstr("tokenizer.json: pre_tokenizer type 'Metaspace' is not supported"));
  }
  {
    nlohmann::json j = TinyByteLevel();
    j["pre_tokenizer"]["pretokenizers"][1] = {{"type", "UnicodeScripts"}};
    EXPECT_THAT(LoadError(j), HasSubstr("pre_tokenizer type 'UnicodeScripts' is not supported"));
  }
  {
    nlohmann::json j = TinyByteLevel();
    j["decoder"] = {{"type", "CTC"}};
    EXPECT_THAT(LoadError(j), HasSubstr("decoder type 'CTC' is not supported"));
  }
  {
    nlohmann::json j = TinyByteLevel();
    j["post_processor"] = {{"type", "Mystery"}};
    EXPECT_THAT(LoadError(j), HasSubstr("post_processor type 'Mystery' is not supported"));
  }
  {
    nlohmann::json j = TinyByteLevel();
    j["model"]["dropout"] = 0.1;
    EXPECT_THAT(LoadError(j), HasSubstr("dropout is not supported"));
  }
}

TEST(TokenizerLoad, RejectsBrokenParts) {
  {
    nlohmann::json j = TinyByteLevel();
    j["model"]["merges"].push_back("zz qq");
    EXPECT_THAT(LoadError(j), HasSubstr("merge 'zz qq' uses a token not in the vocab"));
  }
  {
    nlohmann::json j = TinyByteLevel();
    j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
    EXPECT_THAT(LoadError(j), HasSubstr("Split pre_tokenizer"));
  }
  {
    nlohmann::json j = TinyByteLevel();
    j["model"]["vocab"]["x"] = "not an id";
    EXPECT_THAT(LoadError(j), HasSubstr("vocab entry 'x'"));
  }
  auto missing = Tokenizer::FromFile("/nonexistent/tokenizer.json");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), ErrorCode::kNotFound);
}

TEST(TokenizerVocab, TokenToIdAndBack) {
  auto t = Load(TinyByteLevel());
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  const Tokenizer& tok = **t;
  EXPECT_EQ(tok.vocab_size(), 256u + 9u + 1u);
  EXPECT_EQ(tok.TokenToId("a"), std::optional<int32_t>('a'));
  EXPECT_EQ(tok.TokenToId("hello"), std::optional<int32_t>(262));
  EXPECT_EQ(tok.TokenToId("<|end|>"), std::optional<int32_t>(265));
  EXPECT_EQ(tok.TokenToId("nope"), std::nullopt);
  EXPECT_EQ(tok.IdToToken(262), "hello");
  EXPECT_EQ(tok.IdToToken(265), "<|end|>");
  EXPECT_EQ(tok.IdToToken(266), "");
  EXPECT_EQ(tok.IdToToken(-1), "");
  EXPECT_TRUE(tok.IsSpecialId(265));
  EXPECT_FALSE(tok.IsSpecialId(262));
}

TEST(TokenizerEncode, ByteLevelBasics) {
  auto t = Load(TinyByteLevel());
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  const Tokenizer& tok = **t;
  // "hello" merges fully; " w" merges; the special token splits the text.
  EXPECT_THAT(tok.Encode("hello<|end|> w"), ElementsAre(262, 265, 263));
  const std::vector<int32_t> ids = tok.Encode("hello<|end|> w");
  EXPECT_EQ(tok.Decode(ids, true), "hello w");
  EXPECT_EQ(tok.Decode(ids, false), "hello<|end|> w");
  // Unknown ids are skipped; invalid UTF-8 is encoded as U+FFFD.
  const std::vector<int32_t> with_unknown = {262, 99999, -5};
  EXPECT_EQ(tok.Decode(with_unknown), "hello");
  EXPECT_EQ(tok.Decode(tok.Encode("a\xff"
                                  "b")),
            "a\xEF\xBF\xBD"
            "b");
  EXPECT_TRUE(tok.Encode("").empty());
}

TEST(TokenizerEncode, IgnoreMerges) {
  nlohmann::json j = TinyByteLevel();
  j["model"]["vocab"]["aaab"] = 300;  // in the vocab, but no merge builds it
  auto plain = Load(j);
  ASSERT_TRUE(plain.ok()) << plain.status().ToString();
  EXPECT_THAT((*plain)->Encode("aaab"), ElementsAre(256, 'a', 'b'));
  j["model"]["ignore_merges"] = true;
  auto ignoring = Load(j);
  ASSERT_TRUE(ignoring.ok()) << ignoring.status().ToString();
  EXPECT_THAT((*ignoring)->Encode("aaab"), ElementsAre(300));
}

TEST(TokenizerEncode, MergesGivenAsPairs) {
  nlohmann::json j = TinyByteLevel();
  nlohmann::json pairs = nlohmann::json::array();
  for (const auto& m : j["model"]["merges"]) {
    const std::string s = m.get<std::string>();
    const size_t sp = s.find(' ');
    pairs.push_back({s.substr(0, sp), s.substr(sp + 1)});
  }
  j["model"]["merges"] = pairs;
  auto t = Load(j);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_THAT((*t)->Encode("hello"), ElementsAre(262));
}

TEST(TokenizerEncode, MegabyteInputsFinish) {
  auto t = Load(TinyByteLevel());
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  const Tokenizer& tok = **t;
  const auto start = std::chrono::steady_clock::now();
  // One 1 MiB word (worst case for merging), a 1 MiB whitespace run (the
  // \s+(?!\S) lookahead), and 1 MiB of ordinary mixed text.
  const std::string word(1 << 20, 'a');
  const std::vector<int32_t> word_ids = tok.Encode(word);
  EXPECT_EQ(word_ids.size(), (1u << 20) / 4);
  const std::string spaces(1 << 20, ' ');
  EXPECT_EQ(tok.Decode(tok.Encode(spaces)), spaces);
  std::string mixed;
  while (mixed.size() < (1u << 20)) mixed += "hello world, 12 apples\tand\r\n naïve café 你好 ";
  EXPECT_EQ(tok.Decode(tok.Encode(mixed)), mixed);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 60.0);
}

TEST(TokenizerEncode, ConcurrentEncodesAgree) {
  auto t = Load(TinyByteLevel());
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  const Tokenizer& tok = **t;
  const std::string text = "hello world hello aaaa 1212 hello<|end|>";
  const std::vector<int32_t> expected = tok.Encode(text);
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] {
      for (int i = 0; i < 2000; ++i) {
        if (tok.Encode(text + std::to_string(i % 50)).size() < expected.size()) ++mismatches[k];
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int m : mismatches) EXPECT_EQ(m, 0);
}

}  // namespace
}  // namespace wbroker::tokenizer
