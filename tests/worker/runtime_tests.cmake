# The libtorch model runtime (worker/runtime) against transformers and
# sentence-transformers reference outputs (runtime/reference.py, run once per
# build tree and cached there), plus one pass through the real broker.
if(WBROKER_HAVE_TORCH)
  wb_add_gtest(runtime_test SOURCES worker/runtime_test.cc LABELS worker
               LIBS wbroker_runtime wbroker_client GTest::gmock)
  add_dependencies(runtime_test wbrokerd)
endif()
