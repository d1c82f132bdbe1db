# The Python client (python/wbroker) and the FastAPI example, run by pytest
# against the wbrokerd built here. They need the venv of scripts/install-deps.sh
# (torch, transformers, sentence-transformers, gunicorn, pytest).
foreach(suite client transformers fastapi_app)
  wb_add_pytest(python_${suite} tests/python/test_${suite}.py LABELS python TIMEOUT 1200)
endforeach()
