#include "broker_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

#include "wbroker/common/fd_socket.h"

namespace wbroker::testing {

std::string BuiltBinary(const std::string& name) {
  // $WBROKER_BINARY_DIR first: a relocated bundle of binaries (scripts/gpu-check
  // runs tests on a machine where the build tree's paths do not exist).
  const char* env = std::getenv("WBROKER_BINARY_DIR");
  std::vector<std::string> roots;
  if (env != nullptr && *env != '\0') roots.emplace_back(env);
  roots.emplace_back(WBROKER_BINARY_DIR);
  for (const auto& root : roots) {
    for (const char* dir : {"/", "/broker/", "/tools/", "/worker/"}) {
      std::string p = root + dir + name;
      if (::access(p.c_str(), X_OK) == 0) return p;
    }
  }
  ADD_FAILURE() << "binary " << name << " not built under " << WBROKER_BINARY_DIR
                << (env != nullptr ? " nor $WBROKER_BINARY_DIR=" + std::string(env) : "");
  return name;
}

BrokerProcess::BrokerProcess(Options options) : options_(std::move(options)) {
  log_path_ = options_.socket;
  log_path_ += ".log";
  std::vector<std::string> args = {BuiltBinary("wbrokerd"),
                                   "--socket",
                                   options_.socket.string(),
                                   "--cache-dir",
                                   options_.cache_dir.string(),
                                   "--log-level",
                                   "debug"};
  // Host memory unless a test asks for a device: on a GPU machine "auto"
  // would pick the GPU, and these tests read tensors through host pointers.
  if (std::find(options_.extra_args.begin(), options_.extra_args.end(), "--device") ==
      options_.extra_args.end()) {
    args.push_back("--device");
    args.push_back("cpu");
  }
  args.insert(args.end(), options_.extra_args.begin(), options_.extra_args.end());
  pid_ = ::fork();
  if (pid_ == 0) {
    int log = ::open(log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log >= 0) {
      ::dup2(log, 2);
      ::dup2(log, 1);
    }
    for (const auto& [k, v] : options_.env) ::setenv(k.c_str(), v.c_str(), 1);
    if (options_.listen_fd >= 0) {
      // sd_listen_fds() expects the socket at fd 3 and LISTEN_PID == our pid.
      // dup2() gives fd 3 without close-on-exec; a socket that already is fd 3
      // keeps its own flags, so clear FD_CLOEXEC or exec() would close it.
      if (options_.listen_fd != 3) {
        ::dup2(options_.listen_fd, 3);
      } else {
        ::fcntl(3, F_SETFD, ::fcntl(3, F_GETFD) & ~FD_CLOEXEC);
      }
      ::setenv("LISTEN_FDS", "1", 1);
      ::setenv("LISTEN_PID", std::to_string(::getpid()).c_str(), 1);
    }
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  if (!options_.wait_ready) return;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    if (ConnectUnixSocket(options_.socket.string()).ok()) return;
    int st;
    if (::waitpid(pid_, &st, WNOHANG) == pid_) {
      pid_ = -1;
      ADD_FAILURE() << "wbrokerd exited during start-up:\n" << Log();
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ADD_FAILURE() << "wbrokerd did not open " << options_.socket << " within 30 s:\n" << Log();
}

BrokerProcess::~BrokerProcess() {
  if (pid_ > 0) Signal(SIGKILL, true);
}

int BrokerProcess::Signal(int sig, bool wait) {
  if (pid_ <= 0) return -1;
  ::kill(pid_, sig);
  if (!wait) return 0;
  return Wait(30000);
}

int BrokerProcess::Wait(int timeout_ms) {
  if (pid_ <= 0) return -1;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::chrono::steady_clock::now() < deadline) {
    int st = 0;
    if (::waitpid(pid_, &st, WNOHANG) == pid_) {
      pid_ = -1;
      return st;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return -1;
}

std::string BrokerProcess::Log() const {
  std::ifstream in(log_path_);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

CommandResult RunCommand(const std::string& command) {
  CommandResult r;
  std::string full = command + " 2>&1";
  FILE* p = ::popen(full.c_str(), "r");
  if (p == nullptr) return r;
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) r.output.append(buf.data(), n);
  int st = ::pclose(p);
  r.exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return r;
}

int RunInChild(const std::function<int()>& fn, int timeout_ms) {
  std::fflush(nullptr);
  pid_t pid = ::fork();
  if (pid == 0) {
    int rc = 99;
    try {
      rc = fn();
    } catch (...) {
      rc = 98;
    }
    ::_exit(rc);
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  int st = 0;
  while (::waitpid(pid, &st, WNOHANG) != pid) {
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &st, 0);
      return 124;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

}  // namespace wbroker::testing
