// wbroker HTTP worker: the compute thread pool.
#include "wbroker/http/compute_pool.h"

#include <boost/asio/post.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <exception>

namespace wbroker::http {

ComputePool::ComputePool(size_t threads, size_t max_pending)
    : pool_(std::max<size_t>(threads, 1)), max_pending_(std::max<size_t>(max_pending, 1)) {}

ComputePool::~ComputePool() {
  pool_.stop();
  pool_.join();
}

bool ComputePool::TrySubmit(std::function<void()> job) {
  size_t n = pending_.load();
  do {
    if (n >= max_pending_) return false;
  } while (!pending_.compare_exchange_weak(n, n + 1));
  boost::asio::post(pool_, [this, job = std::move(job)] {
    try {
      job();
    } catch (const std::exception& e) {
      // Jobs catch their own failures; this is the last line of defence.
      spdlog::error("compute job failed: {}", e.what());
    } catch (...) {
      spdlog::error("compute job failed with a non-standard exception");
    }
    --pending_;
  });
  return true;
}

void ComputePool::Join() {
  pool_.join();
}

}  // namespace wbroker::http
