// wbrokerctl: operate a running wbrokerd (status, load, unload, metrics) and
// check a cached snapshot offline (verify).
#include <signal.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <fmt/chrono.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>
#include <cstdio>
#include <ctime>
#include <iostream>
#include <iterator>

#include "progress_view.h"
#include "verify.h"
#include "wbroker/client/client.h"
#include "wbroker/common/fd_socket.h"
#include "wbroker/common/frame.h"
#include "wbroker/common/hf_cache.h"
#include "wbroker/common/size_units.h"

namespace {

using nlohmann::json;
using wbroker::Status;

int Fail(const std::string& message) {
  std::fprintf(stderr, "wbrokerctl: %s\n", message.c_str());
  return 1;
}

int Fail(const Status& status) {
  return Fail(status.message());
}

std::string Short(const std::string& commit) {
  return commit.substr(0, 12);
}

std::string FormatStatus(const json& st) {
  std::string out;
  auto to = std::back_inserter(out);
  const auto& b = st["broker"];
  fmt::format_to(to, "wbrokerd {} pid {}  up {:.0f}s  socket {}\ncache {}\n\n",
                 b.value("version", "?"), b.value("pid", 0), b.value("uptime_seconds", 0.0),
                 b.value("socket", ""), b.value("cache_dir", ""));
  fmt::format_to(to, "{:<10} {:<10} {:>12} {:>12} {:>12}\n", "DEVICE", "BACKEND", "TOTAL", "FREE",
                 "MODELS");
  for (const auto& d : st["devices"]) {
    fmt::format_to(to, "{:<10} {:<10} {:>12} {:>12} {:>12}\n", d.value("device", ""),
                   d.value("backend", ""), wbroker::FormatBytes(d.value("total_bytes", 0ull)),
                   wbroker::FormatBytes(d.value("free_bytes", 0ull)),
                   wbroker::FormatBytes(d.value("model_bytes", 0ull)));
  }
  for (const auto& d : st["devices"]) {
    const std::string fill = d.value("fill", "");
    if (!fill.empty()) fmt::format_to(to, "{:<10} fill: {}\n", d.value("device", ""), fill);
  }
  fmt::format_to(to, "\n{:<40} {:<13} {:<6} {:>11} {:>7} {:>6} {:<9} {:>8}\n", "MODEL", "REVISION",
                 "DEVICE", "SIZE", "TENSORS", "LEASES", "STATE", "LOAD");
  for (const auto& m : st["models"]) {
    std::string state = m.value("state", "");
    if (state == "loading" && m.contains("progress")) {
      auto done = m["progress"].value("bytes_done", 0ull),
           total = m["progress"].value("bytes_total", 0ull);
      if (total) state += fmt::format(" {}%", done * 100 / total);
    }
    fmt::format_to(to, "{:<40} {:<13} {:<6} {:>11} {:>7} {:>6} {:<9} {:>7.2f}s\n",
                   m.value("model", ""), Short(m.value("revision", "")), m.value("device", ""),
                   wbroker::FormatBytes(m.value("bytes", 0ull)), m.value("tensors", 0),
                   m.value("leases", 0), state, m.value("load_seconds", 0.0));
    if (m.contains("error")) fmt::format_to(to, "    error: {}\n", m["error"].get<std::string>());
    // Where the model came from and where it is going, when that is news.
    std::vector<std::string> notes;
    if (m.value("pinned", false)) notes.push_back("preloaded (pinned)");
    if (m.value("adopted", false)) notes.push_back("adopted from the previous broker");
    if (!m.value("superseded_by", "").empty())
      notes.push_back("replaced by " + m.value("superseded_by", "") +
                      ", freed at its last release");
    if (!notes.empty()) fmt::format_to(to, "    {}\n", fmt::join(notes, "; "));
  }
  fmt::format_to(to, "\n{:<8} {:<8} {:<8} {:<24} {:>6}\n", "CLIENT", "PID", "UID", "NAME",
                 "LEASES");
  for (const auto& c : st["clients"]) {
    fmt::format_to(to, "{:<8} {:<8} {:<8} {:<24} {:>6}\n", c.value("id", 0), c.value("pid", 0),
                   c.value("uid", 0), c.value("client", ""), c.value("leases", 0));
  }
  return out;
}

/// The Status a broker reply stands for (its "ok", else its "error").
Status ReplyStatus(const json& body) {
  if (body.value("ok", false)) return Status::Ok();
  auto err = body.find("error");
  if (err == body.end() || !err->is_object())
    return Status(wbroker::ErrorCode::kProtocol, "broker reply has neither ok nor error");
  return Status(wbroker::ErrorCodeFromName(err->value("code", "internal"))
                    .value_or(wbroker::ErrorCode::kInternal),
                err->value("message", "(no message)"));
}

/// Connects and says hello like wbroker::client::Client, but keeps the socket
/// itself: a load with progress answers one request with several frames.
wbroker::Result<wbroker::UniqueFd> ConnectRaw(const std::string& socket_path) {
  const std::string path = socket_path.empty() ? wbroker::DefaultSocketPath() : socket_path;
  WB_ASSIGN_OR_RETURN(wbroker::UniqueFd fd, wbroker::ConnectUnixSocket(path));
  WB_RETURN_IF_ERROR(wbroker::WriteFrameBlocking(fd.get(), {{"op", "hello"},
                                                            {"id", 1},
                                                            {"protocol", wbroker::kProtocolVersion},
                                                            {"client", "wbrokerctl"}}));
  WB_ASSIGN_OR_RETURN(wbroker::Frame hello,
                      wbroker::ReadFrameBlocking(fd.get(), wbroker::kDefaultMaxFrameBytes, 0));
  WB_RETURN_IF_ERROR(ReplyStatus(hello.body));
  return fd;
}

/// Columns of the terminal on `fd` (80 when it does not say).
size_t TerminalWidth(int fd) {
  winsize ws{};
  // TIOCGWINSZ: the window size the terminal emulator reports, so the bar fits.
  if (::ioctl(fd, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
  return 80;
}

/// `wbrokerctl load`: asks for progress events when someone watches (a
/// terminal on stderr: a live bar; --json: one event per line on stdout),
/// then prints the outcome. Exit status 1 with "load SPEC failed: ..." on failure.
/// How `load` treats the other loaded revisions of the model.
struct LoadMode {
  bool replace = false;         ///< --replace: hot-swap them for this one
  bool allow_downtime = false;  ///< --allow-downtime: free them first when both do not fit
};

int RunLoad(const std::string& socket_path, const std::string& spec, const std::string& dtype,
            const std::string& device, bool as_json, const LoadMode& mode) {
  const bool bar = !as_json && ::isatty(STDERR_FILENO) == 1;
  auto fd = ConnectRaw(socket_path);
  if (!fd.ok()) return Fail(fd.status());
  auto ms = wbroker::ParseModelSpec(spec);
  if (!ms.ok()) return Fail(ms.status());
  const json id = 2;
  json req = {{"op", "load"}, {"id", id}, {"model", ms->model}, {"revision", ms->revision}};
  if (!dtype.empty()) req["dtype"] = dtype;
  if (!device.empty()) req["device"] = device;
  if (as_json || bar) req["progress"] = true;
  if (mode.replace) req["replace"] = true;
  if (mode.allow_downtime) req["allow_downtime"] = true;
  auto failed = [&](const std::string& message) {
    if (bar) std::fputs("\r\033[K", stderr);
    return Fail(fmt::format("load {} failed: {}", spec, message));
  };
  auto emit = [](json body) {
    body.erase("id");
    body.erase("ok");
    std::cout << body.dump(-1, ' ', false, json::error_handler_t::replace) << std::endl;
  };
  if (Status st = wbroker::WriteFrameBlocking(fd->get(), req); !st.ok())
    return failed(st.message());
  bool final_seen = false;
  for (;;) {
    auto frame = wbroker::ReadFrameBlocking(fd->get(), wbroker::kDefaultMaxFrameBytes, 0);
    if (!frame.ok())
      return failed(frame.status().code() == wbroker::ErrorCode::kUnavailable
                        ? "lost connection to wbrokerd: " + frame.status().message()
                        : frame.status().message());
    json& body = frame->body;
    // Frames without an id (a notice before the broker closes) end the request too.
    if (auto rid = body.find("id"); rid != body.end() && *rid != id) continue;
    if (auto ev = body.find("event"); ev != body.end() && !body.contains("ok")) {
      const std::string kind = ev->is_string() ? ev->get<std::string>() : "";
      final_seen |= kind == "ready" || kind == "failed";
      if (as_json) {
        emit(body);
      } else if (bar && kind == "progress") {
        std::fprintf(
            stderr, "\r%s\033[K",
            wbroker::tools::RenderProgressLine(body, TerminalWidth(STDERR_FILENO) - 1).c_str());
        std::fflush(stderr);
      }
      continue;
    }
    if (bar) std::fputs("\r\033[K", stderr);
    Status st = ReplyStatus(body);
    if (!st.ok()) {
      // A broker without progress events (or a refusal before any) still
      // gets a final line on stdout in --json mode.
      if (as_json && !final_seen)
        emit({{"event", "failed"},
              {"model", ms->model},
              {"revision", ms->revision},
              {"error", {{"code", wbroker::ErrorCodeName(st.code())}, {"message", st.message()}}}});
      return failed(st.message());
    }
    if (as_json) {
      if (!final_seen) {
        body["event"] = "ready";
        emit(body);
      }
      return 0;
    }
    // A hot swap without --device names every device it moved.
    std::string where = device.empty() ? "" : " on " + body.value("device", device);
    if (body.contains("devices") && body["devices"].is_array()) {
      std::vector<std::string> names;
      for (const auto& d : body["devices"])
        if (d.is_string()) names.push_back(d.get<std::string>());
      where = " on " + fmt::format("{}", fmt::join(names, ", "));
    }
    fmt::print("{} {} @ {}: {} tensors, {} in {:.2f}s{}\n",
               mode.replace ? "loaded (replacing the other revisions)" : "loaded",
               body.value("model", ""), body.value("revision", ""), body.value("tensors", 0),
               wbroker::FormatBytes(body.value("bytes", 0ull)), body.value("load_seconds", 0.0),
               where);
    return 0;
  }
}

/// `wbrokerctl status --watch`: redraws every `interval` seconds (a cleared
/// screen on a terminal, plain repeated output otherwise) until SIGINT or
/// SIGTERM, then exits 0. A broker that goes away is retried each round.
int WatchStatus(const std::string& socket_path, double interval, bool as_json) {
  // Block the stop signals and take them with sigtimedwait(), which doubles as
  // the pause between rounds: no handler, and Ctrl-C ends the wait at once.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  ::sigprocmask(SIG_BLOCK, &stop, nullptr);
  const bool tty = ::isatty(STDOUT_FILENO) == 1;
  wbroker::client::ClientOptions opts;
  opts.socket_path = socket_path;
  opts.client_name = "wbrokerctl";
  // A hung broker must not hold the loop: signals are only taken between rounds.
  opts.timeout = std::chrono::seconds(10);
  std::unique_ptr<wbroker::client::Client> client;
  for (;;) {
    std::string error;
    json st;
    if (!client) {
      auto c = wbroker::client::Client::Connect(opts);
      if (c.ok())
        client = std::move(c).value();
      else
        error = c.status().message();
    }
    if (client) {
      auto r = client->Call({{"op", "status"}});
      if (r.ok()) {
        st = std::move(r).value();
        st.erase("id");
        st.erase("ok");
      } else {
        error = r.status().message();
        client.reset();  // reconnect next round
      }
    }
    const auto now = std::chrono::system_clock::now();
    if (as_json) {
      if (error.empty())
        std::cout << st.dump() << std::endl;
      else
        std::cerr << "wbrokerctl: " << error << std::endl;
    } else {
      std::string screen =
          fmt::format("Every {}s: wbrokerctl status    {:%Y-%m-%d %H:%M:%S}\n\n", interval,
                      fmt::localtime(std::chrono::system_clock::to_time_t(now)));
      screen += error.empty() ? FormatStatus(st) : "wbrokerctl: " + error + "\n";
      // ESC[H ESC[2J: cursor home and clear, as watch(1) does.
      if (tty)
        std::fputs("\033[H\033[2J", stdout);
      else
        screen += "\n";
      std::fputs(screen.c_str(), stdout);
      std::fflush(stdout);
    }
    timespec wait{};
    wait.tv_sec = static_cast<time_t>(interval);
    wait.tv_nsec = static_cast<long>((interval - std::floor(interval)) * 1e9);
    int sig = ::sigtimedwait(&stop, nullptr, &wait);
    if (sig == SIGINT || sig == SIGTERM) return 0;
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
  bool watch = false;
  double interval = 2.0;
  status->add_flag("--watch", watch, "redraw every --interval seconds until Ctrl-C (like watch)");
  status->add_option("--interval", interval, "seconds between redraws with --watch (default 2)")
      ->check(CLI::Range(0.1, 86400.0));
  auto* metrics = app.add_subcommand(
      "metrics", "the broker's Prometheus metrics (the text its /metrics endpoint serves)");
  std::string spec;
  auto* load = app.add_subcommand("load", "load MODEL[@REV] and wait until it is ready");
  load->add_option("model", spec, "MODEL[@REV]")->required();
  std::string dtype;
  load->add_option("--dtype", dtype, "convert float weights at load: bf16 | fp16 | fp32 (GPU)");
  std::string device;
  load->add_option("--device", device,
                   "device to load on, as the broker names it (default: its first)");
  LoadMode mode;
  load->add_flag("--replace", mode.replace,
                 "hot-swap: load beside the loaded revisions of MODEL, then point new attaches at "
                 "this one, on every device serving MODEL unless --device names one; holders are "
                 "told, old revisions are freed at their last release");
  load->add_flag("--allow-downtime", mode.allow_downtime,
                 "with --replace: when both copies do not fit, free the old revision first "
                 "(its clients wait for the new one)");
  auto* reload = app.add_subcommand(
      "reload", "re-read the broker's config and apply its preload list (like SIGHUP)");
  bool force = false;
  auto* unload =
      app.add_subcommand("unload", "unload MODEL[@REV] (all loaded revisions if no REV)");
  unload->add_option("model", spec, "MODEL[@REV]")->required();
  unload->add_flag("--force", force,
                   "drain a leased model: no new attaches, freed at last release");
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
      for (const auto& f : report->files)
        files.push_back({{"file", f.name}, {"ok", f.ok}, {"detail", f.detail}});
      json out = {{"model", report->model.model},
                  {"revision", report->model.commit},
                  {"snapshot", report->model.snapshot_dir.string()},
                  {"ok", report->ok()},
                  {"files", files},
                  {"weights", report->weights.ok() ? "ok" : report->weights.message()}};
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

  if (status->parsed() && watch) return WatchStatus(socket_path, interval, as_json);
  if (load->parsed()) {
    if (mode.allow_downtime && !mode.replace)
      return Fail(Status(wbroker::ErrorCode::kInvalidArgument,
                         "--allow-downtime only applies with --replace"));
    return RunLoad(socket_path, spec, dtype, device, as_json, mode);
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
    if (as_json)
      std::cout << st->dump(2) << "\n";
    else
      std::fputs(FormatStatus(*st).c_str(), stdout);
    return 0;
  }
  if (metrics->parsed()) {
    auto r = (*client)->Call({{"op", "metrics"}});
    if (!r.ok()) return Fail(r.status());
    r->erase("id");
    r->erase("ok");
    if (as_json)
      std::cout << r->dump(2) << "\n";
    else
      std::fputs(r->value("text", "").c_str(), stdout);
    return 0;
  }
  if (reload->parsed()) {
    auto r = (*client)->Call({{"op", "reload"}});
    if (!r.ok()) return Fail(fmt::format("reload failed: {}", r.status().message()));
    r->erase("id");
    r->erase("ok");
    if (as_json) {
      std::cout << r->dump(2) << "\n";
    } else {
      for (const auto& row : (*r)["preloads"])
        fmt::print("{:<10} {} {}{}\n", row.value("action", ""), row.value("model", ""),
                   row.value("revision", ""),
                   row.contains("error") ? ": " + row.value("error", "") : "");
    }
    for (const auto& row : (*r)["preloads"])
      if (row.value("action", "") == "failed") return 1;
    return 0;
  }
  auto ms = wbroker::ParseModelSpec(spec);
  if (!ms.ok()) return Fail(ms.status());
  if (unload->parsed()) {
    json req = {
        {"op", "unload"}, {"model", ms->model}, {"revision", ms->revision}, {"force", force}};
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
