// wbroker tests: replays the fuzz corpora without libFuzzer. Every file of
// tests/fuzz/corpus/<target>/ (the seeds) and tests/fuzz/regressions/<target>/
// (inputs that once crashed, fixed since) goes through the target's FuzzOne(),
// the same function the libFuzzer build runs, so any build checks that no
// past finding comes back. A crash or broken invariant aborts the test.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "fuzz_targets.h"

namespace wbroker::fuzz {
namespace {

namespace fs = std::filesystem;

using Entry = int (*)(const uint8_t*, size_t);

std::vector<fs::path> InputsOf(const std::string& target) {
  std::vector<fs::path> out;
  const fs::path root = fs::path(WBROKER_SOURCE_DIR) / "tests" / "fuzz";
  for (const char* kind : {"corpus", "regressions"}) {
    std::error_code ec;
    for (fs::directory_iterator it(root / kind / target, ec), end; !ec && it != end;
         it.increment(ec)) {
      if (it->is_regular_file()) out.push_back(it->path());
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

void Replay(const std::string& target, Entry entry) {
  std::vector<fs::path> inputs = InputsOf(target);
  ASSERT_FALSE(inputs.empty()) << "no inputs in tests/fuzz/{corpus,regressions}/" << target;
  for (const fs::path& p : inputs) {
    SCOPED_TRACE(p.string());
    std::ifstream in(p, std::ios::binary);
    ASSERT_TRUE(in) << "cannot read " << p;
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    // Printed first: if the input crashes the process, the log names it.
    std::fprintf(stderr, "replay %s (%zu bytes)\n", p.c_str(), bytes.size());
    EXPECT_EQ(entry(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()), 0);
  }
}

TEST(FuzzReplay, SafetensorsHeader) {
  Replay("safetensors_header", &safetensors_header::FuzzOne);
}
TEST(FuzzReplay, ShardIndex) {
  Replay("shard_index", &shard_index::FuzzOne);
}
TEST(FuzzReplay, RevisionResolver) {
  Replay("revision_resolver", &revision_resolver::FuzzOne);
}
TEST(FuzzReplay, FrameDecoder) {
  Replay("frame_decoder", &frame_decoder::FuzzOne);
}
TEST(FuzzReplay, BrokerConfig) {
  Replay("broker_config", &broker_config::FuzzOne);
}

}  // namespace
}  // namespace wbroker::fuzz
