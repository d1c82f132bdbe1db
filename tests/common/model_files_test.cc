// wbroker tests: finding and cross-checking the safetensors files of a
// snapshot (single file, sharded index) and parsing index files.
#include "wbroker/common/model_files.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "hub_fixture.h"
#include "safetensors_writer.h"
#include "temp_dir.h"

namespace wbroker {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using testing::FixtureTensor;
using testing::FixtureTensorBytes;
using ::testing::HasSubstr;
using testing::HubRepoBuilder;
using testing::RawSafetensors;
using testing::SerializeSafetensors;
using testing::Sha256Hex;
using testing::TempDir;
using testing::WriteFile;

constexpr char kIndex[] = "model.safetensors.index.json";
constexpr char kShard1[] = "model-00001-of-00003.safetensors";
constexpr char kShard2[] = "model-00002-of-00003.safetensors";
constexpr char kShard3[] = "model-00003-of-00003.safetensors";

FixtureTensor T(std::string name, std::vector<uint64_t> shape, DType dtype = DType::kF32) {
  FixtureTensor t;
  t.name = std::move(name);
  t.dtype = dtype;
  t.shape = std::move(shape);
  return t;
}

// An index JSON mapping each tensor to its shard.
std::string IndexJson(const std::map<std::string, std::string>& weight_map,
                      const std::string& metadata = R"({"total_size": 1234})") {
  std::string out = "{\"metadata\": " + metadata + ", \"weight_map\": {";
  bool first = true;
  for (const auto& [tensor, shard] : weight_map) {
    if (!first) out += ", ";
    first = false;
    out += "\"" + tensor + "\": \"" + shard + "\"";
  }
  return out + "}}";
}

class ModelFilesTest : public ::testing::Test {
 protected:
  // Adds a commit with `files` and resolves it.
  ResolvedModel Commit(const std::map<std::string, std::string>& files) {
    std::string commit = repo_.AddCommit(files);
    auto r = ResolveModel(tmp_.path() / "hub", "org/model", commit);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : ResolvedModel{};
  }

  // Three shards: a,b in 1; c in 2; d,e in 3.
  std::map<std::string, std::string> ThreeShards() {
    return {
        {kShard1, SerializeSafetensors({T("a", {2, 3}), T("b", {4}, DType::kBF16)})},
        {kShard2, SerializeSafetensors({T("c", {8}, DType::kU8)})},
        {kShard3, SerializeSafetensors({T("d", {1}, DType::kI64), T("e", {}, DType::kF16)})},
        {kIndex,
         IndexJson(
             {{"a", kShard1}, {"b", kShard1}, {"c", kShard2}, {"d", kShard3}, {"e", kShard3}})},
    };
  }

  TempDir tmp_;
  HubRepoBuilder repo_{tmp_.path() / "hub", "org/model"};
};

// ------------------------------------------------------------- single file

TEST_F(ModelFilesTest, SingleFile) {
  std::string content = SerializeSafetensors({T("w", {3, 4}), T("b", {4}, DType::kF16)});
  ResolvedModel m = Commit({{"model.safetensors", content}, {"config.json", "{}"}});
  auto w = OpenModelWeights(m);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  EXPECT_FALSE(w->sharded);
  ASSERT_EQ(w->files.size(), 1u);
  EXPECT_EQ(w->files[0].name, "model.safetensors");
  EXPECT_EQ(w->files[0].path, fs::canonical(repo_.repo_dir() / "blobs" / Sha256Hex(content)));
  EXPECT_EQ(w->files[0].header.tensors.size(), 2u);
  EXPECT_EQ(w->files[0].header.file_size, content.size());
  EXPECT_EQ(w->tensor_count, 2u);
  EXPECT_EQ(w->tensor_bytes, 3u * 4 * 4 + 4 * 2);
}

TEST_F(ModelFilesTest, SingleFileInLocalDir) {
  fs::path dir = tmp_.path() / "local";
  WriteFile(dir / "model.safetensors", SerializeSafetensors({T("x", {5})}));
  auto m = ResolveModel(tmp_.path() / "hub", dir.string(), "");
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  auto w = OpenModelWeights(*m);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  ASSERT_EQ(w->files.size(), 1u);
  EXPECT_EQ(w->files[0].path, fs::canonical(dir / "model.safetensors"));
  EXPECT_EQ(w->tensor_bytes, 20u);
}

// ----------------------------------------------------------------- sharded

TEST_F(ModelFilesTest, ThreeShards) {
  ResolvedModel m = Commit(ThreeShards());
  auto w = OpenModelWeights(m);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  EXPECT_TRUE(w->sharded);
  ASSERT_EQ(w->files.size(), 3u);
  EXPECT_EQ(w->files[0].name, kShard1);
  EXPECT_EQ(w->files[1].name, kShard2);
  EXPECT_EQ(w->files[2].name, kShard3);
  EXPECT_EQ(w->files[0].header.tensors.size(), 2u);
  EXPECT_EQ(w->files[1].header.tensors.size(), 1u);
  EXPECT_EQ(w->files[2].header.tensors.size(), 2u);
  EXPECT_EQ(w->tensor_count, 5u);
  EXPECT_EQ(w->tensor_bytes, FixtureTensorBytes(T("a", {2, 3})) +
                                 FixtureTensorBytes(T("b", {4}, DType::kBF16)) + 8 + 8 + 2);
  for (const WeightFile& f : w->files) {
    EXPECT_EQ(f.path.parent_path(), fs::canonical(repo_.repo_dir() / "blobs")) << f.name;
  }
}

TEST_F(ModelFilesTest, TwoShardsInNestedFolderOrderedByName) {
  // Shards listed out of order in the index come back sorted by name.
  std::map<std::string, std::string> files = {
      {"sub/z.safetensors", SerializeSafetensors({T("first", {2})})},
      {"sub/a.safetensors", SerializeSafetensors({T("second", {2})})},
      {kIndex, R"({"weight_map": {"first": "sub/z.safetensors", "second": "sub/a.safetensors"}})"},
  };
  auto w = OpenModelWeights(Commit(files));
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  ASSERT_EQ(w->files.size(), 2u);
  EXPECT_EQ(w->files[0].name, "sub/a.safetensors");
  EXPECT_EQ(w->files[1].name, "sub/z.safetensors");
}

TEST_F(ModelFilesTest, IndexWinsOverSingleFile) {
  auto files = ThreeShards();
  files["model.safetensors"] = SerializeSafetensors({T("only", {1})});
  auto w = OpenModelWeights(Commit(files));
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  EXPECT_TRUE(w->sharded);
  EXPECT_EQ(w->files.size(), 3u);
  EXPECT_EQ(w->tensor_count, 5u);
}

TEST_F(ModelFilesTest, NeitherIndexNorSingleFile) {
  ResolvedModel m = Commit({{"config.json", "{}"}, {"pytorch_model.bin", "pt"}});
  auto w = OpenModelWeights(m);
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), ErrorCode::kNotFound);
  EXPECT_THAT(w.status().message(), HasSubstr(m.snapshot_dir.string()));
  EXPECT_THAT(w.status().message(), HasSubstr("model.safetensors.index.json"));
  EXPECT_THAT(w.status().message(), HasSubstr("and model.safetensors"));
}

TEST_F(ModelFilesTest, DanglingIndexDoesNotFallBackToSingleFile) {
  auto files = ThreeShards();
  files["model.safetensors"] = SerializeSafetensors({T("only", {1})});
  ResolvedModel m = Commit(files);
  fs::remove(fs::canonical(m.snapshot_dir / kIndex));
  auto w = OpenModelWeights(m);
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), ErrorCode::kNotFound);
  EXPECT_THAT(w.status().message(), HasSubstr(kIndex));
}

TEST_F(ModelFilesTest, IndexBadJson) {
  auto files = ThreeShards();
  files[kIndex] = "{\"weight_map\": {\"a\": ";
  auto w = OpenModelWeights(Commit(files));
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), ErrorCode::kCorruptData);
  EXPECT_THAT(w.status().message(), HasSubstr(kIndex));
  EXPECT_THAT(w.status().message(), HasSubstr("invalid JSON"));
}

TEST_F(ModelFilesTest, IndexWithoutWeightMap) {
  auto files = ThreeShards();
  files[kIndex] = R"({"metadata": {"total_size": 1}})";
  auto w = OpenModelWeights(Commit(files));
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), ErrorCode::kCorruptData);
  EXPECT_THAT(w.status().message(), HasSubstr(kIndex));
  EXPECT_THAT(w.status().message(), HasSubstr("no \"weight_map\""));
}

TEST_F(ModelFilesTest, WeightMapValueNotString) {
  auto files = ThreeShards();
  files[kIndex] = R"({"weight_map": {"a": 1}})";
  auto w = OpenModelWeights(Commit(files));
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), ErrorCode::kCorruptData);
  EXPECT_THAT(w.status().message(), HasSubstr("weight_map entry \"a\" is not a string"));
}

TEST_F(ModelFilesTest, IndexNamesFileWithDotDot) {
  auto files = ThreeShards();
  files[kIndex] = IndexJson({{"a", "../../blobs/x.safetensors"}});
  auto w = OpenModelWeights(Commit(files));
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), ErrorCode::kCorruptData);
  EXPECT_THAT(w.status().message(), HasSubstr(kIndex));
  EXPECT_THAT(w.status().message(), HasSubstr("\"..\""));
  EXPECT_THAT(w.status().message(), HasSubstr("../../blobs/x.safetensors"));
}

TEST_F(ModelFilesTest, ShardSymlinkLeavingRepoIsRefused) {
  WriteFile(tmp_.path() / "outside.safetensors", SerializeSafetensors({T("a", {1})}));
  ResolvedModel m = Commit({{kIndex, IndexJson({{"a", "evil.safetensors"}})}});
  fs::create_symlink(tmp_.path() / "outside.safetensors", m.snapshot_dir / "evil.safetensors");
  auto w = OpenModelWeights(m);
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), ErrorCode::kPermissionDenied);
  EXPECT_THAT(w.status().message(), HasSubstr("evil.safetensors"));
  EXPECT_THAT(w.status().message(), HasSubstr("leaves the repo folder"));
}

TEST_F(ModelFilesTest, ShardMissing) {
  auto files = ThreeShards();
  files.erase(kShard2);
  ResolvedModel m = Commit(files);
  auto w = OpenModelWeights(m);
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), ErrorCode::kNotFound);
  EXPECT_THAT(w.status().message(), HasSubstr(kShard2));
  EXPECT_THAT(w.status().message(), HasSubstr(m.snapshot_dir.string()));
}

TEST_F(ModelFilesTest, TensorInIndexMissingFromShard) {
  auto files = ThreeShards();
  files[kIndex] = IndexJson({{"a", kShard1},
                             {"b", kShard1},
                             {"c", kShard2},
                             {"d", kShard3},
                             {"e", kShard3},
                             {"ghost", kShard2}});
  auto w = OpenModelWeights(Commit(files));
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), ErrorCode::kCorruptData);
  EXPECT_THAT(w.status().message(), HasSubstr("\"ghost\""));
  EXPECT_THAT(w.status().message(), HasSubstr(kShard2));
  EXPECT_THAT(w.status().message(), HasSubstr("does not contain it"));
}

TEST_F(ModelFilesTest, TensorInShardMissingFromIndex) {
  auto files = ThreeShards();
  files[kIndex] = IndexJson({{"a", kShard1}, {"c", kShard2}, {"d", kShard3}, {"e", kShard3}});
  auto w = OpenModelWeights(Commit(files));
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), ErrorCode::kCorruptData);
  EXPECT_THAT(w.status().message(), HasSubstr("tensor \"b\" of shard " + std::string(kShard1)));
  EXPECT_THAT(w.status().message(), HasSubstr("not in the weight_map"));
}

TEST_F(ModelFilesTest, TensorMappedToTheWrongShard) {
  auto files = ThreeShards();
  files[kIndex] =
      IndexJson({{"a", kShard1}, {"b", kShard1}, {"c", kShard3}, {"d", kShard3}, {"e", kShard2}});
  auto w = OpenModelWeights(Commit(files));
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), ErrorCode::kCorruptData);
  EXPECT_THAT(w.status().message(), HasSubstr("weight_map maps it to"));
}

TEST_F(ModelFilesTest, DuplicateTensorAcrossShards) {
  std::map<std::string, std::string> files = {
      {"one.safetensors", SerializeSafetensors({T("a", {2}), T("dup", {2})})},
      {"two.safetensors", SerializeSafetensors({T("b", {2}), T("dup", {2})})},
      {kIndex,
       IndexJson({{"a", "one.safetensors"}, {"b", "two.safetensors"}, {"dup", "one.safetensors"}})},
  };
  auto w = OpenModelWeights(Commit(files));
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), ErrorCode::kCorruptData);
  EXPECT_THAT(w.status().message(), HasSubstr("\"dup\""));
  EXPECT_THAT(w.status().message(), HasSubstr("one.safetensors and two.safetensors"));
}

TEST_F(ModelFilesTest, MalformedShardIsNamed) {
  auto files = ThreeShards();
  files[kShard2] =
      RawSafetensors("{\"c\": {\"dtype\": \"U8\", \"shape\": [8]", std::string(8, 'x'));
  ResolvedModel m = Commit(files);
  auto w = OpenModelWeights(m);
  ASSERT_FALSE(w.ok());
  EXPECT_THAT(w.status().message(), HasSubstr((m.snapshot_dir / kShard2).string()));
}

TEST_F(ModelFilesTest, MalformedSingleFileIsNamed) {
  ResolvedModel m = Commit({{"model.safetensors", "short"}});
  auto w = OpenModelWeights(m);
  ASSERT_FALSE(w.ok());
  EXPECT_THAT(w.status().message(), HasSubstr((m.snapshot_dir / "model.safetensors").string()));
}

// --------------------------------------------------------- ParseShardIndex

TEST(ParseShardIndexTest, ParsesWeightMapFilesAndMetadata) {
  auto idx = ParseShardIndex("idx", R"({
    "metadata": {"total_size": 1234, "format": "pt", "flag": true, "nested": {"x": 1}, "n": null},
    "weight_map": {"b": "s2.safetensors", "a": "s1.safetensors", "c": "s2.safetensors"}
  })");
  ASSERT_TRUE(idx.ok()) << idx.status().ToString();
  EXPECT_EQ(idx->weight_map.size(), 3u);
  EXPECT_EQ(idx->weight_map.at("b"), "s2.safetensors");
  EXPECT_THAT(idx->files, ElementsAre("s1.safetensors", "s2.safetensors"));
  EXPECT_EQ(idx->metadata.at("total_size"), "1234");
  EXPECT_EQ(idx->metadata.at("format"), "pt");
  EXPECT_EQ(idx->metadata.at("flag"), "true");
  EXPECT_EQ(idx->metadata.count("nested"), 0u);
  EXPECT_EQ(idx->metadata.count("n"), 0u);
}

TEST(ParseShardIndexTest, MetadataIsOptional) {
  auto idx = ParseShardIndex("idx", R"({"weight_map": {"a": "x.safetensors"}})");
  ASSERT_TRUE(idx.ok()) << idx.status().ToString();
  EXPECT_TRUE(idx->metadata.empty());
  EXPECT_THAT(idx->files, ElementsAre("x.safetensors"));
}

TEST(ParseShardIndexTest, RefusesMalformedIndexes) {
  struct Case {
    std::string json;
    std::string why;
  };
  for (const Case& c : {
           Case{"", "invalid JSON"},
           Case{"{", "invalid JSON"},
           Case{"[]", "not a JSON object"},
           Case{R"({"weight_map": []})", "\"weight_map\" is not a JSON object"},
           Case{R"({"weight_map": {}})", "\"weight_map\" is empty"},
           Case{R"({"weight_map": {"a": null}})", "not a string"},
           Case{R"({"weight_map": {"a": ""}})", "empty file name"},
           Case{R"({"weight_map": {"a": "/etc/passwd"}})", "absolute"},
           Case{R"({"weight_map": {"a": "x/../../y"}})", "\"..\""},
           Case{R"({"weight_map": {"a": "x\u0000y"}})", "NUL"},
           Case{R"({"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}})",
                "duplicate key \"a\""},
       }) {
    auto idx = ParseShardIndex("my-index.json", c.json);
    ASSERT_FALSE(idx.ok()) << c.json;
    EXPECT_EQ(idx.status().code(), ErrorCode::kCorruptData) << c.json;
    EXPECT_THAT(idx.status().message(), HasSubstr("my-index.json: ")) << c.json;
    EXPECT_THAT(idx.status().message(), HasSubstr(c.why)) << c.json;
  }
}

}  // namespace
}  // namespace wbroker
