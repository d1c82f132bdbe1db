# --- worker/app: the wbroker-worker binary end to end (pytest) ---
# Real wbrokerd + wbroker-worker processes against transformers and
# sentence-transformers references; needs the venv of scripts/install-deps.sh.
if(WBROKER_HAVE_TORCH)
  wb_add_pytest(worker_e2e tests/worker/test_worker_e2e.py LABELS worker TIMEOUT 1800)
  # A revision hot swap under load: zero failed requests.
  wb_add_pytest(worker_hot_swap tests/worker/test_hot_swap.py LABELS worker TIMEOUT 900)
endif()
