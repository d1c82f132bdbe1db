// wbroker broker: the loaded models, their states and lease counts.
//
// Lives on the io_context thread: every method must be called there. Loads
// run on a separate thread pool and report back by posting to the io_context.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>
#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backend.h"
#include "memory_budget.h"
#include "model_loader.h"
#include "progress.h"
#include "wbroker/common/hf_cache.h"

namespace wbroker::broker {

enum class ModelState { kLoading, kReady, kFailed, kDraining };
const char* ModelStateName(ModelState state);

/// "model@commit", plus ":dtype" when cast: how the registry names an entry.
std::string ModelKey(const ResolvedModel& model, std::optional<DType> cast_to);

/// One revision of one model on the broker's device.
struct ModelEntry {
  std::string key;               ///< "model@commit", plus ":dtype" when cast
  std::optional<DType> cast_to;  ///< dtype conversion applied at load
  ResolvedModel resolved;        ///< where it came from
  ModelState state = ModelState::kLoading;
  Status error;               ///< why it failed (kFailed)
  LoadedModel loaded;         ///< arena + manifest once ready
  std::string manifest_text;  ///< tensors as JSON text, serialized once per load
  uint64_t leases = 0;        ///< live leases across all connections
  bool pinned = false;        ///< preloaded by config: never freed implicitly
  bool adopted = false;       ///< taken over from an earlier broker, not loaded
  uint64_t attaches = 0;      ///< attaches served, for status
  /// Last attach or release: the least recently used unleased model is evicted first.
  std::chrono::steady_clock::time_point last_used = std::chrono::steady_clock::now();
  /// Key of the revision that replaced this one (`load --replace`); "" while current.
  std::string superseded_by;
  /// This load replaces other revisions: it must fit beside them (the load
  /// checks the device's free memory too), unless `wait_for_drain`.
  bool replacing = false;
  /// --allow-downtime: a load short of room waits for draining revisions to be freed.
  bool wait_for_drain = false;
  std::chrono::system_clock::time_point loaded_at;  ///< when it became ready
  /// The load's counters (added to by the loader threads, sampled on the io thread).
  std::shared_ptr<LoadProgress> progress = std::make_shared<LoadProgress>();
  ProgressLogPolicy progress_log;    ///< io thread: when the next progress log line is due
  double load_bytes_per_second = 0;  ///< read throughput of the load that made it ready
  std::vector<std::function<void(Status)>> waiters;  ///< called when loading ends
};

/// Knobs of the registry.
struct RegistryOptions {
  unsigned loader_threads = 4;      ///< reader threads per load
  unsigned max_parallel_loads = 2;  ///< loads running at once
  /// Called on the io thread when a load ends (ready or failed): the metrics.
  std::function<void(const ModelEntry&)> on_load_finished;
  /// Called on the io thread when an entry's arena is freed (unload, last
  /// lease of a draining entry, Clear()).
  std::function<void(const ModelEntry&)> on_freed;
  /// Called on the io thread when `old` (still leased) was replaced by
  /// `replacement`: the clients holding `old` are told.
  std::function<void(const ModelEntry& old, const ModelEntry& replacement)> on_superseded;
  /// How long a load with `wait_for_drain` waits for replaced revisions to be freed.
  std::chrono::milliseconds drain_wait{std::chrono::minutes(10)};
};

/// What Replace() asks for.
struct ReplaceOptions {
  bool pin = false;             ///< keep the new revision loaded (preloads)
  bool allow_downtime = false;  ///< free the old revisions first when both do not fit
};

/// One model as the metrics see it: a copy, so scrapes on other threads never
/// touch an entry the io thread is changing.
struct ModelMetricsRow {
  std::string model;                 ///< repo id or path
  std::string revision;              ///< full commit ("" for an uncommitted local dir)
  std::string dtype;                 ///< bf16 | fp16 | fp32 when cast, else "stored"
  std::string state;                 ///< loading | ready | failed | draining
  uint64_t bytes = 0;                ///< arena bytes (0 until ready)
  uint64_t leases = 0;               ///< live leases
  double load_seconds = 0;           ///< duration of its load (ready and draining)
  double load_bytes_per_second = 0;  ///< read throughput of its load
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
  /// Unless the request named a commit (or `exact_commit`), a revision that
  /// was replaced (`load --replace`) leads to its replacement.
  void Acquire(const ResolvedModel& model, std::optional<DType> cast_to, bool allow_load, bool pin,
               AcquireCallback done, bool exact_commit = false);

  /// Loads `model` beside the other loaded revisions of the same repo (and
  /// dtype), then points attaches that do not name a commit at it. The old
  /// revisions drain: their holders are told (on_superseded), no new leases,
  /// freed at their last release. Without `allow_downtime` the new copy must
  /// fit beside the old ones, or nothing changes and `done` gets
  /// kResourceExhausted saying so. `done` gets the new entry.
  void Replace(const ResolvedModel& model, std::optional<DType> cast_to,
               const ReplaceOptions& options, AcquireCallback done);

  /// Sets or clears the pin of a loaded entry (config reload); false when absent.
  bool SetPinned(const ResolvedModel& model, std::optional<DType> cast_to, bool pinned);
  /// The entry for `model` at its exact commit, or nullptr.
  std::shared_ptr<ModelEntry> Get(const ResolvedModel& model, std::optional<DType> cast_to) const;

  /// Inserts a ready entry around `loaded`, an arena an earlier broker made
  /// (checked by the caller), reserving its bytes in the budget. Refused when
  /// the key is already loading, ready or draining, or the budget is short.
  Result<std::shared_ptr<ModelEntry>> Adopt(const ResolvedModel& model,
                                            std::optional<DType> cast_to, LoadedModel loaded);

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

  /// Every entry (config reload walks the pinned ones).
  std::vector<std::shared_ptr<ModelEntry>> Entries() const;
  /// Entries whose model matches, for unload by branch name resolution.
  std::vector<std::shared_ptr<ModelEntry>> Find(const std::string& model) const;

  /// The progress counters of the entry for `model` (nullptr when there is none).
  std::shared_ptr<const LoadProgress> ProgressOf(const ResolvedModel& model,
                                                 std::optional<DType> cast_to) const;

  /// {"models":[...]} rows for status.
  nlohmann::json StatusJson() const;
  /// Any thread: the models as of the last change (for metrics scrapes).
  std::vector<ModelMetricsRow> MetricsRows() const;
  /// Any thread: leases handed out since start.
  uint64_t attaches_total() const { return attaches_total_.load(std::memory_order_relaxed); }
  /// Any thread: leases ended since start (release requests and closed connections).
  uint64_t releases_total() const { return releases_total_.load(std::memory_order_relaxed); }
  /// Any thread: unleased models evicted to make room since start.
  uint64_t evictions_total() const { return evictions_total_.load(std::memory_order_relaxed); }
  /// Bytes held by ready or draining arenas.
  uint64_t ArenaBytes() const;
  /// Frees everything not leased; used at shutdown.
  void Clear();

 private:
  /// Creates the entry for `model` (state loading) and files it under its key.
  std::shared_ptr<ModelEntry> NewEntry(const ResolvedModel& model, std::optional<DType> cast_to,
                                       bool pin);
  /// Calls `done` when `entry`'s load ends, then starts that load.
  void LoadEntry(const std::shared_ptr<ModelEntry>& entry, AcquireCallback done);
  void StartLoad(const std::shared_ptr<ModelEntry>& entry);
  void FinishLoad(const std::shared_ptr<ModelEntry>& entry, Result<LoadedModel> result);
  void Free(const std::shared_ptr<ModelEntry>& entry);
  /// Io thread: evicts unleased, unpinned ready models, least recently used
  /// first, until `bytes` fit in the budget. Ok when they fit; kUnavailable
  /// when they will once draining revisions are freed and `wait_for_drain`;
  /// otherwise kResourceExhausted naming the numbers and what holds the memory.
  Status MakeRoom(uint64_t bytes, const std::string& what, bool wait_for_drain);
  /// Pool thread: runs MakeRoom on the io thread and waits for its answer.
  Status MakeRoomFromLoader(uint64_t bytes, const std::string& what, bool wait_for_drain);
  /// Io thread: `old` was replaced by `replacement`: redirect, unpin, drain or free.
  void Supersede(const std::shared_ptr<ModelEntry>& old,
                 const std::shared_ptr<ModelEntry>& replacement);
  /// Copies the entries into rows_ (after every change the metrics show).
  void PublishRows();
  /// Logs the progress of running loads now and then; re-arms while any runs.
  void DoLogProgress();

  boost::asio::io_context& io_;                                 ///< where callbacks run
  Backend& backend_;                                            ///< makes arenas
  MemoryBudget& budget_;                                        ///< --max-memory accounting
  RegistryOptions options_;                                     ///< knobs
  boost::asio::thread_pool pool_;                               ///< runs loads off the io thread
  std::map<std::string, std::shared_ptr<ModelEntry>> entries_;  ///< by key
  /// Key of a replaced revision -> key of its replacement (always in entries_).
  std::map<std::string, std::string> redirects_;
  std::atomic<bool> stopping_{false};  ///< the destructor runs: loaders stop waiting for room
  boost::asio::steady_timer progress_timer_;  ///< paces the progress log lines
  bool progress_timer_armed_ = false;         ///< a DoLogProgress wait is pending
  mutable std::mutex rows_mu_;                ///< guards rows_ (io thread vs. scrapes)
  std::vector<ModelMetricsRow> rows_;         ///< what MetricsRows() returns
  std::atomic<uint64_t> attaches_total_{0};   ///< leases handed out
  std::atomic<uint64_t> releases_total_{0};   ///< leases ended
  std::atomic<uint64_t> evictions_total_{0};  ///< models evicted for room
};

}  // namespace wbroker::broker
