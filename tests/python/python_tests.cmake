# The Python client (python/wbroker) and the FastAPI example, run by pytest
# against the wbrokerd built here. They need the venv of scripts/install-deps.sh
# (torch, transformers, sentence-transformers, gunicorn, pytest).
set(WBROKER_PYTEST_PYTHON "${WBROKER_PYTHON}")
if(NOT WBROKER_PYTEST_PYTHON)
  set(WBROKER_PYTEST_PYTHON python3)
endif()
foreach(suite client transformers fastapi_app)
  add_test(NAME python_${suite}
           COMMAND ${WBROKER_PYTEST_PYTHON} -m pytest -q -p no:cacheprovider -rs
                   ${CMAKE_SOURCE_DIR}/tests/python/test_${suite}.py
           WORKING_DIRECTORY ${CMAKE_SOURCE_DIR})
  set_tests_properties(python_${suite} PROPERTIES
    LABELS python TIMEOUT 1200
    ENVIRONMENT "WBROKER_BINARY_DIR=${CMAKE_BINARY_DIR};HF_HUB_OFFLINE=1;PYTHONDONTWRITEBYTECODE=1")
endforeach()
