// wbroker runtime: at::Tensor views over broker leases and safetensors files.
#include "wbroker/runtime/weights.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <ATen/ops/from_blob.h>
#include <c10/core/Device.h>

#include <cstdlib>
#include <cstring>

#include "wbroker/client/client.h"
#include "wbroker/common/hf_cache.h"
#include "wbroker/common/mapping.h"
#include "wbroker/common/model_files.h"
#include "wbroker/common/unique_fd.h"

namespace wbroker::runtime {
namespace {

/// Wraps `data` without copying; `owner` is released when the last tensor
/// over it dies. Device pointers need target_device: from_blob would
/// otherwise ask the CUDA allocator which device owns the pointer, and the
/// broker's imported mappings are not the allocator's.
at::Tensor Wrap(void* data, c10::IntArrayRef shape, c10::ScalarType dtype, c10::Device device,
                std::shared_ptr<const void> owner) {
  return at::for_blob(data, shape)
      .options(at::TensorOptions().dtype(dtype).device(device))
      .target_device(device)
      .deleter([owner = std::move(owner)](void*) mutable { owner.reset(); })
      .make_tensor();
}

Result<c10::Device> LeaseDevice(const client::Lease& lease) {
  if (!lease.on_device()) return c10::Device(c10::kCPU);
  const std::string& d = lease.device();
  if (d.rfind("cuda:", 0) != 0)
    return Status(ErrorCode::kUnsupported, "lease of " + lease.model() + " is on device '" + d +
                                               "', which torch cannot address");
  char* end = nullptr;
  long index = std::strtol(d.c_str() + 5, &end, 10);
  if (*end != '\0' || index < 0 || index > 127)
    return Status(ErrorCode::kInvalidArgument, "lease device '" + d + "' is malformed");
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
}

/// The snapshot's repo root: hub snapshots live in <repo>/snapshots/<commit>.
ResolvedModel AsResolvedModel(const std::filesystem::path& snapshot_dir) {
  ResolvedModel m;
  std::error_code ec;
  auto dir = std::filesystem::absolute(snapshot_dir, ec).lexically_normal();
  if (!dir.empty() && !dir.has_filename()) dir = dir.parent_path();
  m.model = dir.string();
  m.snapshot_dir = dir;
  if (dir.parent_path().filename() == "snapshots") {
    m.repo_dir = dir.parent_path().parent_path();
    m.commit = dir.filename().string();
  } else {
    m.repo_dir = dir;
    m.local_dir = true;
  }
  return m;
}

/// 64-byte aligned private memory (the "own copy" of a weight file).
std::shared_ptr<void> AlignedBuffer(size_t bytes) {
  void* p = std::aligned_alloc(64, std::max<size_t>(64, (bytes + 63) / 64 * 64));
  return std::shared_ptr<void>(p, [](void* q) { std::free(q); });
}

Status ReadAll(int fd, void* dst, size_t n, off_t offset, const std::string& label) {
  auto* out = static_cast<char*>(dst);
  while (n > 0) {
    ssize_t r = ::pread(fd, out, n, offset);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return ErrnoStatus(label + ": read");
    if (r == 0) return Status(ErrorCode::kCorruptData, label + ": file shrank while reading");
    out += r;
    n -= static_cast<size_t>(r);
    offset += r;
  }
  return Status::Ok();
}

}  // namespace

Result<c10::ScalarType> TorchDType(DType dtype) {
  switch (dtype) {
    case DType::kBool:
      return c10::kBool;
    case DType::kU8:
      return c10::kByte;
    case DType::kI8:
      return c10::kChar;
    case DType::kI16:
      return c10::kShort;
    case DType::kU16:
      return c10::kUInt16;
    case DType::kF16:
      return c10::kHalf;
    case DType::kBF16:
      return c10::kBFloat16;
    case DType::kI32:
      return c10::kInt;
    case DType::kU32:
      return c10::kUInt32;
    case DType::kF32:
      return c10::kFloat;
    case DType::kF64:
      return c10::kDouble;
    case DType::kI64:
      return c10::kLong;
    case DType::kU64:
      return c10::kUInt64;
    case DType::kC64:
      return c10::kComplexFloat;
    case DType::kF8_E4M3:
      return c10::kFloat8_e4m3fn;
    case DType::kF8_E5M2:
      return c10::kFloat8_e5m2;
    case DType::kF8_E4M3FNUZ:
      return c10::kFloat8_e4m3fnuz;
    case DType::kF8_E5M2FNUZ:
      return c10::kFloat8_e5m2fnuz;
    case DType::kF8_E8M0:
      return c10::kFloat8_e8m0fnu;
    case DType::kF4:
    case DType::kF6_E2M3:
    case DType::kF6_E3M2:
      break;
  }
  return Status(ErrorCode::kUnsupported,
                "dtype " + std::string(DTypeName(dtype)) + " has no torch equivalent");
}

Result<WeightMap> WeightsFromLease(std::shared_ptr<const client::Lease> lease) {
  if (!lease) return Status(ErrorCode::kInvalidArgument, "WeightsFromLease: null lease");
  try {
    WB_ASSIGN_OR_RETURN(c10::Device device, LeaseDevice(*lease));
    std::shared_ptr<const void> owner = lease;
    WeightMap out;
    out.reserve(lease->tensors().size());
    for (const auto& t : lease->tensors()) {
      auto dtype = TorchDType(t.dtype);
      if (!dtype.ok()) return dtype.status().WithContext(lease->model() + ": tensor " + t.name);
      out.emplace(t.name, Wrap(const_cast<void*>(t.data), t.shape, *dtype, device, owner));
    }
    return out;
  } catch (const std::exception& e) {
    return Status(ErrorCode::kInternal, lease->model() + ": wrapping tensors: " + e.what());
  }
}

Result<WeightMap> WeightsFromFiles(const std::filesystem::path& snapshot_dir, bool private_copy) {
  WB_ASSIGN_OR_RETURN(ModelWeights files, OpenModelWeights(AsResolvedModel(snapshot_dir)));
  try {
    WeightMap out;
    out.reserve(files.tensor_count);
    for (const WeightFile& file : files.files) {
      const std::string label = file.path.string();
      UniqueFd fd(::open(file.path.c_str(), O_RDONLY | O_CLOEXEC));
      if (!fd.valid()) return ErrnoStatus(label + ": open");
      const SafetensorsHeader& h = file.header;
      std::shared_ptr<const void> owner;
      const std::byte* data = nullptr;  // start of the data section
      if (private_copy) {
        auto buf = AlignedBuffer(h.data_bytes());
        WB_RETURN_IF_ERROR(ReadAll(fd.get(), buf.get(), h.data_bytes(), h.data_start, label));
        data = static_cast<const std::byte*>(buf.get());
        owner = std::move(buf);
      } else {
        WB_ASSIGN_OR_RETURN(MappedRegion region,
                            MappedRegion::Map(fd.get(), h.file_size, PROT_READ, MAP_SHARED));
        auto shared = std::make_shared<MappedRegion>(std::move(region));
        data = shared->bytes() + h.data_start;
        owner = std::move(shared);
      }
      for (const TensorInfo& t : h.tensors) {
        auto dtype = TorchDType(t.dtype);
        if (!dtype.ok()) return dtype.status().WithContext(label + ": tensor " + t.name);
        std::vector<int64_t> shape(t.shape.begin(), t.shape.end());
        void* p = const_cast<std::byte*>(data + t.begin);
        at::Tensor tensor = Wrap(p, shape, *dtype, c10::Device(c10::kCPU), owner);
        // Writers align the data section, but the format does not promise
        // it: a misaligned tensor gets an aligned private copy rather than
        // feeding unaligned pointers to vectorized kernels.
        if (reinterpret_cast<uintptr_t>(p) % c10::elementSize(*dtype) != 0) tensor = tensor.clone();
        if (!out.emplace(t.name, std::move(tensor)).second)
          return Status(ErrorCode::kCorruptData, label + ": tensor " + t.name + " appears twice");
      }
    }
    return out;
  } catch (const std::exception& e) {
    return Status(ErrorCode::kInternal, snapshot_dir.string() + ": wrapping tensors: " + e.what());
  }
}

}  // namespace wbroker::runtime
