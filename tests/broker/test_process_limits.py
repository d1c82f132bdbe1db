"""wbrokerd raises its soft open-file limit to the hard one at start-up, so a
service manager's or container runtime's soft limit of 1024 does not cap the
broker's connections below max_connections."""
import resource
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "python"))
from conftest import Broker  # noqa: E402  (the Python suites' broker helper)


def open_file_limits(pid):
    """(soft, hard) "Max open files" of a process, as /proc reports them."""
    for line in open(f"/proc/{pid}/limits"):
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError(f"no 'Max open files' in /proc/{pid}/limits")


def test_soft_open_file_limit_is_raised_to_the_hard_limit(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 256
    assert hard == resource.RLIM_INFINITY or hard > low, "the hard limit leaves nothing to test"
    # The broker inherits a low soft limit from this process.
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        b = Broker(tmp_path, tmp_path).start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        got_soft, got_hard = open_file_limits(b.proc.pid)
        want = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
        assert (got_soft, got_hard) == (want, want)
    finally:
        b.stop()
