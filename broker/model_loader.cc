// wbroker broker: model loading. Parsing and validation happen before any
// memory is taken, so a malformed file costs nothing but an error message.
#include "model_loader.h"

#include <fcntl.h>

#include <fmt/format.h>

#include <cctype>
#include <chrono>
#include <thread>

#include "wbroker/common/size_units.h"
#include "wbroker/common/unique_fd.h"

namespace wbroker::broker {

namespace {

bool IsCastable(DType t) {
  return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16;
}

}  // namespace

Result<DType> ParseCastDType(std::string_view name) {
  std::string n(name);
  for (auto& c : n) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (n == "bf16" || n == "bfloat16") return DType::kBF16;
  if (n == "fp16" || n == "f16" || n == "float16" || n == "half") return DType::kF16;
  if (n == "fp32" || n == "f32" || n == "float32" || n == "float") return DType::kF32;
  return Status(ErrorCode::kInvalidArgument,
                fmt::format("unknown dtype \"{}\" (expected bf16, fp16 or fp32)", name));
}

ArenaPlan PlanArena(const ModelWeights& weights, std::optional<DType> cast_to) {
  ArenaPlan plan;
  plan.tensors.reserve(weights.tensor_count);
  uint64_t cursor = 0;
  for (size_t f = 0; f < weights.files.size(); ++f) {
    const auto& header = weights.files[f].header;
    for (const auto& t : header.tensors) {
      cursor = (cursor + kArenaAlignment - 1) / kArenaAlignment * kArenaAlignment;
      DType dst = (cast_to && IsCastable(t.dtype)) ? *cast_to : t.dtype;
      // Same element count, other width: exact because castable dtypes are whole bytes.
      uint64_t dst_bytes = t.nbytes() / (DTypeBits(t.dtype) / 8) * (DTypeBits(dst) / 8);
      plan.tensors.push_back({t.name, dst, t.shape, cursor, dst_bytes});
      plan.jobs.push_back(
          {static_cast<int>(f), header.data_start + t.begin, cursor, t.nbytes(), t.dtype, dst});
      cursor += dst_bytes;
      plan.tensor_bytes += dst_bytes;
      plan.file_bytes += t.nbytes();
    }
  }
  plan.size = cursor;
  return plan;
}

namespace {

// Reserves `bytes` in the budget, asking options.make_room to evict when it
// is short, and waiting (kUnavailable) while revisions drain.
Status ReserveBudget(uint64_t bytes, const std::string& label, const LoaderOptions& options) {
  const std::string what = "loading " + label;
  const auto deadline = std::chrono::steady_clock::now() + options.room_wait;
  for (;;) {
    Status st = options.budget->TryReserve(bytes, what);
    if (st.ok() || st.code() != ErrorCode::kResourceExhausted || !options.make_room) return st;
    Status room = options.make_room(bytes, what);
    if (room.ok()) continue;  // evicted enough: reserve again (another load may win the race)
    if (room.code() != ErrorCode::kUnavailable) return room;
    if (std::chrono::steady_clock::now() >= deadline)
      return Status(ErrorCode::kResourceExhausted,
                    fmt::format("{}: gave up after {} s waiting for replaced revisions to be "
                                "released: {}",
                                what, options.room_wait.count() / 1000, room.message()));
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

}  // namespace

Result<LoadedModel> LoadModel(const ResolvedModel& model, Backend& backend,
                              const LoaderOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  if (options.cast_to && !backend.can_cast())
    return Status(ErrorCode::kUnsupported,
                  fmt::format("--dtype {}: the {} backend cannot convert dtypes; it serves "
                              "weights as stored",
                              DTypeName(*options.cast_to), backend.name()));
  WB_ASSIGN_OR_RETURN(ModelWeights weights, OpenModelWeights(model));
  ArenaPlan plan = PlanArena(weights, options.cast_to);
  if (options.progress != nullptr) {
    // Each file's read volume, in job order (which is file order).
    std::vector<ProgressFile> files;
    for (const auto& file : weights.files) {
      ProgressFile pf{file.name, 0};
      for (const auto& t : file.header.tensors) pf.bytes += t.nbytes();
      files.push_back(std::move(pf));
    }
    options.progress->SetPlan(std::move(files));
  }

  // Open every file before reserving memory: a permission problem should not
  // cost an allocation.
  std::vector<UniqueFd> fds;
  for (const auto& file : weights.files) {
    UniqueFd fd(::open(file.path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) return ErrnoStatus("open " + file.path.string());
    // The whole file is read once, front to back per thread: ask for readahead.
    ::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_SEQUENTIAL);
    fds.push_back(std::move(fd));
  }
  for (auto& job : plan.jobs) job.fd = fds[static_cast<size_t>(job.fd)].get();

  const std::string label = model.model + "@" + (model.commit.empty() ? "local" : model.commit);
  if (options.require_free_memory) {
    // A replacement loads beside the revision it replaces: both copies must
    // fit in the device's memory, not only in the budget.
    const MemoryInfo mem = backend.Memory();
    if (mem.free_bytes != 0 && mem.free_bytes < plan.size)
      return Status(
          ErrorCode::kResourceExhausted,
          fmt::format("loading {} needs {} but {} has only {} free", label, FormatBytes(plan.size),
                      backend.device(), FormatBytes(mem.free_bytes)));
  }
  if (options.budget != nullptr) WB_RETURN_IF_ERROR(ReserveBudget(plan.size, label, options));
  auto release_budget = [&] {
    if (options.budget != nullptr) options.budget->Release(plan.size);
  };

  auto arena = backend.Allocate(plan.size, label);
  if (!arena.ok()) {
    release_budget();
    return arena.status();
  }
  FillOptions fill;
  fill.threads = options.threads;
  if (options.progress != nullptr)
    fill.on_progress = [progress = options.progress](uint64_t n) { progress->AddBytes(n); };
  Status s = (*arena)->Fill(plan.jobs, fill);
  if (s.ok()) s = (*arena)->Seal();
  if (!s.ok()) {
    release_budget();
    return s.WithContext("loading " + label);
  }

  LoadedModel out;
  out.arena = std::move(arena).value();
  out.tensors = std::move(plan.tensors);
  out.tensor_bytes = plan.tensor_bytes;
  out.files = weights.files.size();
  if (!weights.files.empty()) out.metadata = weights.files.front().header.metadata;
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return out;
}

}  // namespace wbroker::broker
