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
      pool_(std::max(1u, options.max_parallel_loads)) {}

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
  StartLoad(entry);
}

void ModelRegistry::StartLoad(const std::shared_ptr<ModelEntry>& entry) {
  spdlog::info("loading {} from {}", entry->key, entry->resolved.snapshot_dir.string());
  boost::asio::post(pool_, [this, entry, resolved = entry->resolved, cast_to = entry->cast_to] {
    LoaderOptions opts;
    opts.cast_to = cast_to;
    opts.threads = options_.loader_threads;
    opts.budget = &budget_;
    // Progress is sampled on the io thread at most every ~1% to keep logs sane.
    auto last_pct = std::make_shared<std::atomic<int>>(-1);
    opts.on_progress = [this, entry, last_pct](uint64_t done, uint64_t total) {
      int pct = total ? static_cast<int>(done * 100 / total) : 100;
      if (last_pct->exchange(pct) == pct) return;
      boost::asio::post(io_, [entry, done, total] {
        entry->load_done_bytes = std::max(entry->load_done_bytes, done);
        entry->load_total_bytes = total;
      });
    };
    Result<LoadedModel> result = LoadModel(resolved, backend_, opts);
    boost::asio::post(io_, [this, entry, result = std::move(result)]() mutable {
      FinishLoad(entry, std::move(result));
    });
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
    for (auto& w : waiters) w(entry->error);
    return;
  }
  entry->loaded = std::move(result).value();
  entry->manifest_text = ManifestToJson(entry->loaded.tensors)
                            .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  entry->state = ModelState::kReady;
  entry->loaded_at = std::chrono::system_clock::now();
  entry->load_done_bytes = entry->load_total_bytes = entry->loaded.tensor_bytes;
  double secs = entry->loaded.seconds;
  spdlog::info("loaded {}: {} tensors, {} in {} file(s) in {:.3f} s ({:.2f} GB/s) on {} ({})",
               entry->key, entry->loaded.tensors.size(), FormatBytes(entry->loaded.tensor_bytes),
               entry->loaded.files, secs, secs > 0 ? entry->loaded.tensor_bytes / secs / 1e9 : 0.0,
               backend_.device(), backend_.name());
  for (auto& w : waiters) w(Status::Ok());
}

void ModelRegistry::AddLease(const std::shared_ptr<ModelEntry>& entry) {
  ++entry->leases;
  ++entry->attaches;
}

void ModelRegistry::ReleaseLease(const std::shared_ptr<ModelEntry>& entry) {
  if (entry->leases > 0) --entry->leases;
  if (entry->leases == 0 && entry->state == ModelState::kDraining) {
    spdlog::info("last lease of draining {} released: freeing it", entry->key);
    Free(entry);
  }
}

void ModelRegistry::Free(const std::shared_ptr<ModelEntry>& entry) {
  if (entry->loaded.arena) budget_.Release(entry->loaded.arena->size());
  entry->loaded.arena.reset();
  auto it = entries_.find(entry->key);
  if (it != entries_.end() && it->second == entry) entries_.erase(it);
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
  return out;
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
        {"load_seconds", e->loaded.seconds},
    };
    if (e->state == ModelState::kLoading) {
      row["progress"] = {{"done_bytes", e->load_done_bytes}, {"total_bytes", e->load_total_bytes}};
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
