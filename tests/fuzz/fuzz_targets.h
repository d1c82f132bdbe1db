// wbroker fuzzing: the entry function of every fuzz target.
//
// Each target's FuzzOne() lives in tests/fuzz/<target>_fuzz.cc. The same
// function is called by libFuzzer (libfuzzer_main.cc, clang builds with
// WBROKER_FUZZ=ON) and by fuzz_replay_test.cc, which feeds it every file of
// tests/fuzz/corpus/<target>/ and tests/fuzz/regressions/<target>/ in the
// normal build. FuzzOne() returns 0 for every input; a broken invariant
// aborts (WB_FUZZ_CHECK), which both drivers report as a crash.
#pragma once

#include <cstddef>
#include <cstdint>

namespace wbroker::fuzz {

/// ParseSafetensorsHeader() on the input as a whole file, checked against
/// ReadSafetensorsFile() on the same bytes and against TensorBytes().
namespace safetensors_header {
int FuzzOne(const uint8_t* data, size_t size);
}

/// ParseShardIndex() on the input as model.safetensors.index.json.
namespace shard_index {
int FuzzOne(const uint8_t* data, size_t size);
}

/// ResolveModel(), ParseModelSpec() and ResolveRepoFile() against a fake hub
/// cache; the input is "MODEL\nREVISION\nREF-FILE-CONTENT".
namespace revision_resolver {
int FuzzOne(const uint8_t* data, size_t size);
}

/// The byte stream a peer sends: frames split and decoded as the broker's
/// session does, replies echoed, manifests validated as the client does.
namespace frame_decoder {
int FuzzOne(const uint8_t* data, size_t size);
}

/// The broker's TOML configuration (broker/config.cc ParseConfig()).
namespace broker_config {
int FuzzOne(const uint8_t* data, size_t size);
}

}  // namespace wbroker::fuzz
