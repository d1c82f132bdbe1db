// wbroker broker: model registry. All state changes happen on the io thread;
// the load itself runs on the pool and posts its result back.
#include "model_registry.h"

#include <boost/asio/post.hpp>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <future>

#include "wbroker/common/size_units.h"

namespace wbroker::broker {

const char* ModelStateName(ModelState state) {
  switch (state) {
    case ModelState::kLoading:
      return "loading";
    case ModelState::kReady:
      return "ready";
    case ModelState::kFailed:
      return "failed";
    case ModelState::kDraining:
      return "draining";
  }
  return "unknown";
}

namespace {

// True when the request named the commit itself (all of it, or a prefix of at
// least 7 hex digits) rather than a branch or tag: such a request wants
// exactly that revision, never its replacement.
bool NamesCommit(const ResolvedModel& m) {
  const std::string& rev = m.requested_revision;
  return rev.size() >= 7 && !m.commit.empty() && m.commit.rfind(rev, 0) == 0 &&
         rev.find_first_not_of("0123456789abcdef") == std::string::npos;
}

}  // namespace

std::string ModelKey(const ResolvedModel& m, std::optional<DType> cast_to) {
  std::string key = m.model + "@" + (m.commit.empty() ? "local" : m.commit);
  if (cast_to) key += ":" + std::string(DTypeName(*cast_to));
  return key;
}

ModelRegistry::ModelRegistry(boost::asio::io_context& io, Backend& backend, MemoryBudget& budget,
                             const RegistryOptions& options)
    : io_(io),
      backend_(backend),
      budget_(budget),
      options_(options),
      pool_(std::max(1u, options.max_parallel_loads)),
      progress_timer_(io) {}

ModelRegistry::~ModelRegistry() {
  // Loads in flight finish on the pool before members go away; one waiting for
  // room would wait for the io thread, which no longer runs.
  stopping_.store(true);
  pool_.join();
}

void ModelRegistry::Acquire(const ResolvedModel& model, std::optional<DType> cast_to,
                            bool allow_load, bool pin, AcquireCallback done, bool exact_commit) {
  std::string key = ModelKey(model, cast_to);
  exact_commit = exact_commit || NamesCommit(model);
  if (!exact_commit) {
    // A replaced revision leads to its replacement (chains were collapsed
    // when they formed, so one step is enough).
    if (auto r = redirects_.find(key); r != redirects_.end()) key = r->second;
  }
  auto it = entries_.find(key);
  if (it != entries_.end()) {
    auto entry = it->second;
    if (pin) entry->pinned = true;
    switch (entry->state) {
      case ModelState::kReady:
        entry->last_used = std::chrono::steady_clock::now();
        done(entry);
        return;
      case ModelState::kLoading:
        entry->waiters.push_back([entry, done](Status s) {
          if (s.ok())
            done(entry);
          else
            done(s);
        });
        return;
      case ModelState::kDraining:
        if (!entry->superseded_by.empty()) {
          done(Status(ErrorCode::kFailedPrecondition,
                      fmt::format("model {} was replaced by {}; attach without a revision (or "
                                  "with the branch) to get the new one",
                                  key, entry->superseded_by)));
          return;
        }
        done(Status(ErrorCode::kFailedPrecondition,
                    fmt::format("model {} is being unloaded (draining); attach after it is "
                                "freed or load it again",
                                key)));
        return;
      case ModelState::kFailed:
        entries_.erase(it);  // retry below: the files may have been fixed
        PublishRows();
        break;
    }
  }
  if (!allow_load) {
    done(Status(ErrorCode::kNotFound,
                fmt::format("model {} is not loaded and this broker does not load on attach "
                            "(load_on_attach = false); ask an admin to `wbrokerctl load` it",
                            key)));
    return;
  }
  LoadEntry(NewEntry(model, cast_to, pin), std::move(done));
}

std::shared_ptr<ModelEntry> ModelRegistry::NewEntry(const ResolvedModel& model,
                                                    std::optional<DType> cast_to, bool pin) {
  auto entry = std::make_shared<ModelEntry>();
  entry->key = ModelKey(model, cast_to);
  entry->resolved = model;
  entry->cast_to = cast_to;
  entry->pinned = pin;
  entries_[entry->key] = entry;
  return entry;
}

void ModelRegistry::LoadEntry(const std::shared_ptr<ModelEntry>& entry, AcquireCallback done) {
  entry->waiters.push_back([entry, done](Status s) {
    if (s.ok())
      done(entry);
    else
      done(s);
  });
  PublishRows();
  StartLoad(entry);
}

void ModelRegistry::StartLoad(const std::shared_ptr<ModelEntry>& entry) {
  spdlog::info("loading {} from {}", entry->key, entry->resolved.snapshot_dir.string());
  boost::asio::post(pool_, [this, entry, resolved = entry->resolved, cast_to = entry->cast_to] {
    LoaderOptions opts;
    opts.cast_to = cast_to;
    opts.threads = options_.loader_threads;
    opts.budget = &budget_;
    // The readers only add to these counters; the io thread samples them.
    opts.progress = entry->progress.get();
    opts.require_free_memory = entry->replacing && !entry->wait_for_drain;
    opts.room_wait = entry->wait_for_drain ? options_.drain_wait : std::chrono::milliseconds(0);
    opts.make_room = [this, wait = entry->wait_for_drain](uint64_t bytes, const std::string& what) {
      return MakeRoomFromLoader(bytes, what, wait);
    };
    Result<LoadedModel> result = LoadModel(resolved, backend_, opts);
    boost::asio::post(io_, [this, entry, result = std::move(result)]() mutable {
      FinishLoad(entry, std::move(result));
    });
  });
  if (!progress_timer_armed_) DoLogProgress();
}

void ModelRegistry::DoLogProgress() {
  bool loading = false;
  for (const auto& [key, e] : entries_) {
    if (e->state != ModelState::kLoading) continue;
    loading = true;
    const ProgressSample sample = e->progress->Sample();
    if (e->progress_log.ShouldLog(sample)) spdlog::info("{}", ProgressLogLine(key, sample));
  }
  progress_timer_armed_ = loading;
  if (!loading) return;
  progress_timer_.expires_after(std::chrono::milliseconds(500));
  progress_timer_.async_wait([this](const boost::system::error_code& ec) {
    // operation_aborted: the registry is going away; `this` may be gone.
    if (ec) return;
    DoLogProgress();
  });
}

void ModelRegistry::FinishLoad(const std::shared_ptr<ModelEntry>& entry,
                               Result<LoadedModel> result) {
  auto waiters = std::move(entry->waiters);
  entry->waiters.clear();
  if (!result.ok()) {
    entry->state = ModelState::kFailed;
    entry->error = result.status();
    spdlog::error("load of {} failed: {}", entry->key, entry->error.ToString());
    PublishRows();
    if (options_.on_load_finished) options_.on_load_finished(*entry);
    for (auto& w : waiters) w(entry->error);
    return;
  }
  entry->loaded = std::move(result).value();
  entry->manifest_text = ManifestToJson(entry->loaded.tensors)
                             .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  entry->state = ModelState::kReady;
  entry->loaded_at = std::chrono::system_clock::now();
  double secs = entry->loaded.seconds;
  entry->load_bytes_per_second =
      secs > 0 ? static_cast<double>(entry->progress->Sample().bytes_done) / secs : 0;
  spdlog::info("loaded {}: {} tensors, {} in {} file(s) in {:.3f} s ({:.2f} GB/s) on {} ({})",
               entry->key, entry->loaded.tensors.size(), FormatBytes(entry->loaded.tensor_bytes),
               entry->loaded.files, secs, secs > 0 ? entry->loaded.tensor_bytes / secs / 1e9 : 0.0,
               backend_.device(), backend_.name());
  PublishRows();
  if (options_.on_load_finished) options_.on_load_finished(*entry);
  for (auto& w : waiters) w(Status::Ok());
}

Result<std::shared_ptr<ModelEntry>> ModelRegistry::Adopt(const ResolvedModel& model,
                                                         std::optional<DType> cast_to,
                                                         LoadedModel loaded) {
  const std::string key = ModelKey(model, cast_to);
  auto it = entries_.find(key);
  if (it != entries_.end() && it->second->state != ModelState::kFailed)
    return Status(ErrorCode::kAlreadyExists, fmt::format("model {} is already {} here", key,
                                                         ModelStateName(it->second->state)));
  WB_RETURN_IF_ERROR(budget_.TryReserve(loaded.arena->size(), "adopting " + key));
  auto entry = NewEntry(model, cast_to, /*pin=*/false);
  entry->loaded = std::move(loaded);
  entry->manifest_text = ManifestToJson(entry->loaded.tensors)
                             .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  entry->state = ModelState::kReady;
  entry->adopted = true;
  entry->loaded_at = std::chrono::system_clock::now();
  spdlog::info("adopted {}: {} tensors, {} on {} ({}), not loaded again", key,
               entry->loaded.tensors.size(), FormatBytes(entry->loaded.arena->size()),
               backend_.device(), backend_.name());
  PublishRows();
  return entry;
}

void ModelRegistry::AddLease(const std::shared_ptr<ModelEntry>& entry) {
  entry->last_used = std::chrono::steady_clock::now();
  ++entry->leases;
  ++entry->attaches;
  attaches_total_.fetch_add(1, std::memory_order_relaxed);
  PublishRows();
}

void ModelRegistry::ReleaseLease(const std::shared_ptr<ModelEntry>& entry) {
  if (entry->leases > 0) --entry->leases;
  entry->last_used = std::chrono::steady_clock::now();
  releases_total_.fetch_add(1, std::memory_order_relaxed);
  if (entry->leases == 0 && entry->state == ModelState::kDraining) {
    spdlog::info("last lease of draining {} released: freeing it", entry->key);
    Free(entry);
  }
  PublishRows();
}

void ModelRegistry::Free(const std::shared_ptr<ModelEntry>& entry) {
  if (entry->loaded.arena) budget_.Release(entry->loaded.arena->size());
  if (entry->loaded.arena && options_.on_freed) options_.on_freed(*entry);
  entry->loaded.arena.reset();
  auto it = entries_.find(entry->key);
  if (it != entries_.end() && it->second == entry) {
    entries_.erase(it);
    // Nothing may lead to a freed model: the next attach of a revision it
    // replaced resolves afresh. (A freed replaced revision keeps leading to
    // its replacement.)
    for (auto r = redirects_.begin(); r != redirects_.end();) {
      if (r->second == entry->key)
        r = redirects_.erase(r);
      else
        ++r;
    }
  }
  PublishRows();
}

Status ModelRegistry::MakeRoom(uint64_t bytes, const std::string& what, bool wait_for_drain) {
  auto fits = [&] {
    const uint64_t limit = budget_.limit(), used = budget_.used();
    return limit == 0 || (bytes <= limit && used <= limit - bytes);
  };
  std::vector<std::shared_ptr<ModelEntry>> idle;
  for (const auto& [key, e] : entries_) {
    if (e->state == ModelState::kReady && e->leases == 0 && !e->pinned) idle.push_back(e);
  }
  std::sort(idle.begin(), idle.end(),
            [](const auto& a, const auto& b) { return a->last_used < b->last_used; });
  for (const auto& e : idle) {
    if (fits()) break;
    spdlog::info("evicting {} ({}, unleased, least recently used) to make room for {}", e->key,
                 FormatBytes(e->loaded.arena ? e->loaded.arena->size() : 0), what);
    evictions_total_.fetch_add(1, std::memory_order_relaxed);
    Free(e);
  }
  if (fits()) return Status::Ok();
  // Say what holds the memory, so the operator knows what to unload.
  std::string held;
  bool draining = false;
  for (const auto& [key, e] : entries_) {
    if (!e->loaded.arena) continue;
    if (!held.empty()) held += ", ";
    held += fmt::format("{} ({}, {})", key, FormatBytes(e->loaded.arena->size()),
                        e->pinned ? std::string("pinned")
                        : e->state == ModelState::kDraining
                            ? fmt::format("draining, {} lease(s)", e->leases)
                            : fmt::format("{} lease(s)", e->leases));
    draining = draining || e->state == ModelState::kDraining;
  }
  const std::string msg = fmt::format(
      "{} needs {} but the memory budget (--max-memory {}) has {} in use and nothing more can "
      "be evicted (held by: {})",
      what, FormatBytes(bytes), FormatBytes(budget_.limit()), FormatBytes(budget_.used()),
      held.empty() ? "loads in progress" : held);
  if (wait_for_drain && draining) return Status(ErrorCode::kUnavailable, msg);
  return Status(ErrorCode::kResourceExhausted, msg);
}

Status ModelRegistry::MakeRoomFromLoader(uint64_t bytes, const std::string& what,
                                         bool wait_for_drain) {
  // The registry's state belongs to the io thread: ask it and wait. The
  // promise is shared because a loader that gives up (shutdown) leaves it.
  auto answer = std::make_shared<std::promise<Status>>();
  auto future = answer->get_future();
  boost::asio::post(io_, [this, answer, bytes, what, wait_for_drain] {
    answer->set_value(MakeRoom(bytes, what, wait_for_drain));
  });
  while (future.wait_for(std::chrono::milliseconds(100)) != std::future_status::ready) {
    if (stopping_.load()) return Status(ErrorCode::kUnavailable, what + ": the broker is stopping");
  }
  return future.get();
}

void ModelRegistry::Replace(const ResolvedModel& model, std::optional<DType> cast_to,
                            const ReplaceOptions& options, AcquireCallback done) {
  const std::string key = ModelKey(model, cast_to);
  std::vector<std::shared_ptr<ModelEntry>> olds;
  for (const auto& [k, e] : entries_) {
    if (k == key || e->resolved.model != model.model || e->cast_to != cast_to) continue;
    if (e->state == ModelState::kFailed || !e->superseded_by.empty()) continue;
    if (e->state == ModelState::kLoading) {
      // Replace what it becomes: try again once that load has ended.
      e->waiters.push_back([this, model, cast_to, options, done](Status) {
        Replace(model, cast_to, options, done);
      });
      return;
    }
    olds.push_back(e);
  }
  const bool pin =
      options.pin || std::any_of(olds.begin(), olds.end(), [](const auto& e) { return e->pinned; });
  if (olds.empty()) {
    Acquire(model, cast_to, /*allow_load=*/true, pin, std::move(done), /*exact_commit=*/true);
    return;
  }
  if (options.allow_downtime) {
    // Free the old copies first: their holders are told now and re-attach
    // once the new revision is ready; the load waits for the memory.
    auto existing = entries_.find(key);
    if (existing == entries_.end() || existing->second->state == ModelState::kFailed) {
      if (existing != entries_.end()) entries_.erase(existing);
      auto placeholder = NewEntry(model, cast_to, pin);
      placeholder->replacing = true;
      placeholder->wait_for_drain = true;
      for (const auto& old : olds) Supersede(old, placeholder);
      LoadEntry(placeholder, done);
      return;
    }
  }
  auto on_loaded = [this, olds, done, key](Result<std::shared_ptr<ModelEntry>> entry) {
    if (!entry.ok()) {
      // A refused replacement changes nothing: no failed row stays behind.
      if (auto it = entries_.find(key);
          it != entries_.end() && it->second->state == ModelState::kFailed) {
        entries_.erase(it);
        PublishRows();
      }
      Status st = entry.status();
      if (st.code() == ErrorCode::kResourceExhausted)
        st = Status(st.code(), st.message() +
                                   "; the old revision stays loaded until the new one is "
                                   "ready, so both must fit: free memory, or retry with "
                                   "--allow-downtime to free the old one first");
      done(st);
      return;
    }
    for (const auto& old : olds) {
      auto it = entries_.find(old->key);
      if (it != entries_.end() && it->second == old && old->superseded_by.empty())
        Supersede(old, *entry);
    }
    done(*entry);
  };
  auto existing = entries_.find(key);
  if (existing == entries_.end()) {
    // Mark the new entry as a replacement before its load starts.
    auto entry = NewEntry(model, cast_to, pin);
    entry->replacing = true;
    LoadEntry(entry, std::move(on_loaded));
    return;
  }
  Acquire(model, cast_to, /*allow_load=*/true, pin, std::move(on_loaded), /*exact_commit=*/true);
}

void ModelRegistry::Supersede(const std::shared_ptr<ModelEntry>& old,
                              const std::shared_ptr<ModelEntry>& replacement) {
  spdlog::info("{} replaces {} ({} lease(s) left on it)", replacement->key, old->key, old->leases);
  old->superseded_by = replacement->key;
  if (old->pinned) replacement->pinned = true;
  old->pinned = false;
  // Whatever led to the old revision now leads to the new one.
  for (auto& [from, to] : redirects_)
    if (to == old->key) to = replacement->key;
  redirects_[old->key] = replacement->key;
  redirects_.erase(replacement->key);  // a roll-back: the new revision leads nowhere
  if (old->leases == 0) {
    Free(old);
  } else {
    old->state = ModelState::kDraining;
    if (options_.on_superseded) options_.on_superseded(*old, *replacement);
  }
  PublishRows();
}

bool ModelRegistry::SetPinned(const ResolvedModel& model, std::optional<DType> cast_to,
                              bool pinned) {
  auto it = entries_.find(ModelKey(model, cast_to));
  if (it == entries_.end()) return false;
  it->second->pinned = pinned;
  PublishRows();
  return true;
}

std::shared_ptr<ModelEntry> ModelRegistry::Get(const ResolvedModel& model,
                                               std::optional<DType> cast_to) const {
  auto it = entries_.find(ModelKey(model, cast_to));
  return it == entries_.end() ? nullptr : it->second;
}

std::vector<std::shared_ptr<ModelEntry>> ModelRegistry::Entries() const {
  std::vector<std::shared_ptr<ModelEntry>> out;
  for (const auto& [key, e] : entries_) out.push_back(e);
  return out;
}

std::vector<std::shared_ptr<ModelEntry>> ModelRegistry::Find(const std::string& model) const {
  std::vector<std::shared_ptr<ModelEntry>> out;
  for (const auto& [key, e] : entries_) {
    if (e->resolved.model == model) out.push_back(e);
  }
  return out;
}

Status ModelRegistry::CheckUnload(const std::string& model, const std::string& revision_prefix,
                                  bool force) const {
  bool any = false;
  for (const auto& e : Find(model)) {
    if (e->resolved.commit.rfind(revision_prefix, 0) != 0) continue;
    any = true;
    if (e->state == ModelState::kLoading)
      return Status(ErrorCode::kFailedPrecondition,
                    fmt::format("model {} is still loading; unload it when it is ready", e->key));
    if (e->leases > 0 && !force)
      return Status(ErrorCode::kFailedPrecondition,
                    fmt::format("model {} has {} active lease(s); use --force to drain it (no "
                                "new attaches, freed at the last release)",
                                e->key, e->leases));
  }
  if (!any)
    return Status(ErrorCode::kNotFound,
                  revision_prefix.empty()
                      ? fmt::format("model {} is not loaded", model)
                      : fmt::format("model {} has no loaded revision {}", model, revision_prefix));
  return Status::Ok();
}

Result<nlohmann::json> ModelRegistry::Unload(const std::string& model,
                                             const std::string& revision_prefix, bool force) {
  WB_RETURN_IF_ERROR(CheckUnload(model, revision_prefix, force));
  std::vector<std::shared_ptr<ModelEntry>> matches;
  for (const auto& e : Find(model)) {
    if (e->resolved.commit.rfind(revision_prefix, 0) == 0) matches.push_back(e);
  }
  nlohmann::json out = {{"unloaded", nlohmann::json::array()},
                        {"draining", nlohmann::json::array()}};
  for (const auto& e : matches) {
    if (e->leases > 0) {
      e->state = ModelState::kDraining;
      spdlog::info("draining {}: {} lease(s) left", e->key, e->leases);
      out["draining"].push_back(e->key);
    } else {
      spdlog::info("unloading {}", e->key);
      Free(e);
      out["unloaded"].push_back(e->key);
    }
  }
  PublishRows();
  return out;
}

std::shared_ptr<const LoadProgress> ModelRegistry::ProgressOf(const ResolvedModel& model,
                                                              std::optional<DType> cast_to) const {
  auto it = entries_.find(ModelKey(model, cast_to));
  return it == entries_.end() ? nullptr : it->second->progress;
}

void ModelRegistry::PublishRows() {
  std::vector<ModelMetricsRow> rows;
  rows.reserve(entries_.size());
  for (const auto& [key, e] : entries_) {
    ModelMetricsRow r;
    r.model = e->resolved.model;
    r.revision = e->resolved.commit;
    r.dtype = e->cast_to ? std::string(DTypeName(*e->cast_to)) : "stored";
    r.state = ModelStateName(e->state);
    r.bytes = e->loaded.arena ? e->loaded.arena->size() : 0;
    r.leases = e->leases;
    r.load_seconds = e->loaded.seconds;
    r.load_bytes_per_second = e->load_bytes_per_second;
    rows.push_back(std::move(r));
  }
  std::lock_guard<std::mutex> lock(rows_mu_);
  rows_.swap(rows);
}

std::vector<ModelMetricsRow> ModelRegistry::MetricsRows() const {
  std::lock_guard<std::mutex> lock(rows_mu_);
  return rows_;
}

nlohmann::json ModelRegistry::StatusJson() const {
  nlohmann::json models = nlohmann::json::array();
  for (const auto& [key, e] : entries_) {
    nlohmann::json row = {
        {"model", e->resolved.model},
        {"revision", e->resolved.commit},
        {"requested_revision", e->resolved.requested_revision},
        {"snapshot", e->resolved.snapshot_dir.string()},
        {"device", backend_.device()},
        {"backend", backend_.name()},
        {"bytes", e->loaded.arena ? e->loaded.arena->size() : 0},
        {"tensor_bytes", e->loaded.tensor_bytes},
        {"tensors", e->loaded.tensors.size()},
        {"dtype", e->cast_to ? std::string(DTypeName(*e->cast_to)) : "as stored"},
        {"leases", e->leases},
        {"attaches", e->attaches},
        {"state", ModelStateName(e->state)},
        {"pinned", e->pinned},
        {"superseded_by", e->superseded_by},
        {"adopted", e->adopted},
        {"load_seconds", e->loaded.seconds},
    };
    if (e->state == ModelState::kLoading) {
      const ProgressSample p = e->progress->Sample();
      // The same fields, under the same names, as the load's progress events.
      row["progress"] = ProgressSampleJson(p);
    }
    if (e->state == ModelState::kFailed) row["error"] = e->error.ToString();
    models.push_back(std::move(row));
  }
  return models;
}

uint64_t ModelRegistry::ArenaBytes() const {
  uint64_t total = 0;
  for (const auto& [key, e] : entries_) {
    if (e->loaded.arena) total += e->loaded.arena->size();
  }
  return total;
}

void ModelRegistry::Clear() {
  std::vector<std::shared_ptr<ModelEntry>> all;
  for (const auto& [key, e] : entries_) all.push_back(e);
  for (const auto& e : all) {
    if (e->state != ModelState::kLoading) Free(e);
  }
}

}  // namespace wbroker::broker
