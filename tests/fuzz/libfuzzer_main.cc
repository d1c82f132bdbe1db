// wbroker fuzzing: the libFuzzer entry point of one target. CMake compiles
// this file once per target with WBROKER_FUZZ_ENTRY set to that target's
// FuzzOne (see tests/fuzz/CMakeLists.txt).
#include <cstddef>
#include <cstdint>

#include "fuzz_targets.h"

#ifndef WBROKER_FUZZ_ENTRY
#error "WBROKER_FUZZ_ENTRY must name a FuzzOne function from fuzz_targets.h"
#endif

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return WBROKER_FUZZ_ENTRY(data, size);
}
