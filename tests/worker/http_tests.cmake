# --- worker/http: the HTTP layer against a fake engine (no libtorch) ---
wb_add_gtest(http_server_test
             SOURCES worker/http_server_test.cc worker/fake_engine.cc
             LABELS worker
             LIBS wbroker_http GTest::gmock)
target_include_directories(http_server_test PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/worker)
