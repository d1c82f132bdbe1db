# bench/run-all --quick --no-build as a smoke test (label bench): every
# generated section of a temp copy of docs/benchmarks.md is rewritten with
# fresh numbers, and the prose around them is untouched. Needs the venv and
# wbrokerd, wbroker-bench-load (and, with libtorch, wbroker-worker and
# wbroker-bench-runtime) built here. The generated models stay in the build
# tree, so reruns skip building them.
wb_add_pytest(bench_run_all_smoke tests/bench/test_run_all_smoke.py LABELS bench TIMEOUT 1500
              ENV "WBROKER_BENCH_MODELS=${CMAKE_BINARY_DIR}/tests/bench/run-all-models")
