// wbroker tests: the libtorch model runtime against transformers and sentence-transformers.
//
// tests/worker/runtime/reference.py builds tiny random decoders (qwen2,
// llama with several RoPE scalings, mistral; fp32, bf16, fp16) and takes
// all-MiniLM-L6-v2, then records transformers' greedy generations, prompt
// logits and sentence-transformers embeddings. It runs once per build tree
// (cached under <build>/tests/runtime-reference, keyed by the scripts'
// contents, guarded by a lock for parallel ctest). Every test skips, saying
// why, when `python3` on PATH cannot import torch/transformers.
#include <sys/file.h>
#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include "broker_process.h"
#include "temp_dir.h"
#include "wbroker/client/client.h"
#include "wbroker/common/unique_fd.h"
#include "wbroker/runtime/decoder_model.h"
#include "wbroker/runtime/encoder_model.h"
#include "wbroker/runtime/generator.h"
#include "wbroker/runtime/model_config.h"
#include "wbroker/runtime/weights.h"

namespace wbroker::testing {
namespace {

using namespace wbroker::runtime;  // NOLINT
using nlohmann::json;
using ::testing::HasSubstr;

namespace fs = std::filesystem;

/// The reference outputs, or why there are none.
struct Reference {
  json data;             ///< reference.json
  fs::path hub;          ///< the hub cache with every model
  std::string skip_why;  ///< non-empty: skip with this message
};

std::string Slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

/// Runs reference.py unless this build tree already holds its output for
/// the same scripts.
const Reference& GetReference() {
  static Reference ref;
  static std::once_flag once;
  std::call_once(once, [] {
    const fs::path src = WBROKER_SOURCE_DIR;
    const fs::path script = src / "tests/worker/runtime/reference.py";
    std::string stamp;
    for (const char* f : {"tests/worker/runtime/reference.py", "tests/fixtures/make_tiny_model.py",
                          "tests/fixtures/make_tokenizer.py"})
      stamp += std::to_string(std::hash<std::string>()(Slurp(src / f))) + "\n";
    const fs::path dir = fs::path(WBROKER_BINARY_DIR) / "tests" / "runtime-reference";
    fs::create_directories(dir);
    UniqueFd lock(::open((dir.string() + ".lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
    if (lock.valid()) ::flock(lock.get(), LOCK_EX);  // released when `lock` closes
    if (!fs::exists(dir / "reference.json") || Slurp(dir / "stamp") != stamp) {
      fs::remove_all(dir);
      fs::create_directories(dir);
      auto r = RunCommand("python3 '" + script.string() + "' '" + dir.string() + "' 2>&1");
      if (r.exit_code == 77) {
        ref.skip_why =
            "python3 on PATH cannot import torch/transformers/sentence-transformers "
            "(put /work/main/.venv/bin first on PATH): " +
            r.output.substr(r.output.size() > 400 ? r.output.size() - 400 : 0);
        return;
      }
      if (r.exit_code != 0) {
        ref.skip_why = "FAIL";
        ADD_FAILURE() << "reference.py failed (" << r.exit_code << "):\n" << r.output;
        return;
      }
      std::ofstream(dir / "stamp") << stamp;
    }
    ref.data = json::parse(Slurp(dir / "reference.json"));
    ref.hub = dir / "hub";
  });
  return ref;
}

#define REQUIRE_REFERENCE()                                     \
  const Reference& ref = GetReference();                        \
  if (ref.skip_why == "FAIL") FAIL() << "no reference outputs"; \
  if (!ref.skip_why.empty()) GTEST_SKIP() << ref.skip_why

const json& Find(const json& list, const std::string& name) {
  for (const json& m : list)
    if (m["name"] == name) return m;
  static const json none;
  ADD_FAILURE() << "reference has no model " << name;
  return none;
}

/// A model loaded from its snapshot files.
struct Loaded {
  std::shared_ptr<const DecoderModel> model;
  std::unique_ptr<Generator> generator;
};

Loaded LoadDecoder(const fs::path& snapshot, bool private_copy = false) {
  Loaded out;
  auto config = ModelConfig::FromFile(snapshot);
  EXPECT_TRUE(config.ok()) << config.status().ToString();
  auto weights = WeightsFromFiles(snapshot, private_copy);
  EXPECT_TRUE(weights.ok()) << weights.status().ToString();
  if (!config.ok() || !weights.ok()) return out;
  auto defaults = LoadGenerationDefaults(snapshot, *config);
  EXPECT_TRUE(defaults.ok()) << defaults.status().ToString();
  auto model = DecoderModel::Create(*config, std::move(weights).value());
  EXPECT_TRUE(model.ok()) << model.status().ToString();
  if (!model.ok() || !defaults.ok()) return out;
  out.model = std::move(model).value();
  out.generator = std::move(Generator::Create(out.model, *defaults)).value();
  return out;
}

std::vector<int32_t> Ids(const json& j) {
  return j.get<std::vector<int32_t>>();
}

GenerationOptions NoEos(int64_t max_new_tokens) {
  GenerationOptions o;
  o.max_new_tokens = max_new_tokens;
  o.eos_token_ids = std::vector<int32_t>{};
  return o;
}

/// Largest |a - b| over the logits.
double MaxAbsDiff(const at::Tensor& logits, const json& expected) {
  EXPECT_EQ(logits.numel(), static_cast<int64_t>(expected.size()));
  at::Tensor c = logits.contiguous();
  const float* p = c.data_ptr<float>();
  double worst = 0;
  for (size_t i = 0; i < expected.size() && static_cast<int64_t>(i) < c.numel(); ++i)
    worst = std::max(worst, std::abs(static_cast<double>(p[i]) - expected[i].get<double>()));
  return worst;
}

// --- config parsing (no Python needed) ---

TEST(RuntimeConfig, ReadsTransformers5RopeParameters) {
  auto c = ModelConfig::Parse("cfg", R"({"model_type":"llama","vocab_size":10,"hidden_size":64,
    "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
    "dtype":"bfloat16","tie_word_embeddings":true,"eos_token_id":[1,2],
    "rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,
      "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}})");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->family, ModelFamily::kLlama);
  EXPECT_EQ(c->dtype, "bfloat16");
  EXPECT_EQ(c->head_dim, 16);
  EXPECT_EQ(c->num_key_value_heads, 2);
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_EQ(c->rope.type, RopeType::kLlama3);
  EXPECT_EQ(c->rope.theta, 500000.0);
  EXPECT_EQ(c->rope.original_max_position_embeddings, 8192);
  EXPECT_EQ(c->eos_token_ids, (std::vector<int32_t>{1, 2}));
}

TEST(RuntimeConfig, ReadsTransformers4RopeScalingAndQwen2Biases) {
  auto c = ModelConfig::Parse("cfg", R"({"model_type":"qwen2","vocab_size":10,"hidden_size":64,
    "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"torch_dtype":"float16",
    "rope_theta":1000000.0,"rope_scaling":{"type":"yarn","factor":4.0,
      "original_max_position_embeddings":32768},"use_sliding_window":false,"sliding_window":4096})");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->family, ModelFamily::kQwen2);
  EXPECT_EQ(c->dtype, "float16");
  EXPECT_TRUE(c->attention_bias);
  EXPECT_FALSE(c->o_proj_bias);
  EXPECT_FALSE(c->sliding_window.has_value());
  EXPECT_EQ(c->rope.type, RopeType::kYarn);
  EXPECT_EQ(c->rope.theta, 1000000.0);
  EXPECT_EQ(c->rope.factor, 4.0);
  auto plain = ModelConfig::Parse("cfg", R"({"model_type":"mistral","vocab_size":10,
    "hidden_size":64,"intermediate_size":128,"num_hidden_layers":1,"num_attention_heads":4,
    "rope_scaling":null,"sliding_window":4096})");
  ASSERT_TRUE(plain.ok()) << plain.status().ToString();
  EXPECT_EQ(plain->rope.type, RopeType::kDefault);
  EXPECT_EQ(plain->sliding_window, 4096);
}

TEST(RuntimeConfig, UnsupportedValuesNameTheField) {
  const std::string base = R"("vocab_size":10,"hidden_size":64,"intermediate_size":128,
    "num_hidden_layers":2,"num_attention_heads":4)";
  auto parse = [&](const std::string& extra) {
    return ModelConfig::Parse("/m/config.json", "{" + base + "," + extra + "}");
  };
  struct Case {
    std::string extra, needle;
  } cases[] = {
      {R"("model_type":"gpt_neox")", "'model_type' is 'gpt_neox'"},
      {R"("model_type":"llama","rope_parameters":{"rope_type":"longrope","rope_theta":1.0})",
       "'rope_parameters.rope_type' is 'longrope'"},
      {R"("model_type":"llama","rope_scaling":{"type":"llama3","factor":8.0})",
       "'rope_scaling.low_freq_factor' is missing"},
      {R"("model_type":"llama","hidden_act":"gelu")", "'hidden_act' is 'gelu'"},
      {R"("model_type":"llama","num_key_value_heads":3)", "'num_key_value_heads' must divide"},
      {R"("model_type":"llama","dtype":"float8_e4m3fn")", "'dtype' is 'float8_e4m3fn'"},
      {R"("model_type":"llama","hidden_size":"64")", "'hidden_size' must be an integer"},
      {R"("model_type":"bert","position_embedding_type":"relative_key")",
       "'position_embedding_type' is 'relative_key'"},
  };
  for (const auto& c : cases) {
    auto r = parse(c.extra);
    ASSERT_FALSE(r.ok()) << c.extra;
    EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr(c.needle)) << c.extra;
    EXPECT_THAT(r.status().message(), HasSubstr("/m/config.json"));
  }
  auto missing = ModelConfig::Parse("cfg", R"({"model_type":"llama"})");
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(missing.status().message(), HasSubstr("'vocab_size' is missing"));
}

// --- decoders against transformers ---

class RuntimeDecoder : public ::testing::TestWithParam<std::string> {};

TEST_P(RuntimeDecoder, GreedyTokensAndLogitsMatchTransformers) {
  REQUIRE_REFERENCE();
  const json& m = Find(ref.data["decoders"], GetParam());
  ASSERT_FALSE(m.is_null());
  Loaded loaded = LoadDecoder(m["snapshot"].get<std::string>());
  ASSERT_TRUE(loaded.generator);
  const bool fp32 = m["dtype"] == "float32";
  const double atol = fp32 ? 1e-4 : 5e-2;
  for (const json& c : m["cases"]) {
    const auto prompt = Ids(c["prompt"]);
    const auto expected = Ids(c["generated"]);
    SCOPED_TRACE("prompt of " + std::to_string(prompt.size()) + " tokens");
    std::vector<int32_t> streamed;
    auto r = loaded.generator->Generate(prompt, NoEos(static_cast<int64_t>(expected.size())),
                                        [&](int32_t t) {
                                          streamed.push_back(t);
                                          return true;
                                        });
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->tokens, expected);
    EXPECT_EQ(streamed, r->tokens);
    EXPECT_EQ(r->finish_reason, FinishReason::kLength);

    KvCache cache = loaded.model->NewCache();
    auto logits = loaded.model->Forward(prompt, cache);
    ASSERT_TRUE(logits.ok()) << logits.status().ToString();
    const double diff = MaxAbsDiff(*logits, c["logits"]);
    EXPECT_LE(diff, atol);
    std::printf("[ numerics ] %s prompt %zu: max |logit diff| %.3g\n", GetParam().c_str(),
                prompt.size(), diff);

    // With the model's eos, generation ends right after the first eos.
    const auto eos = Ids(m["eos_token_id"]);
    auto stop = std::find_first_of(expected.begin(), expected.end(), eos.begin(), eos.end());
    GenerationOptions with_eos;
    with_eos.max_new_tokens = static_cast<int64_t>(expected.size());
    auto e = loaded.generator->Generate(prompt, with_eos, nullptr);
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    const bool stops = stop != expected.end();
    EXPECT_EQ(e->tokens, std::vector<int32_t>(expected.begin(), stops ? stop + 1 : expected.end()));
    EXPECT_EQ(e->finish_reason, stops ? FinishReason::kEos : FinishReason::kLength);
  }
}

INSTANTIATE_TEST_SUITE_P(Models, RuntimeDecoder,
                         ::testing::Values("qwen2_f32", "llama_llama3_f32", "llama_linear_f32",
                                           "llama_dynamic_f32", "llama_yarn_f32", "mistral_f32",
                                           "qwen2_bf16", "llama_f16"));

TEST(RuntimeGenerate, PrivateCopyMatchesSharedMapping) {
  REQUIRE_REFERENCE();
  const json& m = Find(ref.data["decoders"], "qwen2_f32");
  Loaded shared = LoadDecoder(m["snapshot"].get<std::string>(), false);
  Loaded own = LoadDecoder(m["snapshot"].get<std::string>(), true);
  ASSERT_TRUE(shared.generator && own.generator);
  const auto prompt = Ids(m["cases"][2]["prompt"]);
  auto a = shared.generator->Generate(prompt, NoEos(16), nullptr);
  auto b = own.generator->Generate(prompt, NoEos(16), nullptr);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->tokens, b->tokens);
  const auto& w1 = shared.model->weights().at("model.embed_tokens.weight");
  const auto& w2 = own.model->weights().at("model.embed_tokens.weight");
  EXPECT_NE(w1.data_ptr(), w2.data_ptr());
  EXPECT_TRUE(w1.equal(w2));
}

TEST(RuntimeGenerate, SamplingIsSeededAndColdTemperatureIsGreedy) {
  REQUIRE_REFERENCE();
  const json& m = Find(ref.data["decoders"], "llama_linear_f32");
  Loaded l = LoadDecoder(m["snapshot"].get<std::string>());
  ASSERT_TRUE(l.generator);
  const auto prompt = Ids(m["cases"][1]["prompt"]);
  GenerationOptions o = NoEos(32);
  o.sampling.do_sample = true;
  o.sampling.temperature = 1.5;
  o.sampling.top_p = 0.95;
  o.sampling.top_k = 200;
  o.sampling.seed = 1234;
  auto a = l.generator->Generate(prompt, o, nullptr);
  auto b = l.generator->Generate(prompt, o, nullptr);
  o.sampling.seed = 99;
  auto c = l.generator->Generate(prompt, o, nullptr);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok()) << a.status().ToString();
  EXPECT_EQ(a->tokens, b->tokens);
  EXPECT_NE(a->tokens, c->tokens) << "different seeds should sample differently";
  o.sampling.temperature = 1e-6;
  o.sampling.top_p = 1.0;
  o.sampling.top_k = 0;
  auto cold = l.generator->Generate(prompt, o, nullptr);
  ASSERT_TRUE(cold.ok());
  const auto greedy = Ids(m["cases"][1]["generated"]);
  EXPECT_EQ(cold->tokens, std::vector<int32_t>(greedy.begin(), greedy.begin() + 32));
  o.sampling.temperature = 0;  // greedy regardless of do_sample
  auto zero = l.generator->Generate(prompt, o, nullptr);
  ASSERT_TRUE(zero.ok());
  EXPECT_EQ(zero->tokens, cold->tokens);
}

TEST(RuntimeGenerate, ConcurrentCallsShareOneModel) {
  REQUIRE_REFERENCE();
  const json& m = Find(ref.data["decoders"], "mistral_f32");
  Loaded l = LoadDecoder(m["snapshot"].get<std::string>());
  ASSERT_TRUE(l.generator);
  const size_t n = m["cases"].size();
  std::vector<std::vector<int32_t>> got(n * 2);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < got.size(); ++i) {
    threads.emplace_back([&, i] {
      auto r = l.generator->Generate(Ids(m["cases"][i % n]["prompt"]), NoEos(64), nullptr);
      if (r.ok()) got[i] = r->tokens;
    });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < got.size(); ++i)
    EXPECT_EQ(got[i], Ids(m["cases"][i % n]["generated"])) << i;
  // Cancelling from the callback stops at once.
  int seen = 0;
  auto r = l.generator->Generate(Ids(m["cases"][0]["prompt"]), NoEos(64),
                                 [&](int32_t) { return ++seen < 3; });
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->tokens.size(), 3u);
  EXPECT_EQ(r->finish_reason, FinishReason::kCancelled);
}

TEST(RuntimeGenerate, BadWeightsAndInputsGiveClearErrors) {
  REQUIRE_REFERENCE();
  const json& m = Find(ref.data["decoders"], "qwen2_f32");
  const fs::path snap = m["snapshot"].get<std::string>();
  auto config = ModelConfig::FromFile(snap);
  ASSERT_TRUE(config.ok());
  auto weights = WeightsFromFiles(snap, false);
  ASSERT_TRUE(weights.ok());
  WeightMap missing = *weights;
  missing.erase("model.layers.1.self_attn.k_proj.bias");
  auto r = DecoderModel::Create(*config, missing);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("'model.layers.1.self_attn.k_proj.bias' is missing"));
  ModelConfig wrong = *config;
  wrong.intermediate_size = 96;
  r = DecoderModel::Create(wrong, *weights);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("mlp.gate_proj.weight' has shape"));
  ModelConfig untied = *config;
  WeightMap no_head = *weights;
  no_head.erase("lm_head.weight");
  r = DecoderModel::Create(untied, no_head);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("lm_head.weight"));

  Loaded l = LoadDecoder(snap);
  ASSERT_TRUE(l.generator);
  auto bad =
      l.generator->Generate({1, 2, static_cast<int32_t>(config->vocab_size)}, NoEos(4), nullptr);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr("outside the vocabulary"));
  EXPECT_FALSE(l.generator->Generate({}, NoEos(4), nullptr).ok());
  auto enc = EncoderModel::Load(snap, *weights);
  ASSERT_FALSE(enc.ok());
  EXPECT_THAT(enc.status().message(), HasSubstr("not bert"));
  auto nofiles = WeightsFromFiles("/nonexistent/model", false);
  ASSERT_FALSE(nofiles.ok());
  EXPECT_THAT(nofiles.status().message(), HasSubstr("/nonexistent/model"));
}

// --- encoders against sentence-transformers ---

class RuntimeEncoder : public ::testing::TestWithParam<std::string> {};

TEST_P(RuntimeEncoder, EmbeddingsMatchSentenceTransformers) {
  REQUIRE_REFERENCE();
  const json& m = Find(ref.data["embeddings"], GetParam());
  ASSERT_FALSE(m.is_null());
  const fs::path snap = m["snapshot"].get<std::string>();
  auto weights = WeightsFromFiles(snap, false);
  ASSERT_TRUE(weights.ok()) << weights.status().ToString();
  auto model = EncoderModel::Load(snap, std::move(weights).value());
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  EXPECT_TRUE((*model)->pooling().normalize);
  std::vector<std::vector<int32_t>> batch;
  for (const json& c : m["cases"]) batch.push_back(Ids(c["ids"]));
  // The whole batch (padded) and each text alone must both match.
  auto all = (*model)->Embed(batch);
  ASSERT_TRUE(all.ok()) << all.status().ToString();
  ASSERT_EQ(all->size(), batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    auto one = (*model)->Embed({batch[i]});
    ASSERT_TRUE(one.ok());
    const auto expected = m["cases"][i]["embedding"].get<std::vector<double>>();
    for (const auto* got : {&(*all)[i], &(*one)[0]}) {
      ASSERT_EQ(got->size(), expected.size());
      double dot = 0, na = 0, nb = 0, worst = 0;
      for (size_t k = 0; k < expected.size(); ++k) {
        dot += (*got)[k] * expected[k];
        na += (*got)[k] * (*got)[k];
        nb += expected[k] * expected[k];
        worst = std::max(worst, std::abs((*got)[k] - expected[k]));
      }
      const double cosine = dot / std::sqrt(na * nb);
      EXPECT_GT(cosine, 1 - 1e-4) << "text " << i;
      EXPECT_LT(worst, 1e-5) << "text " << i;
      std::printf("[ numerics ] %s text %zu (%zu ids%s): 1-cos %.3g, max |diff| %.3g\n",
                  GetParam().c_str(), i, batch[i].size(), got == &(*one)[0] ? ", alone" : "",
                  1 - cosine, worst);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Models, RuntimeEncoder, ::testing::Values("minilm", "tiny_bert"));

// --- through the real broker ---

TEST(RuntimeBroker, LeasedWeightsAreZeroCopyAndGenerateLikeFiles) {
  REQUIRE_REFERENCE();
  const json& m = Find(ref.data["decoders"], "llama_llama3_f32");
  TempDir dir("wbroker-runtime");
  BrokerProcess::Options opts;
  opts.socket = dir / "wb.sock";
  opts.cache_dir = ref.hub;
  BrokerProcess broker(opts);
  client::ClientOptions co;
  co.socket_path = opts.socket.string();
  auto c = client::Client::Connect(co);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  auto lease_r = (*c)->Attach(m["repo"].get<std::string>());
  ASSERT_TRUE(lease_r.ok()) << lease_r.status().ToString() << "\n" << broker.Log();
  std::shared_ptr<const client::Lease> lease = std::move(lease_r).value();
  EXPECT_EQ(lease->revision(), m["commit"].get<std::string>());

  auto weights = WeightsFromLease(lease);
  ASSERT_TRUE(weights.ok()) << weights.status().ToString();
  EXPECT_EQ(weights->size(), lease->tensors().size());
  const auto* base = static_cast<const std::byte*>(lease->arena_base());
  for (const auto& [name, t] : *weights) {
    const auto* p = static_cast<const std::byte*>(t.data_ptr());
    EXPECT_TRUE(p >= base && p + t.nbytes() <= base + lease->arena_size())
        << name << " is not inside the lease's arena (copied?)";
    EXPECT_EQ(static_cast<const void*>(p), lease->Find(name)->data) << name;
  }
  auto config = ModelConfig::FromFile(lease->snapshot_dir());
  ASSERT_TRUE(config.ok()) << config.status().ToString();
  auto model = DecoderModel::Create(*config, std::move(weights).value());
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  std::shared_ptr<const DecoderModel> shared = std::move(model).value();
  auto gen = Generator::Create(shared, {});
  ASSERT_TRUE(gen.ok());
  Loaded files = LoadDecoder(m["snapshot"].get<std::string>());
  ASSERT_TRUE(files.generator);
  for (const json& cs : m["cases"]) {
    const auto prompt = Ids(cs["prompt"]);
    auto a = (*gen)->Generate(prompt, NoEos(64), nullptr);
    auto b = files.generator->Generate(prompt, NoEos(64), nullptr);
    ASSERT_TRUE(a.ok() && b.ok()) << a.status().ToString();
    EXPECT_EQ(a->tokens, b->tokens);
    EXPECT_EQ(a->tokens, Ids(cs["generated"]));
  }
  // The model holds the lease: dropping our handle keeps the arena mapped.
  std::weak_ptr<const client::Lease> weak = lease;
  lease.reset();
  EXPECT_FALSE(weak.expired());
  auto again = (*gen)->Generate(Ids(m["cases"][0]["prompt"]), NoEos(8), nullptr);
  ASSERT_TRUE(again.ok());
  gen->reset();
  shared.reset();
  EXPECT_TRUE(weak.expired()) << "the last tensor should release the lease";
}

}  // namespace
}  // namespace wbroker::testing
