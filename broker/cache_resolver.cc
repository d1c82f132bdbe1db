// wbroker broker: model resolution in the HF cache, off the io thread.
#include "cache_resolver.h"

#include <boost/asio/post.hpp>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <system_error>
#include <thread>

namespace wbroker::broker {

namespace {

/// One resolution waiting for a thread.
struct Job {
  std::string model;                      ///< repo id or absolute path
  std::string revision;                   ///< as the client asked
  boost::asio::any_io_executor executor;  ///< where `done` runs
  CacheResolver::Callback done;           ///< gets the result
};

}  // namespace

struct CacheResolver::State {
  ResolveFn resolve;             ///< the resolution (ResolveModel by default)
  mutable std::mutex mu;         ///< guards everything below
  std::condition_variable wake;  ///< a job was queued, or stop
  std::deque<Job> queue;         ///< waiting for a thread
  size_t running = 0;            ///< taken by a thread, result not posted yet
  bool stopped = false;          ///< the resolver is gone: post nothing more
};

void CacheResolver::RunThread(const std::shared_ptr<State>& state) {
  std::unique_lock<std::mutex> lock(state->mu);
  for (;;) {
    state->wake.wait(lock, [&] { return state->stopped || !state->queue.empty(); });
    if (state->stopped) return;
    Job job = std::move(state->queue.front());
    state->queue.pop_front();
    ++state->running;
    lock.unlock();
    Result<ResolvedModel> result = state->resolve(job.model, job.revision);
    lock.lock();
    --state->running;
    // Posting under the lock: the destructor takes it to set `stopped`, so
    // nothing reaches the executor once the resolver (and the io_context
    // that outlives it) may be going away.
    if (state->stopped) return;
    boost::asio::post(job.executor,
                      [done = std::move(job.done), result = std::move(result)]() mutable {
                        done(std::move(result));
                      });
  }
}

Result<std::unique_ptr<CacheResolver>> CacheResolver::Create(const Options& options) {
  auto state = std::make_shared<State>();
  state->resolve = options.resolve;
  if (!state->resolve) {
    state->resolve = [cache_dir = options.cache_dir](const std::string& model,
                                                     const std::string& revision) {
      return ResolveModel(cache_dir, model, revision);
    };
  }
  std::unique_ptr<CacheResolver> resolver(new CacheResolver(state));
  for (unsigned i = 0; i < std::max(1u, options.threads); ++i) {
    try {
      // Detached: a thread stuck in a hung filesystem call must not make
      // the destructor (and so the broker's exit) wait for it. It holds the
      // state, which outlives the resolver until the last thread returns.
      std::thread(RunThread, state).detach();
    } catch (const std::system_error& e) {
      // The destructor stops the threads already started.
      return Status(ErrorCode::kResourceExhausted,
                    std::string("cannot start a cache resolver thread: ") + e.what());
    }
  }
  return resolver;
}

CacheResolver::~CacheResolver() {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->stopped = true;
  state_->queue.clear();
  state_->wake.notify_all();
}

void CacheResolver::Resolve(std::string model, std::string revision,
                            boost::asio::any_io_executor executor, Callback done) {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->queue.push_back(
      {std::move(model), std::move(revision), std::move(executor), std::move(done)});
  state_->wake.notify_one();
}

size_t CacheResolver::pending() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->queue.size() + state_->running;
}

}  // namespace wbroker::broker
