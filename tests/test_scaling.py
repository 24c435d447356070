"""Tests for scaling.py: the fits against curves whose answers are known, and a small sweep of real train.py runs
that a second invocation reads back instead of running again.

    python -m pytest -q tests/test_scaling.py
"""
import math
import os
import random
import re
import subprocess
import sys

import numpy as np

import scaling
from data import prepare_data
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parabola_minimum_and_power_law_are_recovered():
    x = np.log([1e5, 3e5, 1e6, 3e6, 1e7])
    loss = 0.3 * (x - math.log(8e5)) ** 2 + 2.5
    at, best = scaling.fit_parabola(x, loss)
    assert abs(math.exp(at) / 8e5 - 1) < 1e-6 and abs(best - 2.5) < 1e-9
    assert scaling.fit_parabola(x, -x) is None                      # still falling: no minimum measured
    assert scaling.fit_parabola(x, (x - math.log(1e8)) ** 2) is None   # the minimum lies past the largest run
    budgets = np.array([1e12, 1e13, 1e14])
    alpha, coef = scaling.fit_power_law(budgets, 0.29 * budgets ** 0.53)
    assert abs(alpha - 0.53) < 1e-9 and abs(coef / 0.29 - 1) < 1e-9


def test_flops_per_token_is_the_models(tmp_path):
    from model import Transformer
    args = scaling.model_args(64, 600, 32)
    assert (args.dim, args.n_heads, args.n_kv_heads, args.n_layers) == (64, 2, 1, 6)
    assert scaling.flops_per_token(args) == Transformer(args).flops_per_token(32)


def test_a_sweep_runs_train_py_and_reads_finished_runs_back(tmp_path):
    """Two budgets x three widths of real train.py runs on a tiny corpus: each run gets the steps its budget pays
    for (too short ones skipped), its final val loss is the one in its log.csv; run again, the command trains
    nothing (the logs stay untouched) and prints the same table."""
    rng = random.Random(0)
    words = "the a cat dog sat ran on under mat tree big small red and then".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(30, 80))) + "." for _ in range(120)]
    (tmp_path / "docs").mkdir()
    for i, text in enumerate(texts):
        (tmp_path / "docs" / f"{i:03d}.txt").write_text(text)
    tok = Tokenizer.train(texts, 600)   # (this little text runs out of merges before 600: n_words is the size)
    tok.save(str(tmp_path / "tok.model"))
    prepare_data(str(tmp_path / "docs"), str(tmp_path / "tok.model"), str(tmp_path / "shards"), val_fraction=0.1,
                 num_proc=1, verbose=False)
    cmd = [sys.executable, "scaling.py", "--data", str(tmp_path / "shards"), "--tokenizer", str(tmp_path / "tok.model"),
           "--out_dir", str(tmp_path / "runs"), "--budgets", "3e9", "1e10", "--dims", "16", "32", "64",
           "--batch_size", "4", "--seq_len", "32", "--min_steps", "20", "--predict", "1e12",
           "--train_args", "--eval_tokens 256"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    rows = re.findall(r"^\s*([\d.e+]+)\s+(\d+)\s+[\d,]+\s+([\d,]+)\s+(\d+)\s+([\d.]+)$", first.stdout, re.M)
    assert rows, first.stdout + first.stderr[-2000:]
    for budget, dim, tokens, steps, loss in rows:
        per_token = scaling.flops_per_token(scaling.model_args(int(dim), tok.n_words, 32))
        assert int(steps) == round(float(budget) / per_token / 128)
        assert int(tokens.replace(",", "")) == int(steps) * 128
        log, = (tmp_path / "runs").glob(f"C{float(budget):.0e}_d{dim}_*/log.csv")   # (_crc32 of --train_args)
        assert abs(scaling.final_val_loss(log, int(steps)) - float(loss)) <= 5e-5   # (printed to 4 places)
    paid = lambda b, d: round(b / scaling.flops_per_token(scaling.model_args(d, tok.n_words, 32)) / 128)  # noqa: E731
    assert {(float(b), int(d)) for b, d, *_ in rows} == {(b, d) for b in (3e9, 1e10) for d in (16, 32, 64)
                                                          if paid(b, d) >= 20}
    assert "Traceback" not in first.stderr
    stamps = {p: os.path.getmtime(p) for p in (tmp_path / "runs").glob("*/log.csv")}
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.stdout.split("\n\n")[0] == first.stdout.split("\n\n")[0]
    assert stamps == {p: os.path.getmtime(p) for p in (tmp_path / "runs").glob("*/log.csv")}
    # a run that train.py refuses (flags after scaling.py's own win) stops the sweep, naming the run, with its error
    bad = subprocess.run(cmd + ["--train_args", "--batch_size 0"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1 and "train.py failed for budget 3e+09, dim 16" in bad.stderr, bad.stderr[-2000:]
    assert "batch_size" in bad.stderr


def test_missing_data_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "scaling.py", "--data", str(tmp_path / "nowhere")], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "nowhere: not there" in r.stderr and "Traceback" not in r.stderr, r.stderr
