"""What every benchmark process does with its weights, the same for every method.

touch(): the readiness check. A checksum over one element of every 4 KiB page
of every tensor: it faults every page in (what "usable" really costs for a
mapping) without turning readiness into a memory-bandwidth test, and equal
checksums show every method sees the same bytes.

Workload: the steady-state load. One op is `x @ W.T` for every 2-D weight W
of the model, with a fixed activation x of BATCH rows per W, so one op
reads every weight once; ops/s is what a process gets done.
"""
import time

PAGE = 4096
BATCH = 8


def touch(tensors):
    """float64 checksum over one element per page of every tensor, in name order."""
    import torch
    total = 0.0
    for name in sorted(tensors):
        t = tensors[name]
        if t.numel() == 0:
            continue
        step = max(1, PAGE // t.element_size())
        total += float(t.reshape(-1)[::step].to(torch.float64).sum().item())
    return total


class Workload:
    """The fixed matmuls over the 2-D weights of one process."""

    def __init__(self, tensors, seed=0):
        import torch
        g = torch.Generator().manual_seed(seed)
        names = sorted(n for n, t in tensors.items() if t.dim() == 2 and t.is_floating_point())
        self.weights = [tensors[n] for n in names]  # the 2-D float weights, in name order
        # One activation per weight, made on the CPU from a fixed seed so every
        # method multiplies the same numbers.
        self.inputs = [torch.randn(BATCH, w.shape[1], generator=g, dtype=w.dtype).to(w.device)
                       for w in self.weights]  # x for each W
        self.device = self.weights[0].device if self.weights else torch.device("cpu")  # where W lives

    def op(self):
        acc = 0.0
        for x, w in zip(self.inputs, self.weights):
            acc += float((x @ w.t())[0, 0])  # .item() per W also waits for a GPU
        return acc

    def run(self, seconds):
        """Runs ops until `seconds` have passed (at least one op); returns (ops, elapsed seconds)."""
        if not self.weights:
            return 0, 0.0
        t0 = time.monotonic()
        ops = 0
        while True:
            self.op()
            ops += 1
            elapsed = time.monotonic() - t0
            if elapsed >= seconds:
                return ops, elapsed
