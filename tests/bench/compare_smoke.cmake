# bench/compare --quick --no-doc as a smoke test (label bench): every method
# and N measured with sane fields, the control plane, the plots. Needs the
# venv (torch, safetensors, transformers, matplotlib) and wbrokerd built here.
# The generated model stays in the build tree, so reruns skip building it.
wb_add_pytest(bench_compare_smoke tests/bench/test_compare_smoke.py LABELS bench TIMEOUT 900
              ENV "WBROKER_COMPARE_CACHE=${CMAKE_BINARY_DIR}/tests/bench/compare-hub")
