"""Benchmark of the output head in chunks, forward + backward of it alone, bf16 autocast:
- the training loss: model.cross_entropy (chunked, gradients made in the forward pass) against the plain
  F.cross_entropy(F.linear(h, weight).float(), targets);
- DPO's and PPO's per-token log-probs: align.token_logprobs (chunked, logits made again in backward) against
  log_softmax(F.linear(h, weight).float()).gather(targets), each summed.

Each (shape, loss) runs in a fresh process (on CPU the training loss with train.py's model.keep_freed_memory, the
log-probs without it, as align.py runs), so its peak memory is its own: on CPU the growth of the peak RSS over
the process's size before the loss, on a GPU torch.cuda.max_memory_allocated over what was allocated before.
Time: the median of --reps runs after one warm-up.

    python tests/bench_loss.py                  # CPU, dim 256: 4096 rows x 128K vocabulary, 2048 x 8K
    python tests/bench_loss.py --device cuda    # GPU: Llama 3.2 1B's head, 4096 and 16384 rows (B = 1 and 4)
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import align  # noqa: E402
import model as M  # noqa: E402

SHAPES = {"cpu": [(4096, 256, 128256), (2048, 256, 8192)],       # rows, dim, vocab
          "cuda": [(4096, 2048, 128256), (16384, 2048, 128256)]}


def one(loss, rows, dim, vocab, device, reps):
    """Time and peak memory of one loss at one shape, in this (fresh) process; prints one JSON line."""
    torch.manual_seed(0)
    h = torch.randn(rows, dim, device=device, requires_grad=True)
    w = (0.02 * torch.randn(vocab, dim, device=device)).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), device=device)
    fn = {"plain": lambda: F.cross_entropy(F.linear(h, w).float(), targets),
          "chunked": lambda: M.cross_entropy(h, w, targets),
          # the log-probs of targets[1:] given h[:-1] (token_logprobs' shift), summed
          "logp-plain": lambda: torch.log_softmax(F.linear(h[:-1], w).float(), -1).gather(1, targets[1:, None]).sum(),
          "logp-chunked": lambda: align.token_logprobs(h[None], w, targets[None]).sum(),
          }[loss]
    cuda = device == "cuda"
    if not cuda and not loss.startswith("logp"):
        M.keep_freed_memory()  # as train.py on a CPU
    before = torch.cuda.memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(reps + 1):
        h.grad = w.grad = None
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            value = fn()
        value.backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(ms=1e3 * statistics.median(times[1:]), gb=(peak - before) / 1e9, loss=value.item())))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # loss rows dim vocab: the child process
    a = parser.parse_args()
    if a.one:
        return one(a.one[0], *map(int, a.one[1:]), a.device, a.reps)
    name = torch.cuda.get_device_name() if a.device == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, bf16 autocast, forward + backward of the loss, median of {a.reps}")
    print(f"{'rows x dim x vocab':>23} | {'plain ms':>9} {'GB':>6} | {'chunked ms':>10} {'GB':>6} | "
          f"{'time ratio':>10} {'memory ratio':>12}")
    for plain, chunked in (("plain", "chunked"), ("logp-plain", "logp-chunked")):
        print(f"{plain} vs {chunked}:")
        for rows, dim, vocab in SHAPES[a.device]:
            r = {}
            for loss in (plain, chunked):
                p = subprocess.run([sys.executable, __file__, "--device", a.device, "--reps", str(a.reps), "--one",
                                    loss, str(rows), str(dim), str(vocab)], capture_output=True, text=True)
                r[loss] = json.loads(p.stdout.splitlines()[-1]) if p.returncode == 0 else None
                if p.returncode:  # (a child killed outright leaves no stderr)
                    why = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
                    print(f"{loss} at {rows}x{dim}x{vocab} failed: {why}")
            if None in r.values():
                continue
            pl, ch = r[plain], r[chunked]
            assert abs(pl["loss"] - ch["loss"]) < 1e-3 * max(1.0, abs(pl["loss"])), r
            print(f"{rows:>6} x {dim:>5} x {vocab:>6} | {pl['ms']:9.1f} {pl['gb']:6.2f} | {ch['ms']:10.1f} "
                  f"{ch['gb']:6.2f} | {pl['ms'] / ch['ms']:9.2f}x {pl['gb'] / max(ch['gb'], 1e-3):11.1f}x", flush=True)


if __name__ == "__main__":
    main()
