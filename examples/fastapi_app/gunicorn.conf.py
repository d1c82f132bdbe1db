# gunicorn settings for the wbroker FastAPI example.
import os

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WORKERS", "4"))
worker_class = "uvicorn.workers.UvicornWorker"
# No --preload: each worker attaches on its own (an attach costs milliseconds,
# and CUDA must not be initialised before fork).
preload_app = False
timeout = 120
