# --- issue 7, observability: load progress events and Prometheus metrics ---
# The pure parts (progress counters, log policy, request fields, metric
# families, wbrokerctl's progress bar) as GoogleTest cases ...
wb_add_gtest(broker_observability_test SOURCES broker/observability_test.cc LABELS broker
             LIBS wbroker_broker wbroker_tools GTest::gmock)
# ... and end to end (pytest): a real wbrokerd with --metrics-listen, wbrokerctl,
# /metrics and `wbrokerctl metrics` parsed by prometheus_client.
wb_add_pytest(broker_observability_e2e tests/broker/test_observability.py LABELS broker TIMEOUT 600)
