// wbroker tests: the fake engine.
#include "fake_engine.h"

#include <sstream>
#include <thread>

namespace wbroker::testing {
namespace {

std::vector<std::string> Words(const std::string& text) {
  std::istringstream in(text);
  std::vector<std::string> words;
  for (std::string w; in >> w;) words.push_back(w);
  if (words.empty()) words.push_back("<empty>");
  return words;
}

}  // namespace

std::string FakeEngine::ExpectedCompletion(const std::string& prompt, int max_tokens) {
  auto words = Words(prompt);
  std::string out;
  for (int i = 0; i < max_tokens; ++i) out += " " + words[i % words.size()];
  return out;
}

std::vector<float> FakeEngine::ExpectedEmbedding(const std::string& input) {
  return {static_cast<float>(input.size()), 0.25f, -1.0f};
}

http::ModelInfo FakeEngine::Info() const {
  return {"fake/echo-model", "0123456789abcdef", kind_, "cpu", "float32", "host", "attached"};
}

http::CompletionRequest FakeEngine::last_request() const {
  std::lock_guard lock(mu_);
  return last_request_;
}

Result<http::CompletionResult> FakeEngine::Complete(const http::CompletionRequest& req,
                                                    const http::TextCallback& on_text) {
  ++started_;
  {
    std::lock_guard lock(mu_);
    last_request_ = req;
  }
  struct Done {
    std::atomic<int>& n;
    ~Done() { ++n; }
  } done{finished_};
  if (req.prompt.rfind("fail:", 0) == 0) {
    auto code = ErrorCodeFromName(req.prompt.substr(5));
    return Status(code.value_or(ErrorCode::kInternal), "the fake engine was told to fail");
  }
  auto words = Words(req.prompt);
  http::CompletionResult result;
  result.prompt_tokens = static_cast<int>(words.size());
  result.finish_reason = "length";
  for (int i = 0; i < req.max_tokens; ++i) {
    if (int64_t ms = delay_ms_.load()) std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    std::string token = " " + words[i % words.size()];
    bool stopped = false;
    for (const auto& stop : req.stop) {
      if ((result.text + token).find(stop) != std::string::npos) stopped = true;
    }
    if (stopped) {
      result.finish_reason = "stop";
      break;
    }
    result.text += token;
    ++result.completion_tokens;
    last_tokens_ = result.completion_tokens;
    if (!on_text(token)) {
      ++cancelled_;
      break;
    }
  }
  if (req.echo) result.text = req.prompt + result.text;  // the fake's tokenizer is the identity
  return result;
}

Result<std::vector<std::vector<float>>> FakeEngine::Embed(const std::vector<std::string>& inputs) {
  std::vector<std::vector<float>> out;
  for (const auto& input : inputs) out.push_back(ExpectedEmbedding(input));
  return out;
}

}  // namespace wbroker::testing
