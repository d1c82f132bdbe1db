// wbroker bench: generation speed in one process with the broker's shared
// weights against the same model with privately loaded weights.
//
// Both decoders run on the same libtorch in the same process, with no HTTP in
// between: one over WeightsFromLease (tensors viewing the broker's read-only
// arena, never copied), one over WeightsFromFiles(private_copy=true) (what a
// worker loading its own copy holds). Rounds alternate between the two so
// that any load from other processes hits both alike; each round generates
// --tokens greedy tokens after a fixed prompt. Both must produce the same
// tokens. Prints a table and one JSON line:
//
//   wbroker-bench-runtime --socket S --model M[@REV] [--tokens 64] [--rounds 7]
#include <CLI/CLI.hpp>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "bench_util.h"
#include "wbroker/client/client.h"
#include "wbroker/common/hf_cache.h"
#include "wbroker/runtime/decoder_model.h"
#include "wbroker/runtime/generator.h"
#include "wbroker/runtime/model_config.h"
#include "wbroker/runtime/weights.h"

namespace {

using wbroker::Result;
using wbroker::bench::Clock;

int Fail(const std::string& what) {
  std::fprintf(stderr, "wbroker-bench-runtime: %s\n", what.c_str());
  return 1;
}

/// A generator over `weights` for the model in `snapshot`.
Result<std::unique_ptr<wbroker::runtime::Generator>> MakeGenerator(
    const std::filesystem::path& snapshot, wbroker::runtime::WeightMap weights) {
  WB_ASSIGN_OR_RETURN(auto config, wbroker::runtime::ModelConfig::FromFile(snapshot));
  WB_ASSIGN_OR_RETURN(auto defaults, wbroker::runtime::LoadGenerationDefaults(snapshot, config));
  WB_ASSIGN_OR_RETURN(auto model,
                      wbroker::runtime::DecoderModel::Create(config, std::move(weights)));
  return wbroker::runtime::Generator::Create(std::move(model), std::move(defaults));
}

}  // namespace

int main(int argc, char** argv) try {
  CLI::App app{"Generation tokens/s: broker-shared weights vs a private copy, in one process"};
  std::string socket_path, model_spec;
  int64_t tokens = 64;
  int rounds = 7;
  app.add_option("--socket", socket_path, "broker socket (default $WBROKER_SOCKET, ...)");
  app.add_option("--model", model_spec, "MODEL[@REV] (a decoder)")->required();
  app.add_option("--tokens", tokens, "greedy tokens per round")->check(CLI::Range(1, 4096));
  app.add_option("--rounds", rounds, "timed rounds per variant")->check(CLI::Range(1, 1000));
  CLI11_PARSE(app, argc, argv);

  auto spec = wbroker::ParseModelSpec(model_spec);
  if (!spec.ok()) return Fail("--model: " + spec.status().message());
  wbroker::client::ClientOptions co;
  co.socket_path = socket_path;
  co.client_name = "wbroker-bench-runtime";
  auto client = wbroker::client::Client::Connect(co);
  if (!client.ok()) return Fail(client.status().message());
  auto lease = (*client)->Attach(spec->model, spec->revision);
  if (!lease.ok()) return Fail(lease.status().message());
  std::shared_ptr<const wbroker::client::Lease> shared_lease = std::move(lease).value();
  const std::filesystem::path snapshot = shared_lease->snapshot_dir();

  auto shared_weights = wbroker::runtime::WeightsFromLease(shared_lease);
  if (!shared_weights.ok()) return Fail(shared_weights.status().message());
  auto private_weights = wbroker::runtime::WeightsFromFiles(snapshot, /*private_copy=*/true);
  if (!private_weights.ok()) return Fail(private_weights.status().message());
  auto shared = MakeGenerator(snapshot, std::move(shared_weights).value());
  if (!shared.ok()) return Fail("shared: " + shared.status().message());
  auto priv = MakeGenerator(snapshot, std::move(private_weights).value());
  if (!priv.ok()) return Fail("private: " + priv.status().message());

  const std::vector<int32_t> prompt = {10, 20, 30, 40, 50, 60, 70, 80};  // inside any vocab
  wbroker::runtime::GenerationOptions options;
  options.max_new_tokens = tokens;
  options.eos_token_ids = std::vector<int32_t>{};  // always the full --tokens
  auto run = [&](const wbroker::runtime::Generator& g, std::vector<int32_t>* out) -> double {
    auto t0 = Clock::now();
    auto r = g.Generate(prompt, options, {});
    double s = wbroker::bench::Seconds(t0, Clock::now());
    if (!r.ok()) throw std::runtime_error(r.status().message());
    *out = r->tokens;
    return static_cast<double>(r->tokens.size()) / s;
  };

  std::vector<int32_t> a, b;
  run(**shared, &a);  // warm-up: first-touch of the pages, allocator, kernels
  run(**priv, &b);
  if (a != b) return Fail("shared and private weights generated different tokens");
  std::vector<double> shared_tps, private_tps;
  for (int i = 0; i < rounds; ++i) {
    shared_tps.push_back(run(**shared, &a));
    private_tps.push_back(run(**priv, &b));
    if (a != b) return Fail("shared and private weights generated different tokens");
  }
  const double s = wbroker::bench::Median(shared_tps), p = wbroker::bench::Median(private_tps);
  std::printf("model %s@%s (%s, %.1f MiB arena), %lld greedy tokens x %d rounds, in-process\n",
              shared_lease->model().c_str(), shared_lease->revision().substr(0, 12).c_str(),
              shared_lease->backend().c_str(), shared_lease->arena_size() / 1048576.0,
              static_cast<long long>(tokens), rounds);
  std::printf("  broker-shared weights: %8.2f tokens/s (median)\n", s);
  std::printf("  private copy:          %8.2f tokens/s (median)\n", p);
  std::printf("  ratio shared/private:  %8.3f\n", s / p);
  std::printf(
      "{\"bench\":\"runtime\",\"model\":\"%s\",\"tokens\":%lld,\"rounds\":%d,"
      "\"shared_tokens_per_s\":%.3f,\"private_tokens_per_s\":%.3f,\"ratio\":%.4f}\n",
      shared_lease->model().c_str(), static_cast<long long>(tokens), rounds, s, p, s / p);
  return 0;
} catch (const std::exception& e) {
  return Fail(e.what());
}
