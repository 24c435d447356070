"""scaling.py: Llama 3's scaling-law experiments (section 3.2.1), at the size of this machine.

Llama 3 chose the size of its flagship model from IsoFLOP curves: at each of several compute budgets C it
pretrained models of several sizes, each for the tokens the budget allows (C = FLOPs per token * tokens), fitted a
parabola to validation loss against log(tokens) for each budget, and took the parabola's minimum as the
compute-optimal number of training tokens D*(C). A power law through those minima, D*(C) = A C^alpha (Meta:
alpha 0.53, A 0.29 at budgets 6e18-1e22), extrapolated to their 3.8e25 FLOPs: 16.55T tokens for a 402B model.

This file does the same with train.py as it is: one run per (budget, width), each `--max_steps` long enough to
spend the budget (model.Transformer.flops_per_token: 6N + attention), the final val loss read from its log.csv;
then the parabolas, the minima and the power law. Runs that already finished with the same settings (their
sweep.json, written once train.py has exported the model: steps, data, tokenizer, batch, --train_args) are read,
not run again, so a killed sweep goes on where it was.

Llama 3 then forecast the flagship's score on a benchmark (ARC Challenge) in two more steps: the normalized
negative log-likelihood (NLL) of the right answers against training FLOPs, for the compute-optimal models, and
accuracy against that NLL, a sigmoid, fitted on the scaling runs and on older models of more compute (Llama 2).
Here the benchmark is one made from the val split, which of four lines comes next in a document
(next_line_task), scored like any multiple-choice benchmark: the choice of least NLL per character. Every model
answers the same questions, so their errors go together (a hard draw of questions is hard for all): the forecast's
± redraws the questions' documents, the same draw for every model, and runs the whole chain again (a bootstrap).

    python train.py --max_minutes 0.1 --out_dir out/prep   # once: the tokenizer and data/stdlib the runs read
    python scaling.py                              # the default sweep: 26 runs (3 budgets x 9 widths), ~1 hour here
    python scaling.py --more_models out/default    # read back, and a model of more compute in the accuracy fit
    python scaling.py --budgets 1e12 3e12 1e13 3e13 --dims 4 6 8 12 16 24 32 48 64 96   # 9 runs more, ~40 min
"""
import argparse
import csv
import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys
import zlib

import numpy as np
import torch

from data import check_meta, read_meta, read_shard
from model import PRESETS, Transformer, load_model, tokenizer_path
from tokenizer import Tokenizer, atomic_write

TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")   # (run from any folder)


def model_args(dim, vocab_size, seq_len):
    """The cpu preset at another width: depth 6, heads of 32 dimensions (below width 64, or at a width that is no
    multiple of 32, one head of it all), half as many kv heads (GQA; an odd number of heads: one)."""
    heads = max(1, dim // 32) if dim % 32 == 0 else 1
    return dataclasses.replace(PRESETS["cpu"], dim=dim, n_heads=heads, n_kv_heads=heads // 2 if heads % 2 == 0 else 1,
                               vocab_size=vocab_size, max_seq_len=seq_len)


def meta_model(args):
    with torch.device("meta"):   # shapes only: no memory, no initialisation
        return Transformer(args)


def flops_per_token(args):
    return meta_model(args).flops_per_token(args.max_seq_len)


def model_for(per_token, vocab_size, seq_len):
    """(width, N) of the model of this family that spends per_token FLOPs a token: a budget's C over D* tokens is
    that model's 6N + attention, so C / 6D* would count the attention as parameters too (19-34% more at this
    sweep's budgets). The family's widths: even below 64, multiples of 32 (heads of 32) from there on; between the
    two around it, N and the width are interpolated; None below the narrowest, or past 33M wide."""
    def at(width):
        m = meta_model(model_args(width, vocab_size, seq_len))
        return m.flops_per_token(seq_len), m.num_params()
    step = 32 if per_token >= at(64)[0] else 2
    if per_token < at(step)[0]:
        return None
    lo, hi = 1, 2
    while at(step * hi)[0] <= per_token:   # (Llama 3's 3.8e25 FLOPs: widths near 100,000)
        if hi > 1 << 20:
            return None   # past widths of 33M (a law fitted to noise can ask for that)
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if at(step * mid)[0] <= per_token else (lo, mid)
    (f0, n0), (f1, n1) = at(step * lo), at(step * hi)
    share = (per_token - f0) / (f1 - f0)
    return step * (lo + share), n0 + share * (n1 - n0)


def final_val_loss(out, settings):
    """The val loss of the last step of a run that finished with these settings (train.py evaluates at its last
    step; sweep.json, written once train.py has exported the model, holds what the run was made with), else None."""
    if read_meta(os.path.join(out, "sweep.json"), cache=True) != settings or not os.path.exists(
            os.path.join(out, "log.csv")):   # (not finished, or another sweep's run)
        return None
    with open(os.path.join(out, "log.csv"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["val_loss"]]
    return float(rows[-1]["val_loss"]) if rows and int(rows[-1]["step"]) == settings["steps"] else None


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


def near_minimum(points):
    """A budget's (tokens, loss, ...) runs -> the one of lowest loss and up to two either side, by tokens. (Near
    the bottom only: at this scale the curves are steeper on the side of the small models, and a parabola through
    all of them puts its minimum above the lowest loss measured.)"""
    points = sorted(points)
    best = min(range(len(points)), key=lambda i: points[i][1])
    return points[max(0, best - 2):best + 3]


def fit_power_law(budgets, values):
    """y(C) = A C^alpha, a straight line in log-log -> (alpha, A)."""
    alpha, log_a = np.polyfit(np.log(budgets), np.log(values), 1)
    return alpha, math.exp(log_a)


# --- Llama 3's forecast of a benchmark: NLL of the right answers from FLOPs, then accuracy from NLL -----------

def next_line_task(data_dir, tok, questions, choices=4, context=128, seed=0):
    """A multiple-choice benchmark made from the val split: after the `context` tokens that precede a line of a val
    document, which of `choices` lines comes next: the document's own, or one of the lines of other val documents?
    Lines of 8-100 characters (stripped); every choice gets the right line's indentation, so only what the line
    says tells them apart; no choice twice. A question draws a document, then one of its lines, so that a long
    file is not most of the benchmark. -> [(context ids, [choice ids], [choice characters], right index, document)]."""
    meta = check_meta(os.path.join(data_dir, "meta.json"), ("val.shards",))
    docs = []
    for name in meta["val"]["shards"]:
        _, tokens = read_shard(os.path.join(data_dir, name))
        starts = np.flatnonzero(np.asarray(tokens) == tok.bos_id)
        docs += [tok.decode(doc[1:]).split("\n") for doc in np.split(np.asarray(tokens), starts[1:])]
    unasked = {d: [i for i, line in enumerate(doc) if i and 8 <= len(line.strip()) <= 100]
               for d, doc in enumerate(docs)}
    unasked = {d: lines for d, lines in unasked.items() if lines}
    every_line = [(d, i) for d, lines in unasked.items() for i in lines]   # (where the wrong choices come from)
    rng = random.Random(seed)
    task = []
    while len(task) < questions and unasked:
        d = rng.choice(list(unasked))
        i = unasked[d].pop(rng.randrange(len(unasked[d])))
        if not unasked[d]:
            del unasked[d]
        right = docs[d][i]
        options, tries = [right.strip()], 50 * choices   # (a tiny val split may lack distinct lines elsewhere)
        while len(options) < choices and tries:
            tries -= 1
            od, oi = rng.choice(every_line)
            if od != d and docs[od][oi].strip() not in options:
                options.append(docs[od][oi].strip())
        if len(options) < choices:
            continue
        rng.shuffle(options)
        indent = right[:len(right) - len(right.lstrip())]
        texts = [indent + option for option in options]
        before = tok.encode("\n".join(docs[d][:i]) + "\n", bos=True)[-context:]   # (as in training: after a BOS)
        task.append((before, [tok.encode(t) for t in texts], [len(t) for t in texts], options.index(right.strip()), d))
    return task


@torch.no_grad()
def score_task(model, task, batch=64):
    """-> per question (two arrays): the NLL per character of its right answer, and whether it was answered right
    (the right answer has the least NLL per character of its choices). Their means are the model's NLL and accuracy;
    kept per question so that a bootstrap can redraw the questions. Each choice is scored after its context."""
    model.eval()
    rows = [(q, c, ctx + ids, len(ctx)) for q, (ctx, options, *_) in enumerate(task) for c, ids in enumerate(options)]
    nll = torch.zeros(len(task), len(task[0][1]))
    for start in range(0, len(rows), batch):
        part = rows[start:start + batch]
        tokens = torch.zeros(len(part), max(len(ids) for _, _, ids, _ in part), dtype=torch.long)
        targets = torch.full_like(tokens, -100)             # the choice's tokens, each predicted one position early
        for r, (_, _, ids, n) in enumerate(part):
            tokens[r, :len(ids)] = torch.tensor(ids)
            targets[r, n - 1:len(ids) - 1] = torch.tensor(ids[n:])
        scored = targets != -100
        h = model.hidden_states(tokens)[scored]            # (logits at the scored positions only)
        logp = torch.log_softmax(model.output(h).float(), -1).gather(1, targets[scored][:, None])[:, 0]
        per_row = torch.zeros(len(part)).index_add_(0, scored.nonzero()[:, 0], -logp)
        for r, (q, c, _, _) in enumerate(part):
            nll[q, c] = per_row[r]
    nll /= torch.tensor([chars for _, _, chars, *_ in task], dtype=torch.float)
    right = torch.tensor([answer for _, _, _, answer, _ in task])
    return nll[torch.arange(len(task)), right].numpy(), (nll.argmin(1) == right).numpy()


def sigmoid_accuracy(nll, k, x0, chance):
    """Llama 3's accuracy curve: from chance (NLL high) up to 1 (NLL low), through the middle at x0."""
    return chance + (1 - chance) * sigmoid(k * (x0 - np.asarray(nll, dtype=float)))


def sigmoid(z):
    return 0.5 + 0.5 * np.tanh(z / 2)   # = 1 / (1 + exp(-z)), which overflows for very negative z


def fit_sigmoid(nll, accuracy, chance):
    """-> (k, x0) of sigmoid_accuracy by maximum likelihood, each accuracy the share of the same number of
    questions answered right (binomial): Fisher scoring in (a, b) = (k x0, -k), each step halved until the
    likelihood rises, from two starts (a straight line through the logits of the accuracy above chance, and a flat
    curve at their mean), the better end kept. (That line alone is biased: near chance the logit of a noisy share
    is far below the true one, and it drags the curve down where it extrapolates. Full steps from it alone missed
    the maximum in 59 of 3,000 random small cases, bouncing between two points or stopping on a flat step.)"""
    x, y = np.asarray(nll, dtype=float), np.asarray(accuracy, dtype=float)
    above = np.clip((y - chance) / (1 - chance), 0.01, 0.99)
    logit = np.log(above / (1 - above))

    def curve(a, b):   # -> its s and p at x, and the log-likelihood per question
        s = sigmoid(a + b * x)
        p = np.clip(chance + (1 - chance) * s, 1e-12, 1 - 1e-12)
        return s, p, np.sum(y * np.log(p) + (1 - y) * np.log(1 - p))

    def climb(a, b):
        s, p, loglik = curve(a, b)
        for _ in range(200):
            grad = (1 - chance) * (s * (1 - s))[:, None] * np.stack([np.ones_like(x), x], 1)   # dp / d(a, b)
            w = 1 / (p * (1 - p))                                                              # 1 / binomial variance
            # (lstsq, not solve: accuracies all at chance drive a to -inf, where the curve is flat and the matrix 0)
            step = np.linalg.lstsq(grad.T @ (w[:, None] * grad), grad.T @ (w * (y - p)), rcond=None)[0]
            for _ in range(40):
                new = curve(a + step[0], b + step[1])
                if new[2] >= loglik:
                    break
                step = step / 2
            else:
                break
            gain = new[2] - loglik
            a, b = a + step[0], b + step[1]
            s, p, loglik = new
            if np.abs(step).max() < 1e-10 or gain < 1e-13:
                break
        return loglik, a, b
    _, a, b = max(climb(*np.polyfit(x, logit, 1)[::-1]), climb(logit.mean(), -1e-6))
    return -b, a / -b


def forecast_chain(scores, curves, minima, more, predict, chance):
    """forecast()'s numbers from each model's (NLL, accuracy) on the benchmark (scores: out_dir or --more_models path
    -> pair), by name: the compute-optimal NLL at each budget of `minima` (a parabola in log tokens through the runs
    near the budget's val-loss minimum, read at the minimum's tokens), the NLL power law through them (beta, coef),
    the NLL it predicts at the `predict` budgets, the sigmoid through the runs (runs_fit) and what it says at each
    `more` model, those models' accuracy and miss (measured - said), the sigmoid through all the models (fit), and
    the accuracy it predicts from the predicted NLLs."""
    f = {"optimal": []}
    for budget, tokens in minima:
        near = near_minimum(curves[budget])
        coef = np.polyfit(np.log([t for t, *_ in near]), [scores[out][0] for *_, out in near], 2)
        f["optimal"].append(np.polyval(coef, math.log(tokens)))
    f["beta"], f["coef"] = fit_power_law([budget for budget, _ in minima], f["optimal"])
    f["nll"] = f["coef"] * np.asarray(predict, dtype=float) ** f["beta"]
    runs = [scores[out] for points in curves.values() for *_, out in points]
    f["runs_fit"] = fit_sigmoid(*zip(*runs), chance)
    f["said"] = sigmoid_accuracy([scores[path][0] for path in more], *f["runs_fit"], chance)
    f["measured"] = np.array([scores[path][1] for path in more])
    f["miss"] = f["measured"] - f["said"]
    f["fit"] = fit_sigmoid(*zip(*runs, *(scores[path] for path in more)), chance) if more else f["runs_fit"]
    f["accuracy"] = sigmoid_accuracy(f["nll"], *f["fit"], chance)
    return f


def benchmark_bootstrap(per_question, statistic, documents, draws=200, seed=0):
    """The spread of statistic(scores) over other draws of the benchmark: per_question is model -> (NLL of each
    question, answered right or not), `documents` each question's document. The benchmark draws a document before
    each question, so a replicate draws the documents with replacement and takes all their questions (the questions
    of one document go together: a hard document is hard for all its questions), the SAME draw for every model (they
    answer the same questions, so a hard draw is hard for all of them: their errors are correlated, which
    independent binomial draws per model would miss), and hands statistic each model's (mean NLL, accuracy) over
    it. -> {name: standard deviation over the `draws` replicates} for statistic's dict of numbers (or arrays)."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(np.asarray(documents) == d) for d in np.unique(documents)]
    replicates = []
    for _ in range(draws):
        q = np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))])   # (with replacement)
        replicates.append(statistic({m: (nll[q].mean(), right[q].mean()) for m, (nll, right) in per_question.items()}))
    return {name: np.std([r[name] for r in replicates], axis=0) for name in replicates[0]}


def main():
    p = argparse.ArgumentParser(description="IsoFLOP curves and the compute-optimal token count (Llama 3 §3.2.1)")
    p.add_argument("--data", default="data/stdlib", help="token shards (made by train.py or data.py)")
    p.add_argument("--tokenizer", default="data/stdlib/tok.model")
    p.add_argument("--out_dir", default="out/scaling", help="one train.py run per (budget, width) under it")
    p.add_argument("--budgets", type=float, nargs="+", default=[1e12, 3e12, 1e13], help="training FLOPs")
    p.add_argument("--dims", type=int, nargs="+", default=[4, 6, 8, 12, 16, 24, 32, 48, 64], help="model widths (even)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--min_steps", type=int, default=20, help="a run shorter than this is skipped (warmup alone)")
    p.add_argument("--max_steps", type=int, default=12000, help="a run longer than this is skipped (time; 0: none)")
    p.add_argument("--predict", type=float, nargs="*", default=[1e14, 1e15],
                   help="budgets to extrapolate the power law to (Llama 3 405B's: 3.8e25)")
    p.add_argument("--train_args", default="", help="more train.py flags for every run, e.g. '--lr 2e-3' (one "
                   "flag alone: --train_args=--compile)")
    p.add_argument("--questions", type=int, default=500, help="of the next-line benchmark (0: no forecast of it)")
    p.add_argument("--more_models", nargs="*", default=[], help="checkpoints of more compute (same tokenizer, never "
                   "trained on this val split) whose scores join the accuracy fit, as Llama 2's did in Llama 3's")
    a = p.parse_args()
    for flag, ok in (("--budgets must be finite and > 0", all(0 < b < math.inf for b in a.budgets)),
                     ("--predict must be finite and > 0", all(0 < b < math.inf for b in a.predict)),
                     # (a width that is no multiple of 32 is one head of it all: an odd one, an odd head_dim for RoPE)
                     ("--dims must be even and >= 2", all(d >= 2 and d % 2 == 0 for d in a.dims)),
                     ("--batch_size must be >= 1", a.batch_size >= 1),
                     ("--seq_len must be >= 2", a.seq_len >= 2), ("--questions must be >= 0", a.questions >= 0),
                     # (a run of no steps: train.py refuses its --eval_interval 0)
                     ("--min_steps must be >= 1, --max_steps 0 (no limit) or >= --min_steps",
                      a.min_steps >= 1 and (a.max_steps == 0 or a.max_steps >= a.min_steps))):
        if not ok:
            p.error(flag)
    a.budgets, a.dims = sorted(set(a.budgets)), sorted(set(a.dims))  # (a repeated one would weigh twice in the fits)
    ours = {"--data", "--tokenizer", "--out_dir", "--dim", "--n_layers", "--n_heads", "--n_kv_heads", "--seq_len",
            "--batch_size", "--max_steps", "--max_minutes", "--eval_interval", "--ckpt_interval",
            "--tokens_per_step", "--model", "--init", "--average_last"}   # (other FLOPs, another model, or weights
    # that are not the ones log.csv scored); argparse takes a unique prefix of a flag (--batch): those too
    taken = sorted({arg.split("=")[0] for arg in a.train_args.split() if arg.startswith("--") and arg != "--"
                    and any(flag.startswith(arg.split("=")[0]) for flag in ours)})
    if taken:   # (the later flag would win in train.py, and the budget's FLOPs count the other)
        p.error(f"--train_args {' '.join(taken)}: scaling.py sets these itself, or they change what a run's FLOPs "
                "count (its own flags: --batch_size, ...)")
    for path in (a.data, a.tokenizer):
        if not os.path.exists(path):
            sys.exit(f"{path}: not there; `python train.py` makes data/stdlib and its tokenizer on first use")
    tok = Tokenizer.load(a.tokenizer)
    vocab = tok.n_words
    if a.more_models and not a.questions:
        sys.exit("--more_models join the forecast, which --questions 0 turns off")
    for path in a.more_models:   # (checked before the sweep, which may take hours)
        try:
            same = Tokenizer.load(tokenizer_path(path)).fingerprint() == tok.fingerprint()
        except (OSError, ValueError) as e:
            sys.exit(f"--more_models {path}: {e}")
        if not same:
            sys.exit(f"--more_models {path}: trained with another tokenizer than {a.tokenizer}: its NLL is not "
                     "comparable")
    tokens_per_step = a.batch_size * a.seq_len
    try:  # (a hand-edited or damaged meta.json: named, before the sweep)
        meta = check_meta(os.path.join(a.data, "meta.json"), ("train", "val.shards"))
    except ValueError as e:
        sys.exit(str(e))
    data = zlib.crc32(str(meta["train"].get("crc32")).encode())
    print(f"{'budget':>9} {'dim':>5} {'FLOPs/token':>12} {'tokens':>10} {'steps':>6} {'val loss':>9}")
    curves = {}
    for budget in a.budgets:
        for dim in a.dims:
            margs = model_args(dim, vocab, a.seq_len)
            per_token = flops_per_token(margs)
            steps = round(budget / per_token / tokens_per_step)
            if steps < a.min_steps or steps > (a.max_steps or steps):
                continue
            out = os.path.join(a.out_dir, f"C{budget:.3g}_d{dim}" + (f"_{zlib.crc32(a.train_args.encode()):08x}"
                                                                       if a.train_args else ""))  # (others' runs)
            # what the run is made of: a run of other data, tokenizer or shape is trained again, not read back
            settings = dict(steps=steps, data=data, tokenizer=tok.fingerprint(), batch_size=a.batch_size,
                            seq_len=a.seq_len, train_args=a.train_args)
            loss = final_val_loss(out, settings)
            if loss is None:   # not run, or not to the end, or another sweep's: (re)run it from scratch
                cmd = [sys.executable, TRAIN_PY, "--data", a.data, "--tokenizer", a.tokenizer, "--out_dir", out,
                       "--dim", str(dim), "--n_layers", str(margs.n_layers), "--n_heads", str(margs.n_heads),
                       "--n_kv_heads", str(margs.n_kv_heads), "--seq_len", str(a.seq_len),
                       "--batch_size", str(a.batch_size), "--max_steps", str(steps), "--max_minutes", "0",
                       "--warmup_steps", str(max(1, steps // 10)), "--eval_interval", str(steps),
                       "--ckpt_interval", str(steps), "--sample_tokens", "0", "--log_interval", str(steps),
                       *a.train_args.split()]
                shutil.rmtree(out, ignore_errors=True)
                run = subprocess.run(cmd, capture_output=True, text=True)
                if run.returncode:
                    sys.exit(f"train.py failed for budget {budget:.3g}, dim {dim}:\n{run.stderr[-2000:]}")
                atomic_write(os.path.join(out, "sweep.json"), lambda f: f.write(json.dumps(settings).encode()))
                loss = final_val_loss(out, settings)
                if loss is None:
                    sys.exit(f"train.py ran for budget {budget:.3g}, dim {dim}, but {out}/log.csv has no val loss "
                             f"at step {steps}")
            curves.setdefault(budget, []).append((steps * tokens_per_step, loss, out))
            print(f"{budget:9.1e} {dim:5d} {per_token:12,} {steps * tokens_per_step:10,} {steps:6d} {loss:9.4f}",
                  flush=True)

    print("\nIsoFLOP minima (a parabola in log tokens through each budget's lowest loss and two runs either side):")
    minima = []
    for budget, points in curves.items():
        near = near_minimum(points)
        fit = fit_parabola(np.log([t for t, *_ in near]), [loss for _, loss, _ in near]) if len(near) >= 3 else None
        if fit is None:
            print(f"  {budget:.1e}: no minimum inside the widths tried ({len(points)} runs): widen --dims")
            continue
        minima.append((budget, math.exp(fit[0])))
        print(f"  {budget:.1e}: {minima[-1][1]:,.0f} tokens (val loss {fit[1]:.4f} there)")
    if not curves:
        sys.exit(f"no run: every (budget, width) pays for under --min_steps {a.min_steps} or over --max_steps "
                 f"{a.max_steps} steps of {tokens_per_step} tokens")
    if len(minima) < 2:
        sys.exit("fewer than two budgets with a minimum: no power law")
    alpha, coef = fit_power_law(*zip(*minima))
    print(f"\nD*(C) = {coef:.3g} * C^{alpha:.3f}   (Llama 3: 0.29 * C^0.53)")
    for budget in a.predict:
        tokens = coef * budget ** alpha
        model = model_for(budget / tokens, vocab, a.seq_len)
        print(f"  at {budget:.1e} FLOPs: {tokens:.3g} tokens, " + (
            f"a model of ~{model[1]:.3g} parameters (width ~{model[0]:.0f}: C = (6N + attention) D)" if model else
            "no model of this family spends that many FLOPs a token (width 2 to 33M)"))
    if a.questions:
        forecast(a, tok, curves, minima)


def forecast(a, tok, curves, minima, choices=4):
    """Llama 3's two steps from FLOPs to a benchmark's accuracy, on the next-line benchmark. A ± is one standard
    deviation over a bootstrap of the benchmark (benchmark_bootstrap, the whole forecast_chain refitted in each
    replicate): how much another draw of as many documents would move the figure. It does not count run-to-run
    training noise (another seed or data order would give each run another loss and score), nor the val-loss minima's
    own noise (D* is taken as fitted), nor whether the power law and the sigmoid hold past the runs."""
    chance = 1 / choices
    task = next_line_task(a.data, tok, a.questions, choices, context=a.seq_len // 2)
    if len(task) < 50:
        print(f"\nno forecast: {len(task)} next-line questions (--questions {a.questions}, as many as the val split "
              "has lines for), under 50")
        return
    print(f"\nThe next-line benchmark: {len(task)} questions of {choices} lines from the val split (chance "
          f"{chance:.2f}); NLL per character of the right line, accuracy")
    per_question = {}   # out_dir or path -> (NLL of each question's right line, answered right)
    for budget, points in curves.items():
        for tokens, _, out in sorted(points):
            per_question[out] = score_task(load(out), task)
            print(f"  {budget:9.1e} {tokens:10,} tokens: NLL {per_question[out][0].mean():.4f}, accuracy "
                  f"{per_question[out][1].mean():.3f}", flush=True)
    for path in a.more_models:
        per_question[path] = score_task(load(path), task)

    def chain(scores):
        return forecast_chain(scores, curves, minima, a.more_models, a.predict, chance)
    f = chain({m: (nll.mean(), right.mean()) for m, (nll, right) in per_question.items()})
    draws = 200   # (a standard deviation to about 5%: 1 / sqrt(2 draws))
    documents = [d for *_, d in task]
    pm = benchmark_bootstrap(per_question, chain, documents, draws)   # (the ± of each of f's numbers)
    print(f"± below: one standard deviation over {draws} draws of the questions' {len(set(documents))} documents (with "
          "replacement, the whole chain refitted each time); not counting training noise (seeds)")
    print("The compute-optimal model's NLL (a parabola in log tokens through the runs near each minimum):")
    for (budget, tokens), nll, error in zip(minima, f["optimal"], pm["optimal"]):
        print(f"  {budget:.1e}: NLL {nll:.4f} ± {error:.4f} at {tokens:,.0f} tokens")
    print(f"NLL*(C) = {f['coef']:.3g} * C^{f['beta']:.4f}   (exponent ± {pm['beta']:.4f})")

    def print_sigmoid(k, x0, through):
        print(f"accuracy = {chance:.2f} + {1 - chance:.2f} / (1 + exp({k:.3g} * (NLL - {x0:.4f})))   ({through})")

    print_sigmoid(*f["runs_fit"], f"through the {sum(map(len, curves.values()))} runs")
    for i, path in enumerate(a.more_models):   # (each a test of the runs' sigmoid, then a point of the final fit;
        # measured and said come from the same questions, so the miss's ± is its own, not the other two combined)
        print(f"  {path}: NLL {per_question[path][0].mean():.4f}, accuracy {f['measured'][i]:.3f} ± "
              f"{pm['measured'][i]:.3f}; the sigmoid said {f['said'][i]:.3f} ± {pm['said'][i]:.3f}; measured - said "
              f"{f['miss'][i]:+.3f} ± {pm['miss'][i]:.3f}")
    if a.more_models:
        print_sigmoid(*f["fit"], f"through all {len(per_question)} models")
    for i, budget in enumerate(a.predict):
        print(f"  at {budget:.1e} FLOPs: NLL {f['nll'][i]:.4f} ± {pm['nll'][i]:.4f}, accuracy {f['accuracy'][i]:.3f} "
              f"± {pm['accuracy'][i]:.3f}")


def load(path):
    """load_model, a missing or damaged model a one-line exit that names it (CheckpointError is a ValueError)."""
    try:
        return load_model(path)
    except (OSError, ValueError) as e:
        sys.exit(f"no model to score: {e}")


if __name__ == "__main__":
    main()
