// wbroker fuzzing: invariant checks that abort, so both the libFuzzer build
// and the replay test report a broken invariant as a crash with its reason.
#pragma once

#include <cstdio>
#include <cstdlib>

/// Aborts with "file:line: invariant broken: what" when `cond` is false.
#define WB_FUZZ_CHECK(cond, what)                                                                  \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      std::fprintf(stderr, "%s:%d: invariant broken: %s (%s)\n", __FILE__, __LINE__, what, #cond); \
      std::abort();                                                                                \
    }                                                                                              \
  } while (0)
