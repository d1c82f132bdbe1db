// wbroker runtime: model weights as at::Tensors without copying them.
//
// WeightsFromLease wraps a broker lease's tensors (host or GPU memory) with
// torch::from_blob; every tensor's deleter holds the lease, so the arena stays
// mapped for as long as any weight is alive. WeightsFromFiles reads a
// snapshot's safetensors files directly: mmap'ed shared (the page cache is
// the only copy) or read into private memory (a worker with its own copy,
// the baseline the broker is measured against). Weights are read-only: the
// runtime never writes to them, and host arena pages are mapped PROT_READ.
#pragma once

#include <ATen/core/Tensor.h>

#include <filesystem>
#include <memory>
#include <string>
#include <unordered_map>

#include "wbroker/common/dtype.h"
#include "wbroker/common/status.h"

namespace wbroker::client {
class Lease;
}

namespace wbroker::runtime {

/// Checkpoint key -> tensor.
using WeightMap = std::unordered_map<std::string, at::Tensor>;

/// The torch dtype of a safetensors dtype; kUnsupported for F4/F6 packings.
Result<c10::ScalarType> TorchDType(DType dtype);

/// Wraps every tensor of `lease` zero-copy (on the lease's device).
Result<WeightMap> WeightsFromLease(std::shared_ptr<const client::Lease> lease);

/// Reads the weights of a snapshot directory (a hub snapshot or a local
/// model dir: model.safetensors or a sharded index). private_copy=false maps
/// the files shared and read-only; true reads them into private memory.
Result<WeightMap> WeightsFromFiles(const std::filesystem::path& snapshot_dir, bool private_copy);

}  // namespace wbroker::runtime
