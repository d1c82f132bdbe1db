// wbroker broker: the loaded models, their states and lease counts.
//
// Lives on the io_context thread: every method must be called there. Loads
// run on a separate thread pool and report back by posting to the io_context.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/thread_pool.hpp>
#include <nlohmann/json.hpp>

#include "backend.h"
#include "memory_budget.h"
#include "model_loader.h"
#include "wbroker/common/hf_cache.h"

namespace wbroker::broker {

enum class ModelState { kLoading, kReady, kFailed, kDraining };
const char* ModelStateName(ModelState state);

/// One revision of one model on the broker's device.
struct ModelEntry {
  std::string key;                   ///< "model@commit", plus ":dtype" when cast
  std::optional<DType> cast_to;      ///< dtype conversion applied at load
  ResolvedModel resolved;            ///< where it came from
  ModelState state = ModelState::kLoading;
  Status error;                      ///< why it failed (kFailed)
  LoadedModel loaded;                ///< arena + manifest once ready
  std::string manifest_text;         ///< tensors as JSON text, serialized once per load
  uint64_t leases = 0;               ///< live leases across all connections
  bool pinned = false;               ///< preloaded by config: never freed implicitly
  uint64_t attaches = 0;             ///< attaches served, for status
  std::chrono::system_clock::time_point loaded_at;  ///< when it became ready
  uint64_t load_done_bytes = 0;      ///< progress while loading
  uint64_t load_total_bytes = 0;     ///< total while loading
  std::vector<std::function<void(Status)>> waiters;  ///< called when loading ends
};

/// Knobs of the registry.
struct RegistryOptions {
  unsigned loader_threads = 4;  ///< reader threads per load
  unsigned max_parallel_loads = 2;  ///< loads running at once
};

class ModelRegistry {
 public:
  ModelRegistry(boost::asio::io_context& io, Backend& backend, MemoryBudget& budget,
                const RegistryOptions& options);
  ~ModelRegistry();

  using AcquireCallback = std::function<void(Result<std::shared_ptr<ModelEntry>>)>;

  /// Calls `done` with the ready entry for `model`, loading it first when it
  /// is not loaded and `allow_load` is set. A failed entry is retried. A
  /// draining entry is refused. `done` may run before Acquire returns.
  void Acquire(const ResolvedModel& model, std::optional<DType> cast_to, bool allow_load, bool pin,
               AcquireCallback done);

  /// Counts a lease on a ready entry.
  void AddLease(const std::shared_ptr<ModelEntry>& entry);
  /// Drops a lease; frees a draining entry at its last lease.
  void ReleaseLease(const std::shared_ptr<ModelEntry>& entry);

  /// Unloads every loaded revision of `model` whose commit starts with
  /// `revision_prefix` (all revisions when empty). Leased entries are refused
  /// unless `force`, which drains them. Returns {"unloaded":[keys],"draining":[keys]}.
  Result<nlohmann::json> Unload(const std::string& model, const std::string& revision_prefix,
                                bool force);

  /// The checks of Unload without acting: kNotFound when nothing matches,
  /// kFailedPrecondition when a match is loading or (without `force`) leased.
  Status CheckUnload(const std::string& model, const std::string& revision_prefix,
                     bool force) const;

  /// Entries whose model matches, for unload by branch name resolution.
  std::vector<std::shared_ptr<ModelEntry>> Find(const std::string& model) const;

  /// {"models":[...]} rows for status.
  nlohmann::json StatusJson() const;
  /// Bytes held by ready or draining arenas.
  uint64_t ArenaBytes() const;
  /// Frees everything not leased; used at shutdown.
  void Clear();

 private:
  void StartLoad(const std::shared_ptr<ModelEntry>& entry);
  void FinishLoad(const std::shared_ptr<ModelEntry>& entry, Result<LoadedModel> result);
  void Free(const std::shared_ptr<ModelEntry>& entry);

  boost::asio::io_context& io_;     ///< where callbacks run
  Backend& backend_;                ///< makes arenas
  MemoryBudget& budget_;            ///< --max-memory accounting
  RegistryOptions options_;         ///< knobs
  boost::asio::thread_pool pool_;   ///< runs loads off the io thread
  std::map<std::string, std::shared_ptr<ModelEntry>> entries_;  ///< by key
};

}  // namespace wbroker::broker
