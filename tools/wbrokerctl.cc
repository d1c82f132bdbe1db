// wbrokerctl: operate a running wbrokerd (status, load, unload) and check a
// cached snapshot offline (verify).
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <unistd.h>

#include <cstdio>
#include <ctime>
#include <iostream>

#include "verify.h"
#include "wbroker/client/client.h"
#include "wbroker/common/fd_socket.h"
#include "wbroker/common/hf_cache.h"
#include "wbroker/common/size_units.h"

namespace {

using nlohmann::json;
using wbroker::Status;

int Fail(const std::string& message) {
  std::fprintf(stderr, "wbrokerctl: %s\n", message.c_str());
  return 1;
}

int Fail(const Status& status) { return Fail(status.message()); }

std::string Short(const std::string& commit) { return commit.substr(0, 12); }

void PrintStatus(const json& st) {
  const auto& b = st["broker"];
  fmt::print("wbrokerd {} pid {}  up {:.0f}s  socket {}\ncache {}\n\n", b.value("version", "?"),
             b.value("pid", 0), b.value("uptime_seconds", 0.0), b.value("socket", ""),
             b.value("cache_dir", ""));
  fmt::print("{:<10} {:<10} {:>12} {:>12} {:>12}\n", "DEVICE", "BACKEND", "TOTAL", "FREE", "MODELS");
  for (const auto& d : st["devices"]) {
    fmt::print("{:<10} {:<10} {:>12} {:>12} {:>12}\n", d.value("device", ""),
               d.value("backend", ""), wbroker::FormatBytes(d.value("total_bytes", 0ull)),
               wbroker::FormatBytes(d.value("free_bytes", 0ull)),
               wbroker::FormatBytes(d.value("model_bytes", 0ull)));
  }
  fmt::print("\n{:<40} {:<13} {:<6} {:>11} {:>7} {:>6} {:<9} {:>8}\n", "MODEL", "REVISION",
             "DEVICE", "SIZE", "TENSORS", "LEASES", "STATE", "LOAD");
  for (const auto& m : st["models"]) {
    std::string state = m.value("state", "");
    if (state == "loading" && m.contains("progress")) {
      auto done = m["progress"].value("done_bytes", 0ull), total = m["progress"].value("total_bytes", 0ull);
      if (total) state += fmt::format(" {}%", done * 100 / total);
    }
    fmt::print("{:<40} {:<13} {:<6} {:>11} {:>7} {:>6} {:<9} {:>7.2f}s\n", m.value("model", ""),
               Short(m.value("revision", "")), m.value("device", ""),
               wbroker::FormatBytes(m.value("bytes", 0ull)), m.value("tensors", 0),
               m.value("leases", 0), state, m.value("load_seconds", 0.0));
    if (m.contains("error")) fmt::print("    error: {}\n", m["error"].get<std::string>());
  }
  fmt::print("\n{:<8} {:<8} {:<8} {:<24} {:>6}\n", "CLIENT", "PID", "UID", "NAME", "LEASES");
  for (const auto& c : st["clients"]) {
    fmt::print("{:<8} {:<8} {:<8} {:<24} {:>6}\n", c.value("id", 0), c.value("pid", 0),
               c.value("uid", 0), c.value("client", ""), c.value("leases", 0));
  }
}

}  // namespace

int main(int argc, char** argv) try {
  CLI::App app{"wbrokerctl: operate wbrokerd and check cached models"};
  app.require_subcommand(1);
  std::string socket_path;
  bool as_json = false;
  app.add_option("--socket", socket_path,
                 "broker socket (default: $WBROKER_SOCKET, else /run/wbroker/wbroker.sock)");
  app.add_flag("--json", as_json, "machine-readable output");
  // Let `status --json` work as well as `--json status`: subcommands pass
  // options they do not know (--json, --socket) up to the app.
  app.fallthrough();

  auto* status = app.add_subcommand("status", "models, devices and clients of the broker");
  std::string spec;
  auto* load = app.add_subcommand("load", "load MODEL[@REV] and wait until it is ready");
  load->add_option("model", spec, "MODEL[@REV]")->required();
  std::string dtype;
  load->add_option("--dtype", dtype, "convert float weights at load: bf16 | fp16 | fp32 (GPU)");
  std::string device;
  load->add_option("--device", device, "device to load on, as the broker names it (default: its first)");
  bool force = false;
  auto* unload = app.add_subcommand("unload", "unload MODEL[@REV] (all loaded revisions if no REV)");
  unload->add_option("model", spec, "MODEL[@REV]")->required();
  unload->add_flag("--force", force, "drain a leased model: no new attaches, freed at last release");
  unload->add_option("--device", device, "unload only on this device (default: every device)");
  std::string cache_dir;
  auto* verify = app.add_subcommand("verify", "check a cached snapshot offline (no broker needed)");
  verify->add_option("model", spec, "MODEL[@REV]")->required();
  verify->add_option("--cache-dir", cache_dir, "HF hub cache (default: the HF environment rules)");
  CLI11_PARSE(app, argc, argv);

  if (verify->parsed()) {
    auto ms = wbroker::ParseModelSpec(spec);
    if (!ms.ok()) return Fail(ms.status());
    auto report = wbroker::tools::VerifySnapshot(
        cache_dir.empty() ? wbroker::HubCacheDir() : std::filesystem::path(cache_dir), ms->model,
        ms->revision);
    if (!report.ok()) return Fail(report.status());
    if (as_json) {
      json files = json::array();
      for (const auto& f : report->files) files.push_back({{"file", f.name}, {"ok", f.ok}, {"detail", f.detail}});
      json out = {{"model", report->model.model}, {"revision", report->model.commit},
                  {"snapshot", report->model.snapshot_dir.string()}, {"ok", report->ok()},
                  {"files", files}, {"weights", report->weights.ok() ? "ok" : report->weights.message()}};
      std::cout << out.dump(2) << "\n";
    } else {
      fmt::print("{} @ {}\n{}\n", report->model.model, report->model.commit,
                 report->model.snapshot_dir.string());
      for (const auto& f : report->files)
        fmt::print("  {:<4} {}  ({})\n", f.ok ? "ok" : "BAD", f.name, f.detail);
      fmt::print("  {:<4} weights  ({})\n", report->weights.ok() ? "ok" : "BAD",
                 report->weights.ok() ? "index and shards consistent" : report->weights.message());
    }
    if (!report->ok()) {
      for (const auto& f : report->files)
        if (!f.ok) return Fail(fmt::format("verify failed: {}: {}", f.name, f.detail));
      return Fail("verify failed: " + report->weights.message());
    }
    return 0;
  }

  wbroker::client::ClientOptions opts;
  opts.socket_path = socket_path;
  opts.client_name = "wbrokerctl";
  auto client = wbroker::client::Client::Connect(opts);
  if (!client.ok()) return Fail(client.status());

  if (status->parsed()) {
    auto st = (*client)->Call({{"op", "status"}});
    if (!st.ok()) return Fail(st.status());
    st->erase("id");
    st->erase("ok");
    if (as_json) std::cout << st->dump(2) << "\n";
    else PrintStatus(*st);
    return 0;
  }
  auto ms = wbroker::ParseModelSpec(spec);
  if (!ms.ok()) return Fail(ms.status());
  if (load->parsed()) {
    json req = {{"op", "load"}, {"model", ms->model}, {"revision", ms->revision}};
    if (!dtype.empty()) req["dtype"] = dtype;
    if (!device.empty()) req["device"] = device;
    auto r = (*client)->Call(req);
    if (!r.ok()) return Fail(fmt::format("load {} failed: {}", spec, r.status().message()));
    if (as_json) {
      r->erase("id");
      std::cout << r->dump(2) << "\n";
    } else {
      fmt::print("loaded {} @ {}: {} tensors, {} in {:.2f}s{}\n", r->value("model", ""),
                 r->value("revision", ""), r->value("tensors", 0),
                 wbroker::FormatBytes(r->value("bytes", 0ull)), r->value("load_seconds", 0.0),
                 device.empty() ? "" : " on " + r->value("device", device));
    }
    return 0;
  }
  if (unload->parsed()) {
    json req = {{"op", "unload"}, {"model", ms->model}, {"revision", ms->revision}, {"force", force}};
    if (!device.empty()) req["device"] = device;
    auto r = (*client)->Call(req);
    if (!r.ok()) return Fail(fmt::format("unload {} failed: {}", spec, r.status().message()));
    if (as_json) {
      r->erase("id");
      std::cout << r->dump(2) << "\n";
    } else {
      for (const auto& k : (*r)["unloaded"]) fmt::print("unloaded {}\n", k.get<std::string>());
      for (const auto& k : (*r)["draining"])
        fmt::print("draining {} (freed at its last release)\n", k.get<std::string>());
    }
    return 0;
  }
  return Fail("no command given");
} catch (const std::exception& e) {
  return Fail(std::string("fatal: ") + e.what());
}
