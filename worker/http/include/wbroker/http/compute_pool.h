// wbroker HTTP worker: the threads that run inference, apart from the I/O
// threads, with a bound on how much work may wait for them.
#pragma once

#include <boost/asio/thread_pool.hpp>

#include <atomic>
#include <cstddef>
#include <functional>

namespace wbroker::http {

class ComputePool {
 public:
  /// Starts `threads` threads (at least one); at most `max_pending` jobs may
  /// be queued or running at once.
  ComputePool(size_t threads, size_t max_pending);
  /// Joins the threads; jobs not yet started are dropped (destroyed unrun).
  ~ComputePool();

  /// Queues `job`; false (and `job` untouched) when max_pending are pending.
  bool TrySubmit(std::function<void()> job);
  /// Waits until every queued job has run and the threads have exited.
  void Join();
  /// Jobs queued or running now.
  size_t pending() const { return pending_.load(); }

 private:
  boost::asio::thread_pool pool_;   ///< the threads
  const size_t max_pending_;        ///< bound on pending_
  std::atomic<size_t> pending_{0};  ///< queued or running jobs
};

}  // namespace wbroker::http
