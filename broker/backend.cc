// wbroker broker: helpers shared by every backend implementation.
#include "backend.h"

#include <thread>
#include <vector>

namespace wbroker::broker {

void RunOnThreads(unsigned n, const std::function<void()>& fn) {
  std::vector<std::thread> threads;
  threads.reserve(n > 0 ? n - 1 : 0);
  for (unsigned t = 1; t < n; ++t) threads.emplace_back(fn);
  fn();
  for (auto& t : threads) t.join();
}

}  // namespace wbroker::broker
