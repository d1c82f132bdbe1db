// wbroker tests: model resolution off the io thread (broker/cache_resolver.h).
#include "cache_resolver.h"

#include <boost/asio/io_context.hpp>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <future>
#include <mutex>
#include <thread>

#include "hub_fixture.h"
#include "temp_dir.h"

namespace wbroker::broker {
namespace {

using namespace std::chrono_literals;
using ::testing::HasSubstr;
using wbroker::testing::HubRepoBuilder;
using wbroker::testing::TempDir;

/// A resolution that blocks until Open(), like a call into a hung network
/// filesystem; shared with the resolver's threads, which may outlive a test.
struct Gate {
  std::promise<void> open;
  std::shared_future<void> opened = open.get_future().share();
  std::atomic<int> entered{0};  ///< resolutions that reached the gate
};

/// A resolve function that blocks on `gate` for model "stuck" and answers
/// every other model at once, with the model's name as its commit.
CacheResolver::ResolveFn GatedResolve(std::shared_ptr<Gate> gate) {
  return [gate](const std::string& model, const std::string&) -> Result<ResolvedModel> {
    if (model == "stuck") {
      ++gate->entered;
      gate->opened.wait();
    }
    ResolvedModel r;
    r.model = model;
    r.commit = "commit-of-" + model;
    return r;
  };
}

/// Runs `io` until `done()` or `limit` passes; true when done.
template <typename Pred>
bool RunUntil(boost::asio::io_context& io, Pred done, std::chrono::milliseconds limit = 10s) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (!done() && std::chrono::steady_clock::now() < end) {
    io.restart();
    io.run_for(10ms);
  }
  return done();
}

TEST(CacheResolverTest, ResolvesTheCacheOnItsOwnThreadAndAnswersThroughTheExecutor) {
  TempDir dir;
  HubRepoBuilder repo(dir.path(), "org/model");
  const std::string commit = repo.AddCommit({{"config.json", "{}"}});
  repo.SetRef("main", commit);
  CacheResolver::Options opts;
  opts.cache_dir = dir.path();
  auto resolver = CacheResolver::Create(opts);
  ASSERT_TRUE(resolver.ok()) << resolver.status().ToString();

  boost::asio::io_context io;
  std::optional<Result<ResolvedModel>> got, missing;
  std::thread::id answered_on;
  (*resolver)->Resolve("org/model", "main", io.get_executor(), [&](Result<ResolvedModel> r) {
    answered_on = std::this_thread::get_id();
    got = std::move(r);
  });
  (*resolver)->Resolve("org/absent", "", io.get_executor(),
                       [&](Result<ResolvedModel> r) { missing = std::move(r); });
  // Nothing runs the callbacks but the executor.
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(got.has_value());
  ASSERT_TRUE(RunUntil(io, [&] { return got && missing; }));
  EXPECT_EQ(answered_on, std::this_thread::get_id());
  ASSERT_TRUE(got->ok()) << got->status().ToString();
  EXPECT_EQ((*got)->commit, commit);
  EXPECT_EQ((*got)->requested_revision, "main");
  ASSERT_FALSE(missing->ok());
  EXPECT_EQ(missing->status().code(), ErrorCode::kNotFound);
  EXPECT_THAT(missing->status().message(), HasSubstr("org/absent"));
  EXPECT_EQ((*resolver)->pending(), 0u);
}

TEST(CacheResolverTest, AStuckResolutionDoesNotHoldUpTheOthers) {
  auto gate = std::make_shared<Gate>();
  auto resolver = CacheResolver::Create({"", 2, GatedResolve(gate)});
  ASSERT_TRUE(resolver.ok());
  boost::asio::io_context io;
  std::optional<Result<ResolvedModel>> stuck, other;
  (*resolver)->Resolve("stuck", "main", io.get_executor(),
                       [&](Result<ResolvedModel> r) { stuck = std::move(r); });
  (*resolver)->Resolve("fine", "main", io.get_executor(),
                       [&](Result<ResolvedModel> r) { other = std::move(r); });
  ASSERT_TRUE(RunUntil(io, [&] { return other.has_value(); }));
  ASSERT_TRUE(other->ok());
  EXPECT_EQ((*other)->commit, "commit-of-fine");
  EXPECT_FALSE(stuck.has_value());
  EXPECT_EQ(gate->entered, 1);
  EXPECT_EQ((*resolver)->pending(), 1u);
  // The filesystem comes back: the stuck request is answered after all.
  gate->open.set_value();
  ASSERT_TRUE(RunUntil(io, [&] { return stuck.has_value(); }));
  EXPECT_EQ((*stuck)->commit, "commit-of-stuck");
  EXPECT_EQ((*resolver)->pending(), 0u);
}

TEST(CacheResolverTest, DestroyingItWhileAResolutionIsStuckReturnsAndDropsTheResults) {
  auto gate = std::make_shared<Gate>();
  auto resolver = CacheResolver::Create({"", 1, GatedResolve(gate)});
  ASSERT_TRUE(resolver.ok());
  boost::asio::io_context io;
  auto answered = std::make_shared<std::atomic<int>>(0);
  (*resolver)->Resolve("stuck", "", io.get_executor(),
                       [answered](Result<ResolvedModel>) { ++*answered; });
  // Queued behind the stuck one on the only thread.
  (*resolver)->Resolve("queued", "", io.get_executor(),
                       [answered](Result<ResolvedModel>) { ++*answered; });
  ASSERT_TRUE(RunUntil(io, [&] { return gate->entered == 1; }));
  EXPECT_EQ((*resolver)->pending(), 2u);
  // A broker stopping with its cache hung must not wait for the cache.
  const auto t0 = std::chrono::steady_clock::now();
  resolver->reset();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  // The late result is discarded, and the queued request never runs.
  gate->open.set_value();
  std::this_thread::sleep_for(100ms);
  io.restart();
  io.run_for(100ms);
  EXPECT_EQ(*answered, 0);
}

}  // namespace
}  // namespace wbroker::broker
