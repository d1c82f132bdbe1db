// wbroker-worker: SwappableEngine (see swappable_engine.h).
#include "swappable_engine.h"

namespace wbroker::app {
namespace {

Status NoEngine() {
  return Status(ErrorCode::kUnavailable,
                "the model is being replaced by a new revision; retry in a moment");
}

}  // namespace

SwappableEngine::SwappableEngine(std::shared_ptr<http::Engine> initial)
    : current_(std::move(initial)) {
  if (current_) last_info_ = current_->Info();
}

std::shared_ptr<http::Engine> SwappableEngine::Swap(std::shared_ptr<http::Engine> next) {
  std::lock_guard<std::mutex> lock(mu_);
  if (next) last_info_ = next->Info();
  std::swap(current_, next);
  return next;
}

std::shared_ptr<http::Engine> SwappableEngine::Current() const {
  std::lock_guard<std::mutex> lock(mu_);
  return current_;
}

http::ModelInfo SwappableEngine::Info() const {
  std::lock_guard<std::mutex> lock(mu_);
  return current_ ? current_->Info() : last_info_;
}

bool SwappableEngine::Ready() const {
  auto engine = Current();
  return engine && engine->Ready();
}

Result<http::CompletionResult> SwappableEngine::Complete(const http::CompletionRequest& req,
                                                         const http::TextCallback& on_text) {
  auto engine = Current();
  if (!engine) return NoEngine();
  return engine->Complete(req, on_text);
}

Result<std::vector<std::vector<float>>> SwappableEngine::Embed(
    const std::vector<std::string>& inputs) {
  auto engine = Current();
  if (!engine) return NoEngine();
  return engine->Embed(inputs);
}

}  // namespace wbroker::app
