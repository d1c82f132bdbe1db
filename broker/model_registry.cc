// wbroker broker: model registry. All state changes happen on the io thread;
// the load itself runs on the pool and posts its result back.
#include "model_registry.h"

#include <boost/asio/post.hpp>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

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

std::string KeyOf(const ResolvedModel& m, std::optional<DType> cast_to) {
  std::string key = m.model + "@" + (m.commit.empty() ? "local" : m.commit);
  if (cast_to) key += ":" + std::string(DTypeName(*cast_to));
  return key;
}

}  // namespace

ModelRegistry::ModelRegistry(boost::asio::io_context& io, Backend& backend, MemoryBudget& budget,
                             const RegistryOptions& options)
    : io_(io),
      backend_(backend),
      budget_(budget),
      options_(options),
      pool_(std::max(1u, options.max_parallel_loads)),
      progress_timer_(io) {}

ModelRegistry::~ModelRegistry() {
  // Loads in flight finish on the pool before members go away.
  pool_.join();
}

void ModelRegistry::Acquire(const ResolvedModel& model, std::optional<DType> cast_to,
                            bool allow_load, bool pin, AcquireCallback done) {
  const std::string key = KeyOf(model, cast_to);
  auto it = entries_.find(key);
  if (it != entries_.end()) {
    auto entry = it->second;
    if (pin) entry->pinned = true;
    switch (entry->state) {
      case ModelState::kReady:
        done(entry);
        return;
      case ModelState::kLoading:
        entry->waiters.push_back([entry, done](Status s) {
          if (s.ok()) done(entry);
          else done(s);
        });
        return;
      case ModelState::kDraining:
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
  auto entry = std::make_shared<ModelEntry>();
  entry->key = key;
  entry->resolved = model;
  entry->cast_to = cast_to;
  entry->pinned = pin;
  entry->waiters.push_back([entry, done](Status s) {
    if (s.ok()) done(entry);
    else done(s);
  });
  entries_[key] = entry;
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
  const std::string key = KeyOf(model, cast_to);
  auto it = entries_.find(key);
  if (it != entries_.end() && it->second->state != ModelState::kFailed)
    return Status(ErrorCode::kAlreadyExists, fmt::format("model {} is already {} here", key,
                                                         ModelStateName(it->second->state)));
  WB_RETURN_IF_ERROR(budget_.TryReserve(loaded.arena->size(), "adopting " + key));
  auto entry = std::make_shared<ModelEntry>();
  entry->key = key;
  entry->resolved = model;
  entry->cast_to = cast_to;
  entry->loaded = std::move(loaded);
  entry->manifest_text = ManifestToJson(entry->loaded.tensors)
                             .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  entry->state = ModelState::kReady;
  entry->adopted = true;
  entry->loaded_at = std::chrono::system_clock::now();
  entries_[key] = entry;
  spdlog::info("adopted {}: {} tensors, {} on {} ({}), not loaded again", key,
               entry->loaded.tensors.size(), FormatBytes(entry->loaded.arena->size()),
               backend_.device(), backend_.name());
  PublishRows();
  return entry;
}

void ModelRegistry::AddLease(const std::shared_ptr<ModelEntry>& entry) {
  ++entry->leases;
  ++entry->attaches;
  attaches_total_.fetch_add(1, std::memory_order_relaxed);
  PublishRows();
}

void ModelRegistry::ReleaseLease(const std::shared_ptr<ModelEntry>& entry) {
  if (entry->leases > 0) --entry->leases;
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
  if (it != entries_.end() && it->second == entry) entries_.erase(it);
  PublishRows();
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
  auto it = entries_.find(KeyOf(model, cast_to));
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
        {"adopted", e->adopted},
        {"load_seconds", e->loaded.seconds},
    };
    if (e->state == ModelState::kLoading) {
      const ProgressSample p = e->progress->Sample();
      row["progress"] = {{"done_bytes", p.bytes_done},
                         {"total_bytes", p.bytes_total},
                         {"files_done", p.files_done},
                         {"files_total", p.files_total},
                         {"current_file", p.current_file},
                         {"elapsed_seconds", p.elapsed_seconds},
                         {"bytes_per_second", p.bytes_per_second}};
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
