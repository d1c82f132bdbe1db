# --- worker/app: the wbroker-worker binary end to end (pytest) ---
# Real wbrokerd + wbroker-worker processes against transformers and
# sentence-transformers references; needs the venv of scripts/install-deps.sh.
if(WBROKER_HAVE_TORCH)
  set(_wb_e2e_python "${WBROKER_PYTHON}")
  if(NOT _wb_e2e_python)
    set(_wb_e2e_python python3)
  endif()
  add_test(NAME worker_e2e
           COMMAND ${_wb_e2e_python} -m pytest -q -p no:cacheprovider -rs
                   ${CMAKE_SOURCE_DIR}/tests/worker/test_worker_e2e.py
           WORKING_DIRECTORY ${CMAKE_SOURCE_DIR})
  set_tests_properties(worker_e2e PROPERTIES
    LABELS worker TIMEOUT 1800
    ENVIRONMENT "WBROKER_BINARY_DIR=${CMAKE_BINARY_DIR};HF_HUB_OFFLINE=1;PYTHONDONTWRITEBYTECODE=1")
endif()
