// wbroker tests: runs the real wbrokerd binary as a child process.
#pragma once

#include <sys/types.h>

#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace wbroker::testing {

/// Path of a built binary ("wbrokerd", "wbrokerctl") in the build tree.
std::string BuiltBinary(const std::string& name);

/// Starts wbrokerd with `args` and waits until its socket accepts connections.
/// Kills it (SIGKILL) on destruction if still running. stderr goes to a log
/// file whose contents tests can read.
class BrokerProcess {
 public:
  struct Options {
    std::filesystem::path socket;            ///< --socket
    std::filesystem::path cache_dir;         ///< --cache-dir
    std::vector<std::string> extra_args;     ///< more flags
    std::map<std::string, std::string> env;  ///< extra environment
    bool wait_ready = true;                  ///< wait for the socket to answer
    int listen_fd = -1;                      ///< pass as fd 3 with LISTEN_FDS=1
  };

  explicit BrokerProcess(Options options);
  ~BrokerProcess();
  BrokerProcess(const BrokerProcess&) = delete;
  BrokerProcess& operator=(const BrokerProcess&) = delete;

  pid_t pid() const { return pid_; }
  const std::filesystem::path& socket() const { return options_.socket; }
  /// Sends `sig`; with wait, reaps and returns the wait status.
  int Signal(int sig, bool wait = true);
  /// Waits for exit (up to timeout_ms); returns the wait status or -1 on timeout.
  int Wait(int timeout_ms);
  /// Everything the broker logged so far.
  std::string Log() const;
  bool running() const { return pid_ > 0; }

 private:
  Options options_;                 ///< how it was started
  std::filesystem::path log_path_;  ///< stderr capture
  pid_t pid_ = -1;                  ///< child pid, -1 once reaped
};

/// Runs a command line through /bin/sh, returning exit status and output (stdout+stderr).
struct CommandResult {
  int exit_code = -1;
  std::string output;
};
CommandResult RunCommand(const std::string& command);

/// Runs `fn` in a forked child and returns its exit code (128+signal if killed).
/// The child must not touch gtest state; it reports through its exit code.
int RunInChild(const std::function<int()>& fn, int timeout_ms = 60000);

}  // namespace wbroker::testing
