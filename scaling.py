"""scaling.py: Llama 3's scaling-law experiments (section 3.2.1), at the size of this machine.

Llama 3 chose the size of its flagship model from IsoFLOP curves: at each of several compute budgets C it
pretrained models of several sizes, each for the tokens the budget allows (C = FLOPs per token * tokens), fitted a
parabola to validation loss against log(tokens) for each budget, and took the parabola's minimum as the
compute-optimal number of training tokens D*(C). A power law through those minima, D*(C) = A C^alpha (Meta:
alpha 0.53, A 0.29 at budgets 6e18-1e22), extrapolated to their 3.8e25 FLOPs: 16.55T tokens for a 402B model.

This file does the same with train.py as it is: one run per (budget, width), each `--max_steps` long enough to
spend the budget (model.Transformer.flops_per_token: 6N + attention), the final val loss read from its log.csv;
then the parabolas, the minima and the power law. Runs that already finished (their log.csv reaches their last
step) are read, not run again, so a killed sweep goes on where it was.

    python train.py --max_minutes 0.1              # once: makes the tokenizer and data/stdlib that the runs read
    python scaling.py                              # the default sweep: 26 runs (3 budgets x 9 widths), ~1 hour on 2 cores
    python scaling.py --budgets 1e13 3e13 1e14 --dims 12 16 24 32 48 64 --predict 1e16   # (hours here)
"""
import argparse
import csv
import dataclasses
import math
import os
import shutil
import subprocess
import sys
import zlib

import numpy as np
import torch

from model import PRESETS, Transformer
from tokenizer import Tokenizer

TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")   # (run from any folder)


def model_args(dim, vocab_size, seq_len):
    """The cpu preset at another width: depth 6, heads of 32 dimensions (below width 64, one head of it all), half
    as many kv heads (GQA; at least one)."""
    heads = max(1, dim // 32)
    return dataclasses.replace(PRESETS["cpu"], dim=dim, n_heads=heads, n_kv_heads=max(1, heads // 2),
                               vocab_size=vocab_size, max_seq_len=seq_len)


def flops_per_token(args):
    with torch.device("meta"):   # shapes only: no memory, no initialisation
        return Transformer(args).flops_per_token(args.max_seq_len)


def final_val_loss(log_csv, steps):
    """The val loss of the last step of a finished run (train.py evaluates at its last step), else None."""
    if not os.path.exists(log_csv):
        return None
    with open(log_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["val_loss"]]
    return float(rows[-1]["val_loss"]) if rows and int(rows[-1]["step"]) == steps else None


def fit_parabola(log_tokens, losses):
    """Least-squares loss = a x^2 + b x + c over x = log(tokens) -> (x at the minimum, the loss there), or None
    when the points do not bend upward (a > 0) or the minimum lies outside them (extrapolated: not measured)."""
    a, b, c = np.polyfit(log_tokens, losses, 2)
    if a <= 0:
        return None
    x = -b / (2 * a)
    if not min(log_tokens) <= x <= max(log_tokens):
        return None
    return x, a * x * x + b * x + c


def fit_power_law(budgets, optimal_tokens):
    """D*(C) = A C^alpha, a straight line in log-log -> (alpha, A)."""
    alpha, log_a = np.polyfit(np.log(budgets), np.log(optimal_tokens), 1)
    return alpha, math.exp(log_a)


def main():
    p = argparse.ArgumentParser(description="IsoFLOP curves and the compute-optimal token count (Llama 3 §3.2.1)")
    p.add_argument("--data", default="data/stdlib", help="token shards (made by train.py or data.py)")
    p.add_argument("--tokenizer", default="data/stdlib/tok.model")
    p.add_argument("--out_dir", default="out/scaling", help="one train.py run per (budget, width) under it")
    p.add_argument("--budgets", type=float, nargs="+", default=[1e12, 3e12, 1e13], help="training FLOPs")
    p.add_argument("--dims", type=int, nargs="+", default=[4, 6, 8, 12, 16, 24, 32, 48, 64], help="model widths")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--min_steps", type=int, default=20, help="a run shorter than this is skipped (warmup alone)")
    p.add_argument("--max_steps", type=int, default=12000, help="a run longer than this is skipped (time)")
    p.add_argument("--predict", type=float, nargs="*", default=[1e14, 1e15],
                   help="budgets to extrapolate the power law to (Llama 3 405B's: 3.8e25)")
    p.add_argument("--train_args", default="", help="more train.py flags for every run, e.g. '--lr 2e-3'")
    a = p.parse_args()
    for path in (a.data, a.tokenizer):
        if not os.path.exists(path):
            sys.exit(f"{path}: not there; `python train.py` makes data/stdlib and its tokenizer on first use")
    vocab = Tokenizer.load(a.tokenizer).n_words
    tokens_per_step = a.batch_size * a.seq_len
    print(f"{'budget':>9} {'dim':>5} {'FLOPs/token':>12} {'tokens':>10} {'steps':>6} {'val loss':>9}")
    curves = {}
    for budget in a.budgets:
        for dim in a.dims:
            margs = model_args(dim, vocab, a.seq_len)
            per_token = flops_per_token(margs)
            steps = round(budget / per_token / tokens_per_step)
            if steps < a.min_steps or steps > (a.max_steps or steps):
                continue
            out = os.path.join(a.out_dir, f"C{budget:.0e}_d{dim}" + (f"_{zlib.crc32(a.train_args.encode()):08x}"
                                                                       if a.train_args else ""))  # (others' runs)
            loss = final_val_loss(os.path.join(out, "log.csv"), steps)
            if loss is None:   # not run, or not to the end: (re)run it from scratch
                cmd = [sys.executable, TRAIN_PY, "--data", a.data, "--tokenizer", a.tokenizer, "--out_dir", out,
                       "--dim", str(dim), "--n_layers", str(margs.n_layers), "--n_heads", str(margs.n_heads),
                       "--n_kv_heads", str(margs.n_kv_heads), "--seq_len", str(a.seq_len),
                       "--batch_size", str(a.batch_size), "--max_steps", str(steps), "--max_minutes", "0",
                       "--warmup_steps", str(max(1, steps // 10)), "--eval_interval", str(steps),
                       "--ckpt_interval", str(steps), "--sample_tokens", "0", "--log_interval", str(steps),
                       *a.train_args.split()]
                shutil.rmtree(out, ignore_errors=True)
                run = subprocess.run(cmd, capture_output=True, text=True)
                loss = final_val_loss(os.path.join(out, "log.csv"), steps)
                if run.returncode or loss is None:
                    sys.exit(f"train.py failed for budget {budget:.0e}, dim {dim}:\n{run.stderr[-2000:]}")
            curves.setdefault(budget, []).append((steps * tokens_per_step, loss))
            print(f"{budget:9.1e} {dim:5d} {per_token:12,} {steps * tokens_per_step:10,} {steps:6d} {loss:9.4f}",
                  flush=True)

    print("\nIsoFLOP minima (a parabola in log tokens through each budget's lowest loss and two runs either side):")
    minima = []
    for budget, points in curves.items():
        # (near the bottom only: at this scale the curves are steeper on the side of the small models, and a
        # parabola through all of them puts its minimum above the lowest loss measured)
        points = sorted(points)
        best = min(range(len(points)), key=lambda i: points[i][1])
        near = points[max(0, best - 2):best + 3]
        fit = fit_parabola(np.log([t for t, _ in near]), [loss for _, loss in near]) if len(near) >= 3 else None
        if fit is None:
            print(f"  {budget:.1e}: no minimum inside the widths tried ({len(points)} runs): widen --dims")
            continue
        tokens = math.exp(fit[0])
        minima.append((budget, tokens))
        print(f"  {budget:.1e}: {tokens:,.0f} tokens (val loss {fit[1]:.4f} there)")
    if len(minima) < 2:
        sys.exit("fewer than two budgets with a minimum: no power law")
    alpha, coef = fit_power_law(*zip(*minima))
    print(f"\nD*(C) = {coef:.3g} * C^{alpha:.3f}   (Llama 3: 0.29 * C^0.53)")
    for budget in a.predict:
        tokens = coef * budget ** alpha
        print(f"  at {budget:.1e} FLOPs: {tokens:.3g} tokens, a model of ~{budget / (6 * tokens):.3g} parameters "
              "(C = 6 N D)")


if __name__ == "__main__":
    main()
