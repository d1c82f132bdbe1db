// wbroker fuzzing: the safetensors header parser (common/src/safetensors.cc).
//
// The input is a whole .safetensors file. It is parsed from memory with
// ParseSafetensorsHeader() and, through a memfd, read back from "disk" with
// ReadSafetensorsFile(); both must agree. An accepted header must satisfy the
// rules the parser promises (contiguous, sorted, ends at EOF, sizes match
// shape x dtype as TensorBytes() computes them).
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <set>
#include <string>
#include <string_view>

#include "fuzz_check.h"
#include "fuzz_targets.h"
#include "wbroker/common/manifest.h"
#include "wbroker/common/safetensors.h"
#include "wbroker/common/unique_fd.h"

namespace wbroker::fuzz::safetensors_header {
namespace {

// The memfd that holds the current input as a file. libFuzzer calls FuzzOne
// millions of times in one process, so the file is made once and rewritten.
int InputFile() {
  // memfd_create: an anonymous regular file, so ReadSafetensorsFile() runs
  // its real open/fstat/pread path without touching the disk.
  static const UniqueFd fd(::memfd_create("wbroker-fuzz-safetensors", MFD_CLOEXEC));
  WB_FUZZ_CHECK(fd.get() >= 0, "memfd_create failed");
  return fd.get();
}

bool WriteInput(int fd, std::string_view bytes) {
  if (::ftruncate(fd, 0) != 0) return false;
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::pwrite(fd, bytes.data() + done, bytes.size() - done, static_cast<off_t>(done));
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

void CheckAccepted(const SafetensorsHeader& h, uint64_t file_size) {
  WB_FUZZ_CHECK(h.file_size == file_size, "file_size is the size passed in");
  WB_FUZZ_CHECK(h.header_bytes <= kMaxSafetensorsHeaderBytes, "header length within the limit");
  WB_FUZZ_CHECK(h.data_start == 8 + h.header_bytes, "data starts right after the header");
  WB_FUZZ_CHECK(h.data_start <= file_size, "data start inside the file");
  uint64_t cursor = 0;
  std::set<std::string> names;
  for (const TensorInfo& t : h.tensors) {
    WB_FUZZ_CHECK(t.begin == cursor, "tensors are contiguous and sorted by offset");
    WB_FUZZ_CHECK(t.begin <= t.end, "offsets not reversed");
    WB_FUZZ_CHECK(names.insert(t.name).second, "tensor names are unique");
    WB_FUZZ_CHECK(t.name != "__metadata__", "__metadata__ is not a tensor");
    Result<uint64_t> bytes = TensorBytes(t.dtype, t.shape);
    WB_FUZZ_CHECK(bytes.ok() && *bytes == t.nbytes(), "nbytes equals shape x dtype");
    cursor = t.end;
  }
  WB_FUZZ_CHECK(cursor == h.data_bytes(), "tensor data ends exactly at end of file");
}

}  // namespace

int FuzzOne(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  const int fd = InputFile();
  const std::string label = "/proc/self/fd/" + std::to_string(fd);

  Result<SafetensorsHeader> parsed = ParseSafetensorsHeader(label, bytes, size);
  if (parsed.ok()) CheckAccepted(*parsed, size);

  if (!WriteInput(fd, bytes)) return 0;  // out of memory for the memfd: nothing to compare
  Result<SafetensorsHeader> read = ReadSafetensorsFile(label);
  WB_FUZZ_CHECK(read.ok() == parsed.ok(), "reading the file and parsing its bytes agree");
  if (parsed.ok()) {
    WB_FUZZ_CHECK(read->tensors.size() == parsed->tensors.size(), "same tensors either way");
    WB_FUZZ_CHECK(read->data_start == parsed->data_start, "same data start either way");
  } else {
    WB_FUZZ_CHECK(read.status().message() == parsed.status().message(),
                  "the same error either way");
  }
  return 0;
}

}  // namespace wbroker::fuzz::safetensors_header
