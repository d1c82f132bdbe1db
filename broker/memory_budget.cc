#include "memory_budget.h"

#include <fmt/format.h>

#include "wbroker/common/size_units.h"

namespace wbroker::broker {

Status MemoryBudget::TryReserve(uint64_t bytes, const std::string& what) {
  std::lock_guard<std::mutex> lock(mu_);
  if (limit_ != 0 && (bytes > limit_ || used_ > limit_ - bytes))
    return Status(ErrorCode::kResourceExhausted,
                  fmt::format("{} needs {} but the memory budget (--max-memory {}) has {} in use "
                              "and {} free",
                              what, FormatBytes(bytes), FormatBytes(limit_), FormatBytes(used_),
                              FormatBytes(limit_ - std::min(used_, limit_))));
  used_ += bytes;
  return Status::Ok();
}

void MemoryBudget::Release(uint64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  used_ -= std::min(used_, bytes);
}

uint64_t MemoryBudget::used() const {
  std::lock_guard<std::mutex> lock(mu_);
  return used_;
}

}  // namespace wbroker::broker
