# bench/compare --quick --no-doc as a smoke test (label bench): every method
# and N measured with sane fields, the control plane, the plots. Needs the
# venv (torch, safetensors, transformers, matplotlib) and wbrokerd built here.
set(WBROKER_BENCH_PYTHON "${WBROKER_PYTHON}")
if(NOT WBROKER_BENCH_PYTHON)
  set(WBROKER_BENCH_PYTHON python3)
endif()
add_test(NAME bench_compare_smoke
         COMMAND ${WBROKER_BENCH_PYTHON} -m pytest -q -p no:cacheprovider -rs
                 ${CMAKE_SOURCE_DIR}/tests/bench/test_compare_smoke.py
         WORKING_DIRECTORY ${CMAKE_SOURCE_DIR})
# The generated model stays in the build tree, so reruns skip building it.
set_tests_properties(bench_compare_smoke PROPERTIES
  LABELS bench TIMEOUT 900
  ENVIRONMENT "WBROKER_BINARY_DIR=${CMAKE_BINARY_DIR};WBROKER_COMPARE_CACHE=${CMAKE_BINARY_DIR}/tests/bench/compare-hub;HF_HUB_OFFLINE=1;PYTHONDONTWRITEBYTECODE=1")
