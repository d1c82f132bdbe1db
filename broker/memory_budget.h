// wbroker broker: the byte budget of one device (--max-memory).
#pragma once

#include <cstdint>
#include <mutex>

#include "wbroker/common/status.h"

namespace wbroker::broker {

/// Thread-safe accounting of arena bytes against a limit (0 = unlimited).
class MemoryBudget {
 public:
  explicit MemoryBudget(uint64_t limit_bytes) : limit_(limit_bytes) {}

  /// Reserves `bytes` or returns kResourceExhausted naming the numbers.
  Status TryReserve(uint64_t bytes, const std::string& what);
  /// Returns bytes reserved earlier.
  void Release(uint64_t bytes);

  uint64_t used() const;
  uint64_t limit() const { return limit_; }

 private:
  mutable std::mutex mu_;  ///< guards used_
  const uint64_t limit_;   ///< 0 = no limit
  uint64_t used_ = 0;      ///< bytes reserved now
};

}  // namespace wbroker::broker
