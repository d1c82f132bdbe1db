// wbroker tests: a client connected to a real wbrokerd, for the end-to-end
// suites. Header-only, so that only tests that link wbroker_client use it.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <memory>

#include "wbroker/client/client.h"

namespace wbroker::testing {

/// A client connected to the broker at `socket` with a per-request `timeout`
/// (0: none); nullptr, with a test failure recorded, when it cannot connect.
inline std::unique_ptr<client::Client> ConnectClient(
    const std::filesystem::path& socket,
    std::chrono::milliseconds timeout = std::chrono::milliseconds(0)) {
  client::ClientOptions o;
  o.socket_path = socket.string();
  o.timeout = timeout;
  auto c = client::Client::Connect(o);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return c.ok() ? std::move(c).value() : nullptr;
}

}  // namespace wbroker::testing
