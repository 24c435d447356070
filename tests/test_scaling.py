"""Tests for scaling.py: the fits against curves whose answers are known, and a small sweep of real train.py runs
that a second invocation reads back instead of running again.

    python -m pytest -q tests/test_scaling.py
"""
import json
import math
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import scaling
from data import prepare_data, read_shard, write_shard
from model import Transformer, save_model
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
        out, = (tmp_path / "runs").glob(f"C{float(budget):.3g}_d{dim}_*")   # (_crc32 of --train_args)
        settings = json.loads((out / "sweep.json").read_text())   # (written when its train.py ended)
        assert settings["steps"] == int(steps) and settings["tokenizer"] == tok.fingerprint()
        assert abs(scaling.final_val_loss(out, settings) - float(loss)) <= 5e-5   # (printed to 4 places)
    paid = lambda b, d: round(b / scaling.flops_per_token(scaling.model_args(d, tok.n_words, 32)) / 128)  # noqa: E731
    assert {(float(b), int(d)) for b, d, *_ in rows} == {(b, d) for b in (3e9, 1e10) for d in (16, 32, 64)
                                                          if paid(b, d) >= 20}
    assert "Traceback" not in first.stderr
    stamps = {p: os.path.getmtime(p) for p in (tmp_path / "runs").glob("*/log.csv")}
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.stdout.split("\n\n")[0] == first.stdout.split("\n\n")[0]
    assert stamps == {p: os.path.getmtime(p) for p in (tmp_path / "runs").glob("*/log.csv")}
    # a run of other settings (here: its sweep.json says another tokenizer), or one killed before train.py ended
    # (no sweep.json), is trained again; the others are read back
    first_run, killed = sorted((tmp_path / "runs").glob("*/sweep.json"))[:2]
    first_run.write_text(json.dumps({**json.loads(first_run.read_text()), "tokenizer": "another"}))
    killed.unlink()
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.stdout.split("\n\n")[0] == first.stdout.split("\n\n")[0], again.stderr[-2000:]
    changed = {p.parent.name for p, t in stamps.items() if os.path.getmtime(p) != t}
    assert changed == {first_run.parent.name, killed.parent.name}, changed
    # a run that train.py refuses stops the sweep, naming the run, with its error
    bad = subprocess.run(cmd + ["--train_args", "--lr -1"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1 and "train.py failed for budget 3e+09, dim 16" in bad.stderr, bad.stderr[-2000:]
    assert "--lr" in bad.stderr
    # scaling.py's own flags are its own (train.py would take the later one, the FLOPs count the other); bad values
    for flags, said in ((["--train_args", "--batch_size 16"], "--train_args --batch_size: scaling.py sets these"),
                        (["--budgets", "nan"], "--budgets must be finite"),
                        (["--dims", "0"], "--dims must be even and >= 2"),
                        (["--min_steps", "50", "--max_steps", "10"], "--max_steps 0 (no limit) or >= --min_steps"),
                        (["--train_args=--compile", "--min_steps", "100000", "--max_steps", "0"], None)):
        r = subprocess.run(cmd + flags, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        if said is None:   # every run too short: said, not an empty table
            assert r.returncode == 1 and "no run: every (budget, width) pays for under --min_steps" in r.stderr, \
                r.stderr
        else:
            assert r.returncode == 2 and said in r.stderr, r.stderr


def test_model_args_at_any_width():
    """Heads of 32 where the width is a multiple of 32 (one head of it all below 64 and elsewhere), half as many
    kv heads, or one for an odd number of heads (160 wide: 5 heads over 2 kv heads could not be built)."""
    for dim, heads, kv in ((16, 1, 1), (48, 1, 1), (64, 2, 1), (80, 1, 1), (96, 3, 1), (128, 4, 2), (160, 5, 1),
                           (256, 8, 4)):
        args = scaling.model_args(dim, 600, 32)
        assert (args.n_heads, args.n_kv_heads) == (heads, kv), dim
        Transformer(args)   # (builds)


def test_sigmoid_of_accuracy_against_nll_is_recovered():
    nll = np.linspace(0.6, 1.8, 9)
    k, x0 = scaling.fit_sigmoid(nll, scaling.sigmoid_accuracy(nll, 3.0, 1.1, 0.25), 0.25)
    assert k == pytest.approx(3.0, abs=1e-7) and x0 == pytest.approx(1.1, abs=1e-7)
    assert scaling.sigmoid_accuracy(1.1, 3.0, 1.1, 0.25) == 0.625
    assert scaling.sigmoid_accuracy(0.6, 3.0, 1.1, 0.25) > 0.8


def test_sigmoid_fit_is_the_binomial_maximum_likelihood():
    """On noisy shares (500 questions each, near chance as the small runs are) the fit is where the binomial
    log-likelihood peaks: above the true curve's, above the straight line through the logits it starts from,
    and above every small step away from it."""
    rng = np.random.default_rng(0)
    nll = np.linspace(1.2, 2.0, 27)
    accuracy = rng.binomial(500, scaling.sigmoid_accuracy(nll, 2.7, 0.8, 0.25)) / 500

    def loglik(k, x0):
        p = scaling.sigmoid_accuracy(nll, k, x0, 0.25)
        return float(np.sum(500 * (accuracy * np.log(p) + (1 - accuracy) * np.log(1 - p))))
    k, x0 = scaling.fit_sigmoid(nll, accuracy, 0.25)
    above = np.clip((accuracy - 0.25) / 0.75, 0.01, 0.99)
    slope, intercept = np.polyfit(nll, np.log(above / (1 - above)), 1)
    assert loglik(k, x0) >= loglik(2.7, 0.8) and loglik(k, x0) > loglik(-slope, intercept / -slope)
    assert all(loglik(k, x0) >= loglik(k + dk, x0 + dx) for dk in (-0.01, 0, 0.01) for dx in (-0.001, 0, 0.001))
    assert abs(scaling.sigmoid_accuracy(0.7, k, x0, 0.25) - scaling.sigmoid_accuracy(0.7, 2.7, 0.8, 0.25)) < 0.1
    for seed in range(40):   # models at chance: a nearly flat curve, not an error (full steps from the logit line
        chance = np.random.default_rng(seed).binomial(60, 0.25, 12) / 60   # made a step in 20 of these 40, to 1 in
        k, x0 = scaling.fit_sigmoid(np.linspace(2, 3, 12), chance, 0.25)    # some; the peak follows the noise a bit)
        assert np.all(np.abs(scaling.sigmoid_accuracy(np.linspace(2, 3, 12), k, x0, 0.25) - 0.25) < 0.15), seed
    # two cases where full steps missed the likelihood's peak (bounced between two points; stopped on a flat step)
    k, x0 = scaling.fit_sigmoid([.894, .936, 1.747, 2.162], [.43, .48, .29, .18], 0.25)
    assert (k, x0) == pytest.approx((3.198, 0.607), abs=1e-3)   # (scipy's Nelder-Mead: the peak)
    nll = [1.062, 1.655, 1.686, 2.027, 2.344]   # near chance: no step to 1 at the first runs (it said 1.0 at 0.27)
    k, x0 = scaling.fit_sigmoid(nll, [8 / 30, 8 / 30, 5 / 30, 9 / 30, 8 / 30], 0.25)
    assert np.all(scaling.sigmoid_accuracy(nll, k, x0, 0.25) < 0.5)


def test_benchmark_bootstrap_of_a_mean_is_its_standard_error():
    """Redrawing the questions, a model's mean NLL and accuracy spread by their analytic standard errors: the
    standard deviation over the root of the number of questions, sqrt(p (1 - p) / n) for a share."""
    rng = np.random.default_rng(1)
    nll, right = rng.gamma(2.0, 0.6, 400), rng.random(400) < 0.3
    pm = scaling.benchmark_bootstrap({"m": (nll, right)}, lambda s: {"nll": s["m"][0], "accuracy": s["m"][1]},
                                    np.arange(400), draws=2000)   # (a document each; a standard deviation to ~2%)
    assert pm["nll"] == pytest.approx(nll.std() / math.sqrt(400), rel=0.08)
    assert pm["accuracy"] == pytest.approx(math.sqrt(right.mean() * (1 - right.mean()) / 400), rel=0.08)


def test_benchmark_bootstrap_draws_documents():
    """50 documents of 10 questions each, a document's questions all right or all wrong: another draw of the
    benchmark (documents first, as next_line_task draws) moves the accuracy by sqrt(p (1 - p) / 50), the standard
    error of 50 answers, not of 500 (3.2x less)."""
    rng = np.random.default_rng(2)
    right = np.repeat(rng.random(50) < 0.4, 10)
    pm = scaling.benchmark_bootstrap({"m": (np.zeros(500), right)}, lambda s: {"accuracy": s["m"][1]},
                                    np.repeat(rng.permutation(50), 10), draws=2000)
    assert pm["accuracy"] == pytest.approx(math.sqrt(right.mean() * (1 - right.mean()) / 50), rel=0.1)


def test_benchmark_bootstrap_sees_that_the_models_answer_the_same_questions():
    """12 models along a sigmoid, 300 questions. Where each question has one ease for all (a model answers it right
    if its ease is under the model's accuracy: a question right for one model is right for every better one), the
    accuracies move together from one draw of questions to the next, and the sigmoid at the models' middle NLL moves
    far more than independent binomial draws per model (the parametric bootstrap this replaced) say; where each
    model draws its own ease, as much. (Far past the models, at NLL 0.7, the two were 0.8-1.3x apart in three seeds:
    errors that move together keep the slope.)"""
    nll = np.linspace(1.2, 2.0, 12)
    truth = scaling.sigmoid_accuracy(nll, 2.7, 0.8, 0.25)
    rng = np.random.default_rng(0)

    def predicted(scores):   # the sigmoid through the models, at their middle NLL
        return {"at": scaling.sigmoid_accuracy(1.6, *scaling.fit_sigmoid(*zip(*scores.values()), 0.25), 0.25)}

    def spread(ease):   # (12 models, 300 questions)
        per_question = {m: (np.full(300, nll[m]), ease[m] < truth[m]) for m in range(12)}
        return scaling.benchmark_bootstrap(per_question, predicted, np.arange(300), draws=100)["at"]
    binomial = np.std([predicted({m: (nll[m], rng.binomial(300, truth[m]) / 300) for m in range(12)})["at"]
                       for _ in range(100)])
    shared, own = spread(np.tile(rng.random(300), (12, 1))), spread(rng.random((12, 300)))
    # (here 2.6x and 1.25x; with rng seeds 0-7, 2.2-3.3x and 0.8-1.25x)
    assert shared > 2 * binomial and 0.7 < own / binomial < 1.4, (shared, own, binomial)


@pytest.fixture(scope="module")
def lined_corpus(tmp_path_factory):
    """Shards of 60 documents of indented lines of words, each line ending in its document's tag (a val split of
    ~12), and their tokenizer."""
    path = tmp_path_factory.mktemp("lined")
    rng = random.Random(1)
    words = "the a cat dog sat ran on under mat tree big small red and then def return if".split()
    (path / "docs").mkdir()
    texts = []
    for i in range(60):
        lines = [" " * rng.choice((0, 4, 8)) + " ".join(rng.choice(words) for _ in range(rng.randint(2, 9)))
                 + f" d{i}" for _ in range(rng.randint(8, 20))]
        texts.append("\n".join(lines))
        (path / "docs" / f"{i:03d}.txt").write_text(texts[-1])
    Tokenizer.train(texts, 600).save(str(path / "tok.model"))
    prepare_data(str(path / "docs"), str(path / "tok.model"), str(path / "shards"), val_fraction=0.2, num_proc=1,
                 verbose=False)
    return path, Tokenizer.load(str(path / "tok.model"))


def test_next_line_task_asks_for_a_documents_own_next_line(lined_corpus):
    path, tok = lined_corpus
    task = scaling.next_line_task(str(path / "shards"), tok, 40, choices=4, context=24)
    assert len(task) == 40 and task == scaling.next_line_task(str(path / "shards"), tok, 40, choices=4, context=24)
    _, tokens = read_shard(str(path / "shards" / "val_000.bin"))
    tokens = np.asarray(tokens)
    docs = [tok.decode(doc[1:]) + "\n" for doc in np.split(tokens, np.flatnonzero(tokens == tok.bos_id)[1:])]
    for context, options, chars, right, document in task:
        texts = [tok.decode(ids) for ids in options]
        assert [len(t) for t in texts] == chars and len(set(texts)) == 4 and len(context) <= 24
        indent = {t[:len(t) - len(t.lstrip())] for t in texts}
        assert len(indent) == 1                                    # every choice indented as the right line
        tags = [t.split()[-1] for t in texts]
        assert tags.count(tags[right]) == 1                        # the wrong lines are other documents'
        before = tok.decode(context[1:] if context[0] == tok.bos_id else context) + texts[right] + "\n"
        if context[0] == tok.bos_id:                               # a whole beginning: after <|begin_of_text|>
            assert docs[document].startswith(before)
        assert before in docs[document]                            # the context, then its own next line
        assert all(8 <= len(t.strip()) <= 100 for t in texts)
    assert len({right for _, _, _, right, _ in task}) == 4            # the right answer is not always first
    assert any(context[0] == tok.bos_id for context, *_ in task)


def test_next_line_task_draws_documents_not_lines(tmp_path):
    """One val document of 300 lines among nine of 10: questions draw a document first, so the long one gets
    about a tenth of them, not three quarters."""
    tok = Tokenizer.train([f"line {i} of words" for i in range(200)], 600)
    docs = [[f"long doc line {i}" for i in range(300)]] + [[f"short doc {d} line {i}" for i in range(10)]
                                                            for d in range(9)]
    tokens = [t for doc in docs for t in [tok.bos_id] + tok.encode("\n".join(doc))]
    write_shard(str(tmp_path / "val_000.bin"), tokens, tok.n_words, tok.bos_id, tok.fingerprint())
    (tmp_path / "meta.json").write_text(json.dumps({"val": {"shards": ["val_000.bin"]}}))
    task = scaling.next_line_task(str(tmp_path), tok, 60, context=16)
    long = sum(tok.decode(task[q][1][task[q][3]]).startswith("long") for q in range(len(task)))
    assert len(task) == 60 and 2 <= long <= 12, long


def test_score_task_is_each_choice_scored_alone(lined_corpus):
    """Batched and padded, the NLL per character of each choice is the one of its own forward pass; accuracy is
    the share of questions whose right line has the least of it."""
    path, tok = lined_corpus
    task = scaling.next_line_task(str(path / "shards"), tok, 30, choices=4, context=24)
    torch.manual_seed(0)
    model = Transformer(scaling.model_args(32, tok.n_words, 64)).eval()
    nll, right = scaling.score_task(model, task, batch=7)   # (batches that split questions)
    per_char = torch.zeros(len(task), 4)
    with torch.no_grad():
        for q, (context, options, chars, *_) in enumerate(task):
            for c, ids in enumerate(options):
                logits = model(torch.tensor([context + ids]))[0, len(context) - 1:-1].double()
                per_char[q, c] = -logits.log_softmax(-1)[torch.arange(len(ids)), ids].sum() / chars[c]
    answer = torch.tensor([r for _, _, _, r, _ in task])
    assert np.abs(nll - per_char[torch.arange(len(task)), answer].numpy()).max() < 1e-5   # (per question)
    assert (right == (per_char.argmin(1) == answer).numpy()).all()


def test_forecast_prints_the_two_steps(lined_corpus, tmp_path, capsys):
    """forecast() on runs saved as checkpoints: each scored as score_task scores it, the compute-optimal NLL, the
    power law, the sigmoid, a --more_models model tested against it then fitted with the runs, the predictions."""
    path, tok = lined_corpus
    curves = {}
    for budget, seed in ((1e9, 0), (1e10, 3)):
        for i, tokens in enumerate((1000, 2000, 4000)):
            torch.manual_seed(seed + i)
            out = str(tmp_path / f"run{budget:.0e}_{i}")
            save_model(Transformer(scaling.model_args(16, tok.n_words, 64)), out, str(path / "tok.model"))
            curves.setdefault(budget, []).append((tokens, 5.0 - i % 2, out))
    more = str(tmp_path / "more")
    save_model(Transformer(scaling.model_args(24, tok.n_words, 64)), more, str(path / "tok.model"))
    a = scaling.argparse.Namespace(data=str(path / "shards"), tokenizer=str(path / "tok.model"), questions=60,
                                   seq_len=48, more_models=[more], predict=[1e12])
    scaling.forecast(a, tok, curves, [(1e9, 1500), (1e10, 3000)])
    printed = capsys.readouterr().out
    task = scaling.next_line_task(a.data, tok, 60, context=24)
    nll, right = scaling.score_task(scaling.load_model(curves[1e9][0][2]), task)
    assert f"1,000 tokens: NLL {nll.mean():.4f}, accuracy {right.mean():.3f}" in printed
    assert re.search(r"1\.0e\+09: NLL [\d.]+ ± [\d.]+ at 1,500 tokens", printed), printed
    assert re.search(r"NLL\*\(C\) = [\d.e+-]+ \* C\^-?[\d.]+   \(exponent ± [\d.]+\)", printed), printed
    assert "(through the 6 runs)" in printed
    nll, right = scaling.score_task(scaling.load_model(more), task)
    assert re.search(rf"more: NLL {nll.mean():.4f}, accuracy {right.mean():.3f} ± [\d.]+; the sigmoid said [\d.]+ ± "
                     r"[\d.]+; measured - said [+-][\d.]+ ± [\d.]+", printed), printed
    assert "(through all 7 models)" in printed
    assert re.search(r"at 1\.0e\+12 FLOPs: NLL [\d.]+ ± [\d.]+, accuracy [\d.]+ ± [\d.]+", printed), printed


def test_more_models_are_checked_before_the_sweep(lined_corpus, tmp_path):
    """Another tokenizer's model, or a folder with no model, stops scaling.py at once, in one line naming it."""
    path, tok = lined_corpus
    other = tmp_path / "other"
    Tokenizer.train(["something else entirely"] * 20, 600).save(str(tmp_path / "other.model"))
    save_model(Transformer(scaling.model_args(16, tok.n_words, 64)), other, str(tmp_path / "other.model"))
    cmd = [sys.executable, "scaling.py", "--data", str(path / "shards"), "--tokenizer", str(path / "tok.model"),
           "--out_dir", str(tmp_path / "runs"), "--more_models"]
    for where, said in ((other, "trained with another tokenizer"), (tmp_path / "nothing", "no such folder")):
        r = subprocess.run(cmd + [str(where)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and f"--more_models {where}: " in r.stderr and said in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "runs").exists()


def test_missing_data_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "scaling.py", "--data", str(tmp_path / "nowhere")], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "nowhere: not there" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_hand_edited_meta_json_is_one_line(lined_corpus, tmp_path):
    """A data folder whose meta.json lost its "val" (edited by hand) was a KeyError traceback, after the tokenizer
    was read; now one line naming the file and the key, before the sweep."""
    path, _ = lined_corpus
    meta = json.loads((path / "shards" / "meta.json").read_text())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "val"}))
    r = subprocess.run([sys.executable, "scaling.py", "--data", str(tmp_path / "data"), "--tokenizer",
                        str(path / "tok.model"), "--out_dir", str(tmp_path / "runs")], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "meta.json: not a meta.json of data.py (KeyError: 'val.shards')" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "runs").exists()


# --- from a review (2026-11-28) ---------------------------------------------------------------------------------

def test_predicted_parameters_are_the_models_that_spend_the_budget(lined_corpus, tmp_path, monkeypatch,
                                                                          capsys):
    """The sweep's C is flops_per_token * D = (6N + attention) D, so the model that spends C on the law's D* tokens
    has N = (C / D* - attention) / 6 parameters, not C / (6 D*). Synthetic IsoFLOP curves (train.py faked) whose
    minimum is exactly the width-32 run at both budgets: --predict at the first budget must name that model."""
    path, tok = lined_corpus
    seq_len, batch = 256, 8

    def fake_train(cmd, **kw):   # writes the log.csv train.py would, with a loss whose minimum is at width 32
        arg = lambda name: cmd[cmd.index(name) + 1]   # noqa: E731
        out, steps = arg("--out_dir"), int(arg("--max_steps"))
        budget = float(os.path.basename(out).split("_")[0][1:])
        tokens = steps * batch * seq_len
        best = round(budget / scaling.flops_per_token(scaling.model_args(32, tok.n_words, seq_len)) / batch
                     / seq_len) * batch * seq_len
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "log.csv"), "w") as f:
            f.write("step,train_loss,val_loss\n"
                    f"{steps},,{0.3 * (math.log(tokens) - math.log(best)) ** 2 + 5 - math.log10(budget) / 10}\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(scaling.subprocess, "run", fake_train)
    monkeypatch.setattr(sys, "argv", ["scaling.py", "--data", str(path / "shards"), "--tokenizer",
                                      str(path / "tok.model"), "--out_dir", str(tmp_path / "runs"),
                                      "--budgets", "1e13", "1e14", "--dims", "8", "16", "32", "64", "128",
                                      "--min_steps", "1", "--max_steps", "0", "--questions", "0",
                                      "--predict", "1e13"])
    scaling.main()
    printed = capsys.readouterr().out
    tokens, params = re.search(r"at 1\.0e\+13 FLOPs: ([\d.e+]+) tokens, a model of ~([\d.e+]+) parameters",
                               printed).groups()
    model = Transformer(scaling.model_args(32, tok.n_words, seq_len))
    assert abs(float(tokens) / (round(1e13 / model.flops_per_token(seq_len) / 2048) * 2048) - 1) < 0.01
    n = model.num_params(exclude_embedding=False)   # (tied: the embedding is the output matmul, counted once)
    assert abs(float(params) / n - 1) < 0.05, (params, n)


def test_model_for_any_budget():
    """Past the widths a sweep tries (Llama 3's 3.8e25 FLOPs: 3.6e12 a token at its D*), the search widens on
    (it stopped at width 65,534, half the FLOPs); below the narrowest model, None (it said width 2, 10x over)."""
    width, n = scaling.model_for(3.6e12, 128256, 256)
    with torch.device("meta"):
        m = Transformer(scaling.model_args(32 * round(width / 32), 128256, 256))
    assert width > 65536 and abs(m.flops_per_token(256) / 3.6e12 - 1) < 2e-3 and abs(m.num_params() / n - 1) < 2e-3
    assert scaling.model_for(10, 8192, 256) is None
    assert scaling.model_for(1e22, 8192, 256) is None   # past 33M wide (building such a model overflowed torch)


@pytest.mark.parametrize("flag", ["--tokens_per_step 4096", "--batch 16", "--seq 128", "--model llama3.2-1b"])
def test_train_args_that_change_the_flops_are_refused(tmp_path, flag):
    """Each of these makes a run spend other FLOPs than the budget scaling.py counted (train.py: --tokens_per_step
    accumulates gradients to more tokens per step; argparse takes unique prefixes, so --batch is --batch_size and
    --seq is --seq_len, and the later flag wins; --model changes the FFN and more of the shape)."""
    r = subprocess.run([sys.executable, "scaling.py", "--data", str(tmp_path / "nowhere"), "--train_args", flag],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "scaling.py sets these" in r.stderr, (r.returncode, r.stderr)


@pytest.mark.parametrize("flags, said", [
    (["--dims", "16", "33"], "--dims must be even"),  # (an odd width: one head, of odd head_dim, which RoPE refuses)
    (["--budgets", "1", "--min_steps", "0"], "--min_steps must be >= 1"),  # (a run of no step: train.py refuses it)
    (["--predict=0"], "--predict must be finite and > 0"), (["--predict=inf"], "--predict must be finite and > 0")])
def test_bad_flags_are_refused_before_the_sweep(monkeypatch, capsys, tmp_path, flags, said):
    """Refused as the flags are read, not when the sweep reaches them, hours of runs later: an odd width was
    ModelArgs' traceback there, --min_steps 0 a train.py run that refused --max_steps 0 and stopped the sweep,
    and --predict 0 or inf printed a nan forecast at the end."""
    monkeypatch.setattr(scaling.subprocess, "run", lambda cmd, **kw: pytest.fail(f"a run was started: {cmd}"))
    monkeypatch.setattr(sys, "argv", ["scaling.py", "--data", str(tmp_path), "--out_dir", str(tmp_path), *flags])
    with pytest.raises(SystemExit) as e:
        scaling.main()
    assert e.value.code == 2 and said in capsys.readouterr().err


# --- from a mutation check (2026-11-28): each test fails on a one-line change of scaling.py that the others missed

def test_model_for_inverts_the_family():
    """At a width of the family (even below 64, heads of 32 from there), the FLOPs of that width give back that
    width and its N exactly (the narrowest included, not None); between two neighbours, the width and N are the
    straight line between them; a little past 2^20 heads of 32 (33.6M wide) still a model, past 2^21 none."""
    def at(width):
        m = scaling.meta_model(scaling.model_args(width, 8192, 256))
        return m.flops_per_token(256), m.num_params()
    for width in (2, 6, 22, 64, 96, 160):
        flops, n = at(width)
        assert scaling.model_for(flops, 8192, 256) == pytest.approx((width, n), rel=1e-12), width
    (f6, n6), (f8, n8) = at(6), at(8)
    assert scaling.model_for((3 * f6 + f8) / 4, 8192, 256) == pytest.approx((6.5, (3 * n6 + n8) / 4), rel=1e-12)
    width, _ = scaling.model_for(1.01 * at(32 << 20)[0], 8192, 256)
    assert 32 << 20 < width < 32 << 21
    assert scaling.model_for(1.01 * at(32 << 21)[0], 8192, 256) is None


def test_final_val_loss_is_the_last_steps_of_a_finished_run(tmp_path):
    """The val loss of the row at the run's last step (rows without a val loss skipped); None when sweep.json holds
    other settings, when there is none or no log.csv, or when the log stops before the run's steps."""
    settings = {"steps": 30, "data": 1, "tokenizer": "t"}

    def run(name, sweep, log):
        (tmp_path / name).mkdir()
        if sweep is not None:
            (tmp_path / name / "sweep.json").write_text(json.dumps(sweep))
        if log is not None:
            (tmp_path / name / "log.csv").write_text("step,train_loss,val_loss\n" + log)
        return scaling.final_val_loss(str(tmp_path / name), settings)
    finished = "1,5.0,4.9\n10,4.0,\n20,3.5,3.6\n30,3.0,\n30,,3.25\n"
    assert run("done", settings, finished) == 3.25
    assert run("other", {**settings, "tokenizer": "u"}, finished) is None
    assert run("unfinished", None, finished) is None
    assert run("no_log", settings, None) is None
    assert run("killed", settings, "1,5.0,4.9\n10,4.0,\n20,3.5,3.6\n30,3.0,\n") is None
    assert run("no_val", settings, "30,3.0,\n") is None


def test_near_minimum_is_the_lowest_loss_and_two_either_side_by_tokens():
    """Handed in any order, the runs come back by tokens: the one of lowest loss and up to two either side of it,
    fewer at either end."""
    for best, kept in ((0, [0, 1, 2]), (1, [0, 1, 2, 3]), (4, [2, 3, 4, 5, 6]), (7, [5, 6, 7, 8]), (8, [6, 7, 8])):
        points = [(1000 * 2 ** i, 3.0 + abs(i - best), f"run{i}") for i in range(9)]
        random.Random(best).shuffle(points)
        assert [out for *_, out in scaling.near_minimum(points)] == [f"run{i}" for i in kept], best


def test_forecast_chain_on_scores_whose_answers_are_known():
    """Runs whose NLL is a parabola in log tokens near each budget's val-loss minimum (and far off it past the two
    either side), with vertex NLL 2 C^-0.05 at the minimum's tokens, and accuracies on a sigmoid (k 3, x0 1.1):
    the compute-optimal NLLs, the power law through them and its prediction, the sigmoid through the runs, what it
    says at a --more_models model off it, the miss, and the final fit through all of them, at the predicted NLL."""
    curves, scores, minima = {}, {}, []
    for budget in (1e9, 1e10, 1e11):
        best = 1e6 * budget / 1e9
        minima.append((budget, best))
        for k in range(-3, 4):
            out = f"C{budget:.0e}_{k}"
            curves.setdefault(budget, []).append((best * math.exp(k), 3.0 + abs(k), out))
            nll = 2 * budget ** -0.05 + (0.1 * k * k if abs(k) <= 2 else 5.0)
            scores[out] = (nll, float(scaling.sigmoid_accuracy(nll, 3.0, 1.1, 0.25)))
    scores["more"] = (0.5, 0.9)
    f = scaling.forecast_chain(scores, curves, minima, ["more"], [1e13, 1e14], 0.25)
    assert f["optimal"] == pytest.approx([2 * b ** -0.05 for b, _ in minima], rel=1e-9)
    assert (f["beta"], f["coef"]) == pytest.approx((-0.05, 2), rel=1e-9)
    assert f["nll"] == pytest.approx([2 * 1e13 ** -0.05, 2 * 1e14 ** -0.05], rel=1e-9)
    assert f["runs_fit"] == pytest.approx((3.0, 1.1), abs=1e-6)
    said = scaling.sigmoid_accuracy(0.5, 3.0, 1.1, 0.25)
    assert f["said"] == pytest.approx([said], abs=1e-6) and f["measured"] == pytest.approx([0.9])
    assert f["miss"] == pytest.approx([0.9 - said], abs=1e-6)
    fit = scaling.fit_sigmoid(*zip(*scores.values()), 0.25)   # (every model: the runs and "more")
    assert f["fit"] == pytest.approx(fit) and abs(fit[1] - 1.1) > 1e-3
    assert f["accuracy"] == pytest.approx(scaling.sigmoid_accuracy(f["nll"], *fit, 0.25))


def test_benchmark_bootstrap_of_two_documents():
    """Two documents, NLL 0 and 1 for all of their questions: a draw of two documents with replacement has mean NLL
    0, 1/2 or 1 with odds 1/4, 1/2, 1/4, a standard deviation of sqrt(1/8)."""
    pm = scaling.benchmark_bootstrap({"m": (np.repeat([0.0, 1.0], 5), np.zeros(10))}, lambda s: {"nll": s["m"][0]},
                                     np.repeat([7, 3], 5), draws=4000)
    assert pm["nll"] == pytest.approx(math.sqrt(1 / 8), rel=0.05)


def write_val_split(path, tok, docs):
    """A data folder whose val split is these documents (each a list of lines) -> its path."""
    tokens = [t for doc in docs for t in [tok.bos_id] + tok.encode("\n".join(doc))]
    path.mkdir()
    write_shard(str(path / "val_000.bin"), tokens, tok.n_words, tok.bos_id, tok.fingerprint())
    (path / "meta.json").write_text(json.dumps({"val": {"shards": ["val_000.bin"]}}))
    return str(path)


def test_next_line_task_asks_every_line_of_8_to_100_characters_once(tmp_path):
    """A val split of hand-made documents, more questions asked than it has lines: each line of 8 to 100 characters
    (stripped; 7 and 101 are out) but a document's first is asked once, and no other; a document with no such line
    is passed over; each choice is one of those lines. A val split of one document has no wrong lines to offer:
    no question."""
    tok = Tokenizer.train([f"line {i} of words" for i in range(200)], 600)
    val_split = lambda name, docs: write_val_split(tmp_path / name, tok, docs)   # noqa: E731
    docs = [["first line, never asked", "seven c", "    eight ch", "y" * 100, "z" * 101, "  nine char"],
            ["short", "lines", "only"],
            ["a first line", "b second line", "  c third line"],
            ["another first", "d fourth line", "e fifth line"]]
    task = scaling.next_line_task(val_split("docs", docs), tok, 100, context=16)
    asked = ["eight ch", "y" * 100, "nine char", "b second line", "c third line", "d fourth line", "e fifth line"]
    assert sorted(tok.decode(options[right]).strip() for _, options, _, right, _ in task) == sorted(asked)
    assert all(tok.decode(ids).strip() in asked for _, options, *_ in task for ids in options)
    assert scaling.next_line_task(val_split("one", docs[:1]), tok, 10, context=16) == []


def test_load_of_no_model_or_a_damaged_one_is_one_line(tmp_path):
    """A folder with no model (OSError) or a damaged one (CheckpointError, a ValueError: here a params.json that
    is no JSON) is a SystemExit naming it, not a traceback in the middle of the forecast."""
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "params.json").write_text("{not json")
    for name in ("nothing", "damaged"):
        with pytest.raises(SystemExit) as e:
            scaling.load(str(tmp_path / name))
        assert str(e.value).startswith("no model to score: ") and name in str(e.value), e.value


def test_next_line_task_looks_long_enough_for_wrong_lines(tmp_path):
    """One document of 40 lines and three of one line each: a question on the long one needs all three short ones'
    lines as its wrong choices, each 1 in 43 of the lines drawn from: 200 draws find them (for 36 of its 40 lines
    here), 20 draws did for 1."""
    tok = Tokenizer.train([f"line {i} of words" for i in range(200)], 600)
    docs = [["a first line"] + [f"long document line {i}" for i in range(40)]] + [
        ["a first line", f"short document {d}"] for d in range(3)]
    task = scaling.next_line_task(write_val_split(tmp_path / "data", tok, docs), tok, 100, context=16)
    assert sum(document == 0 for *_, document in task) >= 30


def test_next_line_task_offers_no_choice_twice(tmp_path):
    """Where most lines of the val split are one line repeated (in several documents, and twice in each), a
    question's four choices are still four different lines."""
    tok = Tokenizer.train([f"line {i} of words" for i in range(200)], 600)
    docs = [["a first line"] + [f"question line {i}" for i in range(10)]] + [
        ["a first line", "the same line", "the same line", f"one more line {d}"] for d in range(6)]
    task = scaling.next_line_task(write_val_split(tmp_path / "data", tok, docs), tok, 100, context=16)
    assert len(task) > 10 and all(len({tok.decode(ids).strip() for ids in options}) == 4 for _, options, *_ in task)


def test_sigmoid_fit_keeps_the_better_climb_and_climbs_to_the_peak():
    """Two cases from random small ones where the fit's details showed. Five models, all but the first at or below
    chance (of 388 questions): the peak is a step, the first model's own share there and chance past it; the climb
    from the flat start ends on a flat curve at chance (lower likelihood), so the better of the two ends must be
    kept. Three models of 133 questions: 200 steps reach the peak (scipy's Nelder-Mead: k 4.525, x0 0.800), 20 stop
    at k 4.39, x0 0.873."""
    nll = [0.569, 0.607, 1.794, 2.076, 2.438]
    k, x0 = scaling.fit_sigmoid(nll, np.array([107, 81, 86, 98, 97]) / 388, 0.25)
    assert scaling.sigmoid_accuracy(nll, k, x0, 0.25) == pytest.approx([107 / 388, 0.25, 0.25, 0.25, 0.25], abs=1e-3)
    k, x0 = scaling.fit_sigmoid([2.206, 2.323, 2.633], np.array([31, 39, 27]) / 133, 0.25)
    assert (k, x0) == pytest.approx((4.525, 0.800), abs=5e-3)
