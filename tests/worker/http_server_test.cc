// wbroker tests: the HTTP worker's server and API, end to end over real
// sockets on 127.0.0.1, against a fake engine (no libtorch needed).
#include "wbroker/http/http_server.h"

#include <sys/socket.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <ctime>
#include <future>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "fake_engine.h"
#include "wbroker/common/version.h"
#include "wbroker/http/listen_address.h"
#include "wbroker/http/openai_api.h"
#include "wbroker/http/query_string.h"
#include "wbroker/http/worker_metrics.h"

namespace wbroker::http {
namespace {

namespace net = boost::asio;
namespace bhttp = boost::beast::http;
using net::ip::tcp;
using nlohmann::json;
using testing::FakeEngine;
using ::testing::HasSubstr;
using namespace std::chrono_literals;

/// One parsed HTTP response.
struct Reply {
  unsigned status = 0;      ///< status code
  bhttp::fields headers;    ///< response headers
  std::string body;         ///< de-chunked body
  bool keep_alive = false;  ///< the server keeps the connection

  json Json() const { return json::parse(body); }
  std::string Header(bhttp::field f) const { return std::string(headers[f]); }
};

/// A blocking HTTP/1.1 client on one connection.
class Client {
 public:
  explicit Client(uint16_t port) : socket_(io_) {
    socket_.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), port));
  }

  void SendRaw(std::string_view bytes) { net::write(socket_, net::buffer(bytes)); }

  void Send(bhttp::verb method, const std::string& target, const std::string& body = "",
            const std::string& content_type = "application/json") {
    bhttp::request<bhttp::string_body> req(method, target, 11);
    req.set(bhttp::field::host, "127.0.0.1");
    if (!body.empty() || method == bhttp::verb::post) {
      req.set(bhttp::field::content_type, content_type);
      req.body() = body;
    }
    req.prepare_payload();
    bhttp::write(socket_, req);
  }

  Reply Read() {
    bhttp::response_parser<bhttp::string_body> parser;
    parser.body_limit(64 << 20);
    bhttp::read(socket_, buffer_, parser);
    auto res = parser.release();
    Reply reply;
    reply.status = res.result_int();
    reply.headers = res.base();
    reply.body = res.body();
    reply.keep_alive = res.keep_alive();
    return reply;
  }

  Reply Request(bhttp::verb method, const std::string& target, const std::string& body = "") {
    Send(method, target, body);
    return Read();
  }
  Reply Get(const std::string& target) { return Request(bhttp::verb::get, target); }
  Reply Post(const std::string& target, const json& body) {
    return Request(bhttp::verb::post, target, body.dump());
  }

  /// Reads raw bytes until `needle` has appeared `count` times; returns them.
  std::string ReadRawUntil(std::string_view needle, int count) {
    std::string got;
    char buf[4096];
    auto occurrences = [&] {
      int n = 0;
      for (size_t pos = got.find(needle); pos != std::string::npos; pos = got.find(needle, pos + 1))
        ++n;
      return n;
    };
    while (occurrences() < count) {
      size_t n = socket_.read_some(net::buffer(buf));
      got.append(buf, n);
    }
    return got;
  }

  /// True when the server closed the connection (the next read sees EOF or a reset).
  bool PeerClosed() {
    char byte;
    boost::system::error_code ec;
    socket_.read_some(net::buffer(&byte, 1), ec);
    return ec == net::error::eof || ec == net::error::connection_reset;
  }

  tcp::socket& socket() { return socket_; }

 private:
  net::io_context io_;                ///< for the socket
  tcp::socket socket_;                ///< the connection
  boost::beast::flat_buffer buffer_;  ///< read-ahead between responses
};

/// The data fields of a text/event-stream body, in order.
std::vector<std::string> SseData(const std::string& body) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < body.size()) {
    size_t end = body.find("\n\n", pos);
    EXPECT_NE(end, std::string::npos) << "unterminated event in: " << body;
    if (end == std::string::npos) break;
    std::string event = body.substr(pos, end - pos);
    EXPECT_EQ(event.rfind("data: ", 0), 0u) << event;
    out.push_back(event.substr(6));
    pos = end + 2;
  }
  return out;
}

template <class Pred>
bool WaitFor(Pred pred, std::chrono::milliseconds limit = 5000ms) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

class HttpServerTest : public ::testing::Test {
 protected:
  static HttpServerOptions TestOptions() {
    HttpServerOptions options;
    options.listen = "127.0.0.1:0";
    options.threads = 2;
    options.compute_threads = 2;
    options.drain_timeout = 5000ms;
    options.model_aliases = {"echo"};
    return options;
  }

  void StartServer(HttpServerOptions options = TestOptions(), std::string kind = "decoder") {
    engine_ = std::make_shared<FakeEngine>(std::move(kind));
    auto server = HttpServer::Create(options, engine_);
    ASSERT_TRUE(server.ok()) << server.status().ToString();
    server_ = std::move(server).value();
    port_ = server_->port();
    ASSERT_NE(port_, 0);
    run_done_ = std::async(std::launch::async, [this] { server_->Run(); });
  }

  /// Stop() and wait for Run() to return; false when it did not within `limit`.
  bool StopServer(std::chrono::milliseconds limit = 10000ms) {
    if (!server_) return true;
    server_->Stop();
    bool returned = run_done_.wait_for(limit) == std::future_status::ready;
    if (!returned) std::abort();  // a hung Run() cannot be cleaned up: fail loudly
    server_.reset();
    return returned;
  }

  void TearDown() override { StopServer(); }

  Reply Get(const std::string& target) { return Client(port_).Get(target); }
  Reply Post(const std::string& target, const json& body) {
    return Client(port_).Post(target, body);
  }

  std::shared_ptr<FakeEngine> engine_;  ///< what the server serves
  std::unique_ptr<HttpServer> server_;  ///< under test
  std::future<void> run_done_;          ///< Run() on its own thread
  uint16_t port_ = 0;                   ///< the ephemeral port
};

void ExpectJsonError(const Reply& reply, unsigned status, const std::string& substring = "") {
  EXPECT_EQ(reply.status, status) << reply.body;
  EXPECT_EQ(reply.Header(bhttp::field::content_type), "application/json");
  json body = json::parse(reply.body, nullptr, false);
  ASSERT_TRUE(body.is_object()) << reply.body;
  ASSERT_TRUE(body.contains("error")) << reply.body;
  EXPECT_EQ(body["error"]["code"], status);
  EXPECT_TRUE(body["error"]["type"].is_string());
  EXPECT_THAT(body["error"]["message"].get<std::string>(), HasSubstr(substring));
}

// --- helpers without a server ---

TEST(ListenAddressTest, ParsesTheThreeForms) {
  auto a = ParseListenAddress("127.0.0.1:8001");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->host, "127.0.0.1");
  EXPECT_EQ(a->port, 8001);
  auto b = ParseListenAddress("[::1]:0");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->host, "::1");
  EXPECT_EQ(b->port, 0);
  auto c = ParseListenAddress(":9000");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->host, "0.0.0.0");
  EXPECT_EQ(c->port, 9000);
  auto d = ParseListenAddress("localhost:80");
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->host, "localhost");
  for (const char* bad :
       {"", "8000", "host:", "host:65536", "host:12x", "::1:80", "[::1]80", "[::1:80", "[]:80"}) {
    EXPECT_FALSE(ParseListenAddress(bad).ok()) << bad;
  }
}

TEST(QueryStringTest, DecodesPercentAndPlus) {
  auto d = UrlDecode("a%20b+c%C3%A9%2B", true);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(*d, "a b c\xC3\xA9+");
  EXPECT_EQ(*UrlDecode("a+b", false), "a+b");
  EXPECT_FALSE(UrlDecode("%G0", true).ok());
  EXPECT_FALSE(UrlDecode("abc%2", true).ok());
  EXPECT_EQ(*UrlDecode(UrlEncode("é &=+/?\x01"), true), "é &=+/?\x01");
  auto qs = QueryString::Parse("prompt=hi+there&&flag&max_tokens=5&prompt=second");
  ASSERT_TRUE(qs.ok());
  EXPECT_EQ(qs->Get("prompt"), "hi there");
  EXPECT_EQ(qs->Get("flag"), "");
  EXPECT_EQ(qs->Get("max_tokens"), "5");
  EXPECT_FALSE(qs->Get("missing").has_value());
  EXPECT_FALSE(SplitTarget("http://x/y").ok());
  EXPECT_EQ(SplitTarget("/a%2Fb?x=1")->path, "/a/b");
}

TEST(OpenAiApiTest, KeepsSplitUtf8Sequences) {
  EXPECT_EQ(CompleteUtf8Prefix("abc"), 3u);
  EXPECT_EQ(CompleteUtf8Prefix("ab\xC3"), 2u);         // first byte of é
  EXPECT_EQ(CompleteUtf8Prefix("ab\xC3\xA9"), 4u);     // whole é
  EXPECT_EQ(CompleteUtf8Prefix("\xE6\x97"), 0u);       // 2 of 3 bytes of 日
  EXPECT_EQ(CompleteUtf8Prefix("x\xF0\x9F\x98"), 1u);  // 3 of 4 bytes of an emoji
}

// --- probes and models ---

TEST_F(HttpServerTest, Healthz) {
  StartServer();
  Reply r = Get("/healthz");
  EXPECT_EQ(r.status, 200u);
  EXPECT_EQ(r.Header(bhttp::field::content_type), "application/json");
  EXPECT_EQ(r.Json(), json({{"status", "ok"}}));
}

TEST_F(HttpServerTest, ReadyzFollowsTheEngine) {
  StartServer();
  EXPECT_EQ(Get("/readyz").status, 200u);
  engine_->set_ready(false);
  ExpectJsonError(Get("/readyz"), 503, "not ready");
  EXPECT_EQ(Get("/healthz").status, 200u);  // alive though not ready
  ExpectJsonError(Post("/v1/completions", {{"prompt", "x"}}), 503, "not ready");
  engine_->set_ready(true);
  EXPECT_EQ(Get("/readyz").status, 200u);
}

TEST_F(HttpServerTest, ModelsListsTheServedModel) {
  StartServer();
  Reply r = Get("/v1/models");
  ASSERT_EQ(r.status, 200u);
  json j = r.Json();
  EXPECT_EQ(j["object"], "list");
  ASSERT_EQ(j["data"].size(), 1u);
  EXPECT_EQ(j["data"][0]["id"], "fake/echo-model");
  EXPECT_EQ(j["data"][0]["object"], "model");
  EXPECT_EQ(j["data"][0]["owned_by"], "wbroker");
  EXPECT_EQ(j["data"][0]["revision"], "0123456789abcdef");
  EXPECT_EQ(j["data"][0]["kind"], "decoder");
}

// --- /infer (the seed app's endpoint) ---

TEST_F(HttpServerTest, InferReturnsPromptPlusCompletion) {
  StartServer();
  const std::string prompt = "héllo wörld 日本語 a+b&c=d";
  std::string encoded = UrlEncode(prompt);
  // Spaces as '+', the form encoding browsers and requests use.
  for (size_t pos; (pos = encoded.find("%20")) != std::string::npos;) encoded.replace(pos, 3, "+");
  Reply r = Get("/infer?prompt=" + encoded + "&max_tokens=3");
  ASSERT_EQ(r.status, 200u) << r.body;
  EXPECT_EQ(r.Json()["result"], prompt + FakeEngine::ExpectedCompletion(prompt, 3));
  EXPECT_EQ(engine_->last_request().temperature, 0.0f);  // greedy
  EXPECT_TRUE(engine_->last_request().echo);             // decoded prompt + continuation
  EXPECT_EQ(engine_->last_request().max_tokens, 3);
  // Default max_tokens.
  r = Get("/infer?prompt=hi");
  ASSERT_EQ(r.status, 200u) << r.body;
  EXPECT_EQ(engine_->last_request().max_tokens, CompletionRequest{}.max_tokens);
}

TEST_F(HttpServerTest, InferMissingPromptIs422LikeFastApi) {
  StartServer();
  Reply r = Get("/infer?max_tokens=3");
  ExpectJsonError(r, 422, "prompt");
  json detail = r.Json()["detail"];
  ASSERT_EQ(detail.size(), 1u);
  EXPECT_EQ(detail[0]["loc"], json({"query", "prompt"}));
  EXPECT_EQ(detail[0]["type"], "value_error.missing");
}

TEST_F(HttpServerTest, InferRejectsBadMaxTokens) {
  StartServer();
  for (const char* bad : {"abc", "0", "-1", "4097", "1.5", "", "99999999999999"}) {
    Reply r = Get(std::string("/infer?prompt=hi&max_tokens=") + bad);
    ExpectJsonError(r, 422, "max_tokens");
    EXPECT_EQ(r.Json()["detail"][0]["loc"], json({"query", "max_tokens"})) << bad;
  }
  ExpectJsonError(Get("/infer?prompt=%ZZ"), 400, "percent-escape");
  EXPECT_EQ(engine_->started(), 0);
}

// --- /v1/completions ---

TEST_F(HttpServerTest, CompletionNonStreamed) {
  StartServer();
  Reply r = Post("/v1/completions", {{"model", "fake/echo-model"},
                                     {"prompt", "one two"},
                                     {"max_tokens", 5},
                                     {"temperature", 0.5},
                                     {"top_p", 0.9},
                                     {"seed", 42},
                                     {"stop", "never"}});
  ASSERT_EQ(r.status, 200u) << r.body;
  json j = r.Json();
  EXPECT_THAT(j["id"].get<std::string>(), ::testing::StartsWith("cmpl-"));
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_TRUE(j["created"].is_number_integer());
  EXPECT_EQ(j["model"], "fake/echo-model");
  ASSERT_EQ(j["choices"].size(), 1u);
  EXPECT_EQ(j["choices"][0]["index"], 0);
  EXPECT_EQ(j["choices"][0]["text"], FakeEngine::ExpectedCompletion("one two", 5));
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["usage"],
            json({{"prompt_tokens", 2}, {"completion_tokens", 5}, {"total_tokens", 7}}));
  CompletionRequest seen = engine_->last_request();
  EXPECT_EQ(seen.prompt, "one two");
  EXPECT_FLOAT_EQ(seen.temperature, 0.5f);
  EXPECT_FLOAT_EQ(seen.top_p, 0.9f);
  EXPECT_EQ(seen.seed, 42u);
  EXPECT_EQ(seen.stop, std::vector<std::string>{"never"});
}

TEST_F(HttpServerTest, CompletionStopAndPromptList) {
  StartServer();
  Reply r =
      Post("/v1/completions", {{"prompt", {"a b c"}}, {"max_tokens", 10}, {"stop", {"c", "zz"}}});
  ASSERT_EQ(r.status, 200u) << r.body;
  EXPECT_EQ(r.Json()["choices"][0]["text"], " a b");
  EXPECT_EQ(r.Json()["choices"][0]["finish_reason"], "stop");
}

TEST_F(HttpServerTest, CompletionStreamed) {
  StartServer();
  Client c(port_);
  Reply r = c.Post("/v1/completions", {{"prompt", "x y z"}, {"max_tokens", 4}, {"stream", true}});
  ASSERT_EQ(r.status, 200u) << r.body;
  EXPECT_EQ(r.Header(bhttp::field::content_type), "text/event-stream");
  EXPECT_EQ(r.Header(bhttp::field::transfer_encoding), "chunked");
  auto events = SseData(r.body);
  ASSERT_EQ(events.size(), 4u + 2u) << r.body;  // a delta per token, the finish, [DONE]
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  std::string id;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    json chunk = json::parse(events[i]);
    EXPECT_EQ(chunk["object"], "text_completion");
    EXPECT_EQ(chunk["model"], "fake/echo-model");
    if (id.empty()) id = chunk["id"];
    EXPECT_EQ(chunk["id"], id);
    json choice = chunk["choices"][0];
    text += choice["text"].get<std::string>();
    if (i + 2 < events.size()) {
      EXPECT_TRUE(choice["finish_reason"].is_null());
      EXPECT_FALSE(choice["text"].get<std::string>().empty());
    } else {
      EXPECT_EQ(choice["finish_reason"], "length");
      EXPECT_EQ(choice["text"], "");
    }
  }
  EXPECT_EQ(text, FakeEngine::ExpectedCompletion("x y z", 4));
  // The connection stays usable after a stream.
  EXPECT_TRUE(r.keep_alive);
  EXPECT_EQ(c.Get("/healthz").status, 200u);
}

TEST_F(HttpServerTest, CompletionStreamWithUsage) {
  StartServer();
  Reply r = Post("/v1/completions", {{"prompt", "x"},
                                     {"max_tokens", 2},
                                     {"stream", true},
                                     {"stream_options", {{"include_usage", true}}}});
  auto events = SseData(r.body);
  ASSERT_EQ(events.size(), 5u) << r.body;
  json usage = json::parse(events[3]);
  EXPECT_EQ(usage["choices"], json::array());
  EXPECT_EQ(usage["usage"]["total_tokens"], 3);
}

TEST_F(HttpServerTest, ClientDisconnectMidStreamStopsGeneration) {
  StartServer();
  engine_->set_token_delay(20ms);
  {
    Client c(port_);
    c.Send(bhttp::verb::post, "/v1/completions",
           json({{"prompt", "tick"}, {"max_tokens", 1000}, {"stream", true}}).dump());
    std::string got = c.ReadRawUntil("data: ", 2);
    EXPECT_THAT(got, HasSubstr("text/event-stream"));
  }  // closes the connection
  ASSERT_TRUE(WaitFor([&] { return engine_->cancelled() == 1; }))
      << "the engine callback never returned false";
  EXPECT_LT(engine_->last_tokens(), 1000);
  EXPECT_TRUE(WaitFor([&] { return engine_->finished() == 1; }));
  EXPECT_EQ(Get("/healthz").status, 200u);
}

TEST_F(HttpServerTest, CompletionValidation) {
  StartServer();
  struct Case {
    json body;
    const char* field;
  };
  std::vector<Case> cases = {
      {json::object(), "prompt"},
      {{{"prompt", 5}}, "prompt"},
      {{{"prompt", {"a", "b"}}}, "prompt"},
      {{{"prompt", {1, 2}}}, "prompt"},
      {{{"prompt", "x"}, {"max_tokens", 0}}, "max_tokens"},
      {{{"prompt", "x"}, {"max_tokens", 5000}}, "max_tokens"},
      {{{"prompt", "x"}, {"max_tokens", "5"}}, "max_tokens"},
      {{{"prompt", "x"}, {"max_tokens", 2.5}}, "max_tokens"},
      {{{"prompt", "x"}, {"temperature", "hot"}}, "temperature"},
      {{{"prompt", "x"}, {"temperature", -1}}, "temperature"},
      {{{"prompt", "x"}, {"top_p", 0}}, "top_p"},
      {{{"prompt", "x"}, {"top_p", 1.5}}, "top_p"},
      {{{"prompt", "x"}, {"seed", -3}}, "seed"},
      {{{"prompt", "x"}, {"seed", "s"}}, "seed"},
      {{{"prompt", "x"}, {"stop", {1}}}, "stop"},
      {{{"prompt", "x"}, {"stop", ""}}, "stop"},
      {{{"prompt", "x"}, {"stream", "yes"}}, "stream"},
      {{{"prompt", "x"}, {"model", 7}}, "model"},
      {{{"prompt", "x"}, {"n", 2}}, "n"},
      {json::array({1}), "JSON object"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.body.dump());
    ExpectJsonError(Post("/v1/completions", c.body), 400, c.field);
  }
  EXPECT_EQ(engine_->started(), 0);
}

TEST_F(HttpServerTest, BadJsonIs400AndTheConnectionSurvives) {
  StartServer();
  Client c(port_);
  Reply r = c.Request(bhttp::verb::post, "/v1/completions", "{not json");
  ExpectJsonError(r, 400, "JSON");
  EXPECT_TRUE(r.keep_alive);
  EXPECT_EQ(c.Get("/healthz").status, 200u);
}

TEST_F(HttpServerTest, UnknownModelIs404AndAliasesWork) {
  StartServer();
  ExpectJsonError(Post("/v1/completions", {{"model", "nope"}, {"prompt", "x"}}), 404,
                  "model 'nope' is not served here");
  ExpectJsonError(Post("/v1/embeddings", {{"model", "nope"}, {"input", "x"}}), 404,
                  "model 'nope' is not served here");
  Reply r = Post("/v1/completions", {{"model", "echo"}, {"prompt", "x"}, {"max_tokens", 1}});
  EXPECT_EQ(r.status, 200u) << r.body;
  EXPECT_EQ(r.Json()["model"], "fake/echo-model");
}

TEST_F(HttpServerTest, EngineErrorsMapToStatuses) {
  StartServer();
  ExpectJsonError(Post("/v1/completions", {{"prompt", "fail:unavailable"}}), 503, "told to fail");
  ExpectJsonError(Post("/v1/completions", {{"prompt", "fail:invalid_argument"}}), 400);
  ExpectJsonError(Post("/v1/completions", {{"prompt", "fail:not_found"}}), 404);
  ExpectJsonError(Post("/v1/completions", {{"prompt", "fail:unsupported"}}), 501);
  ExpectJsonError(Post("/v1/completions", {{"prompt", "fail:internal"}}), 500);
  // A stream that fails before its first token still gets a real status.
  ExpectJsonError(Post("/v1/completions", {{"prompt", "fail:unavailable"}, {"stream", true}}), 503);
  ExpectJsonError(Get("/infer?prompt=fail%3Aunavailable"), 503);
}

// --- /v1/embeddings ---

TEST_F(HttpServerTest, EmbeddingsForStringAndList) {
  StartServer(TestOptions(), "encoder");
  Reply r = Post("/v1/embeddings", {{"input", "hello"}});
  ASSERT_EQ(r.status, 200u) << r.body;
  json j = r.Json();
  EXPECT_EQ(j["object"], "list");
  EXPECT_EQ(j["model"], "fake/echo-model");
  ASSERT_EQ(j["data"].size(), 1u);
  EXPECT_EQ(j["data"][0]["object"], "embedding");
  EXPECT_EQ(j["data"][0]["index"], 0);
  EXPECT_EQ(j["data"][0]["embedding"].get<std::vector<float>>(),
            FakeEngine::ExpectedEmbedding("hello"));
  EXPECT_TRUE(j.contains("usage"));

  r = Post("/v1/embeddings", {{"model", "echo"}, {"input", {"a", "bbb", "cc"}}});
  ASSERT_EQ(r.status, 200u) << r.body;
  j = r.Json();
  ASSERT_EQ(j["data"].size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(j["data"][i]["index"], i);
  EXPECT_EQ(j["data"][1]["embedding"].get<std::vector<float>>(),
            FakeEngine::ExpectedEmbedding("bbb"));

  // base64: little-endian float32, what the OpenAI Python client asks for.
  r = Post("/v1/embeddings", {{"input", "abcd"}, {"encoding_format", "base64"}});
  ASSERT_EQ(r.status, 200u) << r.body;
  // {4.0f, 0.25f, -1.0f} = 00 00 80 40 | 00 00 80 3e | 00 00 80 bf
  EXPECT_EQ(r.Json()["data"][0]["embedding"], "AACAQAAAgD4AAIC/");
}

TEST_F(HttpServerTest, EmbeddingsRejectBadInput) {
  StartServer(TestOptions(), "encoder");
  ExpectJsonError(Post("/v1/embeddings", json::object()), 400, "input");
  ExpectJsonError(Post("/v1/embeddings", {{"input", json::array()}}), 400, "input");
  ExpectJsonError(Post("/v1/embeddings", {{"input", {"a", 1}}}), 400, "input");
  ExpectJsonError(Post("/v1/embeddings", {{"input", 3}}), 400, "input");
  ExpectJsonError(Post("/v1/embeddings", {{"input", "x"}, {"encoding_format", "hex"}}), 400,
                  "encoding_format");
  // An encoder does not complete text.
  ExpectJsonError(Post("/v1/completions", {{"prompt", "x"}}), 400, "does not generate text");
  ExpectJsonError(Get("/infer?prompt=x"), 400, "does not generate text");
}

TEST_F(HttpServerTest, DecoderDoesNotEmbed) {
  StartServer();
  ExpectJsonError(Post("/v1/embeddings", {{"input", "x"}}), 400,
                  "model fake/echo-model does not produce embeddings");
}

// --- HTTP protocol behaviour ---

TEST_F(HttpServerTest, UnknownPathIs404AndWrongMethodIs405) {
  StartServer();
  ExpectJsonError(Get("/nope"), 404, "/nope");
  Reply r = Get("/v1/completions");
  ExpectJsonError(r, 405);
  EXPECT_EQ(r.Header(bhttp::field::allow), "POST");
  r = Client(port_).Request(bhttp::verb::delete_, "/healthz");
  ExpectJsonError(r, 405);
  EXPECT_EQ(r.Header(bhttp::field::allow), "GET");
  EXPECT_TRUE(r.keep_alive);
}

TEST_F(HttpServerTest, MalformedRequestsGet400AndOthersAreUnaffected) {
  StartServer();
  for (std::string garbage :
       {std::string("GARBAGE\r\n\r\n"), std::string("\x00\x01\xff\xfe\r\n\r\n", 8),
        std::string("GET /healthz HTTP/9.9\r\n\r\n"),
        std::string("GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: "
                    "zz\r\n\r\n")}) {
    Client c(port_);
    c.SendRaw(garbage);
    Reply r = c.Read();
    ExpectJsonError(r, 400, "malformed");
    EXPECT_FALSE(r.keep_alive);
    EXPECT_TRUE(c.PeerClosed());
  }
  // A client that sends half a request and leaves does not disturb the server.
  {
    Client c(port_);
    c.SendRaw("POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"pro");
  }
  EXPECT_EQ(Get("/healthz").status, 200u);
  EXPECT_EQ(Post("/v1/completions", {{"prompt", "x"}, {"max_tokens", 1}}).status, 200u);
}

TEST_F(HttpServerTest, OversizedBodyIs413) {
  HttpServerOptions options = TestOptions();
  options.max_body_bytes = 64 << 10;
  StartServer(options);
  {
    // Declared too large: refused from the header alone.
    Client c(port_);
    c.SendRaw("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n");
    Reply r = c.Read();
    ExpectJsonError(r, 413, "65536");
    EXPECT_FALSE(r.keep_alive);
  }
  {
    // Actually sent: the 413 still reaches the client (the server drains
    // what it does not read before closing).
    Client c(port_);
    std::string body = json({{"prompt", std::string(200 << 10, 'a')}}).dump();
    c.Send(bhttp::verb::post, "/v1/completions", body);
    ExpectJsonError(c.Read(), 413);
  }
  {
    // Chunked bodies are bounded too.
    Client c(port_);
    std::string chunk(40 << 10, 'a');
    std::string raw =
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    for (int i = 0; i < 3; ++i) raw += fmt::format("{:x}\r\n{}\r\n", chunk.size(), chunk);
    raw += "0\r\n\r\n";
    c.SendRaw(raw);
    ExpectJsonError(c.Read(), 413);
  }
  {
    Client c(port_);
    c.SendRaw("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + std::string(20 << 10, 'h') +
              "\r\n\r\n");
    ExpectJsonError(c.Read(), 431);
  }
  EXPECT_EQ(Get("/healthz").status, 200u);
}

TEST_F(HttpServerTest, KeepAliveAndPipelining) {
  StartServer();
  Client c(port_);
  Reply a = c.Get("/healthz");
  EXPECT_EQ(a.status, 200u);
  EXPECT_TRUE(a.keep_alive);
  Reply b = c.Post("/v1/completions", {{"prompt", "p"}, {"max_tokens", 2}});
  EXPECT_EQ(b.status, 200u);
  // Three requests in one write: answered in order.
  c.SendRaw(
      "GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
      "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 31\r\n\r\n"
      "{\"prompt\":\"q r\",\"max_tokens\":2}"
      "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_EQ(c.Read().Json()["object"], "list");
  EXPECT_EQ(c.Read().Json()["choices"][0]["text"], " q r");
  EXPECT_EQ(c.Read().Json()["status"], "ok");
  // HTTP/1.0 without keep-alive: one answer, then close.
  Client old(port_);
  old.SendRaw("GET /healthz HTTP/1.0\r\n\r\n");
  Reply r = old.Read();
  EXPECT_EQ(r.status, 200u);
  EXPECT_TRUE(old.PeerClosed());
}

// The next request on a connection may arrive while the previous one's job
// is still returning from its handler; that job must not take the new
// request's state for its own (it once sent a spurious 500 "the request
// handler sent no answer" here).
TEST_F(HttpServerTest, BackToBackRequestsOnOneConnectionAllSucceed) {
  StartServer();
  Client c(port_);
  for (int i = 0; i < 200; ++i) {
    Reply r = c.Post("/v1/completions", {{"prompt", "a b"}, {"max_tokens", 1}});
    ASSERT_EQ(r.status, 200u) << "request " << i << ": " << r.body;
  }
}

TEST_F(HttpServerTest, ExpectContinue) {
  StartServer();
  Client c(port_);
  std::string body = R"({"prompt":"e","max_tokens":1})";
  c.SendRaw(fmt::format(
      "POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: "
      "{}\r\n\r\n",
      body.size()));
  EXPECT_THAT(c.ReadRawUntil("\r\n\r\n", 1), HasSubstr("100 Continue"));
  c.SendRaw(body);
  EXPECT_EQ(c.Read().status, 200u);
}

TEST_F(HttpServerTest, HealthzAnswersWhileAGenerationRuns) {
  StartServer();
  engine_->set_token_delay(100ms);
  auto slow = std::async(std::launch::async, [&] {
    return Post("/v1/completions", {{"prompt", "slow"}, {"max_tokens", 20}});
  });
  ASSERT_TRUE(WaitFor([&] { return engine_->started() == 1; }));
  for (int i = 0; i < 5; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    EXPECT_EQ(Get("/healthz").status, 200u);
    EXPECT_EQ(Get("/v1/models").status, 200u);
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 500ms);
  }
  EXPECT_EQ(engine_->finished(), 0);  // still generating
  EXPECT_EQ(slow.get().status, 200u);
}

TEST_F(HttpServerTest, BusyWorkerAnswers503) {
  HttpServerOptions options = TestOptions();
  options.compute_threads = 1;
  options.max_pending_requests = 1;
  StartServer(options);
  engine_->set_token_delay(50ms);
  auto slow = std::async(std::launch::async, [&] {
    return Post("/v1/completions", {{"prompt", "slow"}, {"max_tokens", 20}});
  });
  ASSERT_TRUE(WaitFor([&] { return engine_->started() == 1; }));
  Reply busy = Post("/v1/completions", {{"prompt", "x"}});
  ExpectJsonError(busy, 503, "busy");
  EXPECT_EQ(busy.Header(bhttp::field::retry_after), "1");
  EXPECT_EQ(Get("/healthz").status, 200u);
  EXPECT_EQ(slow.get().status, 200u);
}

TEST_F(HttpServerTest, ReusePortLetsTwoServersShareAPort) {
  HttpServerOptions options = TestOptions();
  options.reuse_port = true;
  StartServer(options);
  options.listen = fmt::format("127.0.0.1:{}", port_);
  auto second = HttpServer::Create(options, std::make_shared<FakeEngine>());
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  EXPECT_EQ((*second)->port(), port_);
  auto run = std::async(std::launch::async, [&] { (*second)->Run(); });
  for (int i = 0; i < 8; ++i) EXPECT_EQ(Get("/healthz").status, 200u);
  (*second)->Stop();
  EXPECT_EQ(run.wait_for(10s), std::future_status::ready);

  options.reuse_port = false;
  auto third = HttpServer::Create(options, std::make_shared<FakeEngine>());
  ASSERT_FALSE(third.ok());
  EXPECT_EQ(third.status().code(), ErrorCode::kAlreadyExists);
}

TEST_F(HttpServerTest, BadListenAddressFailsCreate) {
  HttpServerOptions options = TestOptions();
  options.listen = "127.0.0.1";
  auto server = HttpServer::Create(options, std::make_shared<FakeEngine>());
  ASSERT_FALSE(server.ok());
  EXPECT_EQ(server.status().code(), ErrorCode::kInvalidArgument);
}

// --- /metrics ---

/// One sample of a text exposition: its labels and value.
struct Sample {
  std::map<std::string, std::string> labels;  ///< name -> unescaped value
  double value = 0;                           ///< the number
};

/// The samples of a Prometheus text exposition by metric name (comments skipped).
std::multimap<std::string, Sample> ParseExposition(const std::string& text) {
  std::multimap<std::string, Sample> out;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    if (line.empty() || line[0] == '#') continue;
    size_t name_end = line.find_first_of("{ ");
    std::string name = line.substr(0, name_end);
    Sample sample;
    size_t pos = name_end;
    if (line[pos] == '{') {
      ++pos;
      while (line[pos] != '}') {
        size_t eq = line.find('=', pos);
        std::string key = line.substr(pos, eq - pos);
        std::string value;
        size_t i = eq + 2;  // past ="
        for (; line[i] != '"'; ++i) {
          if (line[i] == '\\') ++i;
          value += line[i];
        }
        sample.labels[key] = value;
        pos = i + 1;
        if (line[pos] == ',') ++pos;
      }
      ++pos;
    }
    sample.value = std::stod(line.substr(pos + 1));
    out.emplace(name, std::move(sample));
  }
  return out;
}

/// The value of `name` with exactly `labels`; nullopt when there is no such sample.
std::optional<double> Value(const std::multimap<std::string, Sample>& samples,
                            const std::string& name,
                            const std::map<std::string, std::string>& labels = {}) {
  auto [begin, end] = samples.equal_range(name);
  for (auto it = begin; it != end; ++it) {
    if (it->second.labels == labels) return it->second.value;
  }
  return std::nullopt;
}

std::multimap<std::string, Sample> Scrape(Client& c) {
  Reply r = c.Get("/metrics");
  EXPECT_EQ(r.status, 200u) << r.body;
  EXPECT_EQ(r.Header(bhttp::field::content_type), "text/plain; version=0.0.4; charset=utf-8");
  return ParseExposition(r.body);
}

TEST(WorkerMetricsTest, EndpointLabelsAreTheRoutesOrOther) {
  for (const RouteEntry& route : ApiRoutes())
    EXPECT_EQ(WorkerMetrics::EndpointLabel(route.path), route.path);
  EXPECT_EQ(WorkerMetrics::EndpointLabel("/metrics"), "/metrics");
  for (const char* path : {"/", "/v1/completions/", "/v1", "/favicon.ico", "/healthz/x", "-"})
    EXPECT_EQ(WorkerMetrics::EndpointLabel(path), "other") << path;
}

TEST_F(HttpServerTest, MetricsCountRequestsAndTokens) {
  StartServer();
  engine_->set_token_delay(1ms);  // every completion takes measurable engine time
  // One connection: each exchange is counted before the next request is read.
  Client c(port_);
  for (int i = 0; i < 3; ++i) {
    Reply r = c.Post("/v1/completions", {{"prompt", "a b c"}, {"max_tokens", 4}});
    ASSERT_EQ(r.status, 200u) << r.body;
  }
  Reply streamed =
      c.Post("/v1/completions", {{"prompt", "x y"}, {"max_tokens", 5}, {"stream", true}});
  ASSERT_EQ(streamed.status, 200u);
  ASSERT_EQ(c.Get("/infer?prompt=hello&max_tokens=2").status, 200u);
  ASSERT_EQ(c.Post("/v1/completions", {{"prompt", "fail:unavailable"}}).status, 503u);
  ASSERT_EQ(c.Post("/v1/completions", {{"prompt", "x"}, {"max_tokens", 0}}).status, 400u);
  ASSERT_EQ(c.Get("/no/such/path").status, 404u);
  ASSERT_EQ(c.Get("/another%20unknown?x=1").status, 404u);
  ASSERT_EQ(c.Get("/healthz").status, 200u);
  ASSERT_EQ(c.Request(bhttp::verb::post, "/healthz").status, 405u);

  auto m = Scrape(c);
  const std::string req = "wbroker_worker_requests_total";
  EXPECT_EQ(Value(m, req, {{"endpoint", "/v1/completions"}, {"code", "200"}}), 4);
  EXPECT_EQ(Value(m, req, {{"endpoint", "/v1/completions"}, {"code", "503"}}), 1);
  EXPECT_EQ(Value(m, req, {{"endpoint", "/v1/completions"}, {"code", "400"}}), 1);
  EXPECT_EQ(Value(m, req, {{"endpoint", "/infer"}, {"code", "200"}}), 1);
  EXPECT_EQ(Value(m, req, {{"endpoint", "other"}, {"code", "404"}}), 2);
  EXPECT_EQ(Value(m, req, {{"endpoint", "/healthz"}, {"code", "200"}}), 1);
  EXPECT_EQ(Value(m, req, {{"endpoint", "/healthz"}, {"code", "405"}}), 1);
  // The scrape being answered is not counted yet, and nothing else was sent.
  EXPECT_FALSE(Value(m, req, {{"endpoint", "/metrics"}, {"code", "200"}}));
  double total = 0;
  auto [begin, end] = m.equal_range(req);
  for (auto it = begin; it != end; ++it) total += it->second.value;
  EXPECT_EQ(total, 11);

  const std::string dur = "wbroker_worker_request_duration_seconds";
  EXPECT_EQ(Value(m, dur + "_count", {{"endpoint", "/v1/completions"}}), 6);
  EXPECT_EQ(Value(m, dur + "_count", {{"endpoint", "/infer"}}), 1);
  EXPECT_EQ(Value(m, dur + "_count", {{"endpoint", "other"}}), 2);
  EXPECT_EQ(Value(m, dur + "_count", {{"endpoint", "/healthz"}}), 2);
  EXPECT_EQ(Value(m, dur + "_count", {{"endpoint", "/v1/embeddings"}}), 0);
  EXPECT_GT(*Value(m, dur + "_sum", {{"endpoint", "/v1/completions"}}), 0);
  EXPECT_EQ(Value(m, dur + "_bucket", {{"endpoint", "/infer"}, {"le", "+Inf"}}), 1);
  EXPECT_EQ(Value(m, "wbroker_worker_requests_in_flight"), 0);

  // Prompts: "a b c" x3, "x y", "hello" (the fake's tokens are words).
  EXPECT_EQ(Value(m, "wbroker_worker_prompt_tokens_total"), 3 * 3 + 2 + 1);
  EXPECT_EQ(Value(m, "wbroker_worker_generated_tokens_total"), 3 * 4 + 5 + 2);
  // One observation per successful completion (/infer included).
  EXPECT_EQ(Value(m, "wbroker_worker_generation_tokens_per_second_count"), 5);
  EXPECT_GT(*Value(m, "wbroker_worker_generation_tokens_per_second_sum"), 0);
  EXPECT_EQ(Value(m, "wbroker_worker_time_to_first_token_seconds_count"), 5);

  EXPECT_EQ(Value(m, "wbroker_worker_build_info",
                  {{"version", WBROKER_VERSION}, {"commit", WBROKER_GIT_DESCRIBE}}),
            1);
  EXPECT_EQ(Value(m, "wbroker_worker_model_info",
                  {{"model", "fake/echo-model"},
                   {"revision", "0123456789abcdef"},
                   {"backend", "host"},
                   {"device", "cpu"},
                   {"weights", "attached"},
                   {"kind", "decoder"},
                   {"dtype", "float32"}}),
            1);
  double started = *Value(m, "wbroker_worker_start_time_seconds");
  EXPECT_GT(started, static_cast<double>(std::time(nullptr)) - 3600);
  EXPECT_LE(started, static_cast<double>(std::time(nullptr)) + 1);

  // The next scrape sees the previous one.
  auto again = Scrape(c);
  EXPECT_EQ(Value(again, req, {{"endpoint", "/metrics"}, {"code", "200"}}), 1);
  EXPECT_EQ(Value(again, "wbroker_worker_generated_tokens_total"), 3 * 4 + 5 + 2);
}

TEST_F(HttpServerTest, MetricsAnswerBeforeTheModelIsReady) {
  StartServer();
  engine_->set_ready(false);
  Client c(port_);
  ExpectJsonError(c.Get("/readyz"), 503, "not ready");
  auto m = Scrape(c);
  EXPECT_EQ(Value(m, "wbroker_worker_requests_total", {{"endpoint", "/readyz"}, {"code", "503"}}),
            1);
  EXPECT_EQ(Value(m, "wbroker_worker_generated_tokens_total"), 0);
}

TEST_F(HttpServerTest, MetricsShowRequestsInFlight) {
  StartServer();
  engine_->set_token_delay(50ms);
  Client slow(port_);
  slow.Send(bhttp::verb::post, "/v1/completions",
            json({{"prompt", "tick"}, {"max_tokens", 40}, {"stream", true}}).dump());
  slow.ReadRawUntil("data: ", 1);  // the stream is under way
  Client scraper(port_);
  auto during = Scrape(scraper);
  EXPECT_EQ(Value(during, "wbroker_worker_requests_in_flight"), 1);
  EXPECT_EQ(Value(during, "wbroker_worker_requests_total",
                  {{"endpoint", "/v1/completions"}, {"code", "200"}}),
            std::nullopt);
  slow.ReadRawUntil("\r\n0\r\n\r\n", 1);  // the rest of the stream, to its last chunk
  auto after = Scrape(slow);
  EXPECT_EQ(Value(after, "wbroker_worker_requests_in_flight"), 0);
  EXPECT_EQ(Value(after, "wbroker_worker_requests_total",
                  {{"endpoint", "/v1/completions"}, {"code", "200"}}),
            1);
  EXPECT_EQ(Value(after, "wbroker_worker_generated_tokens_total"), 40);
}

TEST_F(HttpServerTest, MetricsCountAClientThatLeftMidStream) {
  StartServer();
  engine_->set_token_delay(20ms);
  {
    Client c(port_);
    c.Send(bhttp::verb::post, "/v1/completions",
           json({{"prompt", "tick"}, {"max_tokens", 1000}, {"stream", true}}).dump());
    c.ReadRawUntil("data: ", 2);
  }  // closes the connection
  ASSERT_TRUE(WaitFor([&] { return engine_->finished() == 1; }));
  Client c(port_);
  // The close reaches the metrics on the connection's strand: wait for it.
  std::multimap<std::string, Sample> m;
  ASSERT_TRUE(WaitFor([&] {
    m = Scrape(c);
    return Value(m, "wbroker_worker_requests_in_flight") == 0;
  }));
  EXPECT_EQ(
      Value(m, "wbroker_worker_requests_total", {{"endpoint", "/v1/completions"}, {"code", "200"}}),
      1);
  // The fake engine returns what it made before the callback said stop.
  EXPECT_EQ(Value(m, "wbroker_worker_generated_tokens_total"), engine_->last_tokens());
}

// --- graceful stop ---

TEST_F(HttpServerTest, StopFinishesTheRequestInFlight) {
  StartServer();
  engine_->set_token_delay(100ms);
  Client idle(port_);
  EXPECT_EQ(idle.Get("/healthz").status, 200u);  // an idle keep-alive connection
  auto slow = std::async(std::launch::async, [&] {
    return Post("/v1/completions", {{"prompt", "drain"}, {"max_tokens", 8}});
  });
  ASSERT_TRUE(WaitFor([&] { return engine_->started() == 1; }));
  server_->Stop();
  EXPECT_TRUE(idle.PeerClosed());  // closed at once
  Reply r = slow.get();
  EXPECT_EQ(r.status, 200u) << r.body;
  EXPECT_EQ(r.Json()["choices"][0]["text"], FakeEngine::ExpectedCompletion("drain", 8));
  EXPECT_FALSE(r.keep_alive);  // Connection: close while stopping
  EXPECT_EQ(engine_->cancelled(), 0);
  EXPECT_EQ(run_done_.wait_for(5s), std::future_status::ready) << "Run() did not return";
  // Nobody listens any more.
  net::io_context io;
  tcp::socket s(io);
  boost::system::error_code ec;
  s.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), port_), ec);
  EXPECT_TRUE(ec);
}

TEST_F(HttpServerTest, StopGivesUpOnStreamsAfterTheDrainTimeout) {
  HttpServerOptions options = TestOptions();
  options.drain_timeout = 300ms;
  StartServer(options);
  engine_->set_token_delay(20ms);
  Client c(port_);
  c.Send(bhttp::verb::post, "/v1/completions",
         json({{"prompt", "long"}, {"max_tokens", 2000}, {"stream", true}}).dump());
  c.ReadRawUntil("data: ", 1);
  auto t0 = std::chrono::steady_clock::now();
  server_->Stop();
  ASSERT_EQ(run_done_.wait_for(5s), std::future_status::ready) << "Run() did not return";
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 3s);
  EXPECT_EQ(engine_->cancelled(), 1);
}

TEST_F(HttpServerTest, StopBeforeRun) {
  auto server = HttpServer::Create(TestOptions(), std::make_shared<FakeEngine>());
  ASSERT_TRUE(server.ok());
  (*server)->Stop();
  (*server)->Run();  // returns at once
}

}  // namespace
}  // namespace wbroker::http
