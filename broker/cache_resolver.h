// wbroker broker: model resolution in the HF cache, off the io thread.
#pragma once

#include <boost/asio/any_io_executor.hpp>

#include <cstddef>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>

#include "wbroker/common/hf_cache.h"
#include "wbroker/common/status.h"

namespace wbroker::broker {

/// Runs ResolveModel (stat, readlink and small reads in the HF cache) on
/// threads of its own and hands each result to an executor. A cache on a
/// network filesystem can block such calls for as long as its server is
/// away; the io thread must keep serving the other clients meanwhile.
///
/// The threads are detached: one stuck in the kernel cannot hold up the
/// broker's exit. Once the resolver is destroyed, queued resolutions are
/// dropped and results that arrive late are discarded, never posted.
class CacheResolver {
 public:
  /// The resolution itself: ResolveModel in `cache_dir` unless replaced.
  using ResolveFn =
      std::function<Result<ResolvedModel>(const std::string& model, const std::string& revision)>;
  struct Options {
    std::filesystem::path cache_dir;  ///< the HF hub cache resolutions look in
    unsigned threads = 4;             ///< resolutions that may block at once
    ResolveFn resolve;                ///< empty: ResolveModel(cache_dir, ...)
  };
  using Callback = std::function<void(Result<ResolvedModel>)>;

  static Result<std::unique_ptr<CacheResolver>> Create(const Options& options);
  ~CacheResolver();
  CacheResolver(const CacheResolver&) = delete;
  CacheResolver& operator=(const CacheResolver&) = delete;

  /// Resolves `model` at `revision` on a resolver thread, then posts
  /// `done(result)` to `executor`. `done` never runs inside this call.
  void Resolve(std::string model, std::string revision, boost::asio::any_io_executor executor,
               Callback done);

  /// Resolutions queued or running now (a stuck cache shows here).
  size_t pending() const;

 private:
  struct State;
  /// A resolver thread: takes jobs until the resolver is gone.
  static void RunThread(const std::shared_ptr<State>& state);
  explicit CacheResolver(std::shared_ptr<State> state) : state_(std::move(state)) {}
  std::shared_ptr<State> state_;  ///< queue and stop flag, shared with the threads
};

}  // namespace wbroker::broker
