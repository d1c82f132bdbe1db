// wbroker tests: a worker process for the GPU tests. It attaches a model from
// a running wbrokerd through the client library (cuda-vmm or cuda-ipc import)
// and compares every tensor, read back from the device with cuMemcpyDtoH,
// with the bytes the test expects (DIR/<tensor name>.bin).
//
//   wbroker_cuda_worker_check --socket S --model M --expect DIR
//       [--print-device] [--hold] [--readonly-check] [--expect-error TEXT]
//
//   --print-device    print "device=cuda:N uuid=GPU-... backend=..." on stdout
//   --hold            after the first check print "ready", wait for a line on
//                     stdin, then check again (the test kills the broker or
//                     this process meanwhile)
//   --readonly-check  finally try cuMemcpyHtoD into the first tensor: it must
//                     fail (last, because a real fault may poison the context)
//   --expect-error    the attach must fail with a message containing TEXT
//
// Exit codes: 0 ok, 1 data mismatch or unexpected outcome, 2 attach/driver
// failure, 3 a write to the read-only arena succeeded, 4 usage.
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "wbroker/client/client.h"
#include "wbroker/cuda/driver.h"
#include "wbroker/cuda/resources.h"

namespace {

using wbroker::Status;
using wbroker::client::Lease;

struct Args {
  std::string socket, model, expect_dir, expect_error;
  bool print_device = false, hold = false, readonly_check = false;
};

bool ReadFile(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  out->assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return true;
}

// Compares every tensor with DIR/<name>.bin; returns the exit code.
int Verify(const wbroker::cuda::Driver& d, const Lease& lease, const std::string& dir) {
  size_t checked = 0;
  for (const auto& t : lease.tensors()) {
    std::string want;
    if (!ReadFile(dir + "/" + t.name + ".bin", &want)) {
      std::cerr << "no expectation file for " << t.name << "\n";
      return 1;
    }
    if (want.size() != t.nbytes) {
      std::cerr << t.name << ": " << t.nbytes << " bytes in the arena, expected " << want.size()
                << "\n";
      return 1;
    }
    std::string got(t.nbytes, '\0');
    if (t.nbytes > 0) {
      Status s =
          WB_CU_CALL(d, cuMemcpyDtoH, got.data(), reinterpret_cast<CUdeviceptr>(t.data), t.nbytes);
      if (!s.ok()) {
        std::cerr << t.name << ": " << s.ToString() << "\n";
        return 2;
      }
    }
    if (got != want) {
      size_t i = 0;
      while (got[i] == want[i]) ++i;
      std::cerr << t.name << ": first difference at byte " << i << " of " << t.nbytes << "\n";
      return 1;
    }
    ++checked;
  }
  std::cerr << "checked " << checked << " tensors\n";
  return 0;
}

int Run(const Args& a) {
  wbroker::client::ClientOptions opts;
  opts.socket_path = a.socket;
  opts.client_name = "cuda-worker-check";
  auto client = wbroker::client::Client::Connect(opts);
  if (!client.ok()) {
    std::cerr << "connect: " << client.status().ToString() << "\n";
    return 2;
  }
  auto lease = (*client)->Attach(a.model);
  if (!a.expect_error.empty()) {
    if (lease.ok()) {
      std::cerr << "attach succeeded, expected an error containing \"" << a.expect_error << "\"\n";
      return 1;
    }
    std::cout << "error=" << lease.status().ToString() << std::endl;
    return lease.status().message().find(a.expect_error) != std::string::npos ? 0 : 1;
  }
  if (!lease.ok()) {
    std::cerr << "attach: " << lease.status().ToString() << "\n";
    return 2;
  }
  const Lease& l = **lease;
  if (!l.on_device()) {
    std::cerr << "lease is not on a GPU (backend " << l.backend() << ")\n";
    return 2;
  }
  if (a.print_device)
    std::cout << "device=" << l.device() << " uuid=" << l.device_uuid()
              << " backend=" << l.backend() << std::endl;
  auto driver = wbroker::cuda::Driver::Load();
  if (!driver.ok()) {
    std::cerr << driver.status().ToString() << "\n";
    return 2;
  }
  const int ordinal = std::stoi(l.device().substr(l.device().find(':') + 1));
  auto ctx = wbroker::cuda::PrimaryContext::Retain(*driver, ordinal);
  if (!ctx.ok()) {
    std::cerr << ctx.status().ToString() << "\n";
    return 2;
  }
  auto scope = ctx->Enter();
  if (!scope.ok()) {
    std::cerr << scope.status().ToString() << "\n";
    return 2;
  }
  if (int rc = Verify(**driver, l, a.expect_dir); rc != 0) return rc;
  if (a.hold) {
    std::cout << "ready" << std::endl;
    std::string line;
    std::getline(std::cin, line);
    if (int rc = Verify(**driver, l, a.expect_dir); rc != 0) return rc;
    std::cerr << "second check passed\n";
  }
  if (a.readonly_check && !l.tensors().empty()) {
    const auto& t = l.tensors().front();
    std::string junk(t.nbytes, '\x5a');
    Status s = WB_CU_CALL(**driver, cuMemcpyHtoD, reinterpret_cast<CUdeviceptr>(t.data),
                          junk.data(), junk.size());
    if (s.ok()) {
      (void)WB_CU_CALL(**driver, cuCtxSynchronize);
      std::cerr << "a write into the read-only arena succeeded\n";
      return 3;
    }
    std::cout << "write refused: " << s.message() << std::endl;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto value = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (k == "--socket")
      a.socket = value();
    else if (k == "--model")
      a.model = value();
    else if (k == "--expect")
      a.expect_dir = value();
    else if (k == "--expect-error")
      a.expect_error = value();
    else if (k == "--print-device")
      a.print_device = true;
    else if (k == "--hold")
      a.hold = true;
    else if (k == "--readonly-check")
      a.readonly_check = true;
    else {
      std::cerr << "unknown argument " << k << "\n";
      return 4;
    }
  }
  if (a.socket.empty() || a.model.empty() || (a.expect_dir.empty() && a.expect_error.empty())) {
    std::cerr << "usage: wbroker_cuda_worker_check --socket S --model M --expect DIR [...]\n";
    return 4;
  }
  return Run(a);
}
