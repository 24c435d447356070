"""Tests for train.py. Each runs train.py as a user would (a subprocess, or torchrun with 2 gloo processes) on a tiny
model and a tiny corpus that the module fixture makes in a temporary folder (its own tokenizer, its own shards).

The reference for everything is one uninterrupted single-process run: 2 processes (DDP or FSDP2) and gradient
accumulation must reproduce its losses, a run killed with SIGKILL or stopped with SIGTERM and resumed must
reproduce them exactly, and so on.

    python -m pytest -q tests/test_train.py
"""
import csv
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10
TINY = ["--dim", "32", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--seq_len", "32",
        "--lr", "1e-2", "--warmup_steps", "2", "--max_steps", str(STEPS), "--eval_interval", "5",
        "--eval_tokens", "256", "--ckpt_interval", "4", "--log_interval", "1", "--sample_tokens", "0",
        "--max_minutes", "0"]
WORDS = ("the a one every cat dog bird fish sat ran flew swam on under over near mat tree pond roof big small red "
         "blue old young quickly slowly and then but so").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~200 short documents of random sentences -> a 600-token tokenizer -> train/val shards."""
    from data import prepare_data
    from tokenizer import Tokenizer
    root = tmp_path_factory.mktemp("corpus")
    (root / "docs").mkdir()
    rng = random.Random(0)
    texts = []
    for i in range(200):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "."
                     for _ in range(rng.randint(4, 10))]
        texts.append(" ".join(sentences))
        (root / "docs" / f"{i:03d}.txt").write_text(texts[-1])
    Tokenizer.train(texts, 600).save(str(root / "tok.model"))
    prepare_data(str(root / "docs"), str(root / "tok.model"), str(root / "shards"), val_fraction=0.1, num_proc=1,
                 verbose=False)
    return root


def command(corpus, out, *extra, nproc=1, dtype="float32"):
    """fp32 unless asked (dtype None: train.py's default): 1 and 2 processes agree to 1e-4 then, while bf16's
    rounding of the activations depends on the batch's shape (2 x 2 vs 1 x 4 rows: ~1e-4 apart at step 4)."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    return launcher + ["train.py", "--data", str(corpus / "shards"), "--tokenizer", str(corpus / "tok.model"),
                       "--out_dir", str(out), *TINY, *(["--dtype", dtype] if dtype else []), *extra]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("RANK", None)  # a plain run must not think it is under torchrun
    return e


def train(corpus, out, *extra, nproc=1, ok=True, dtype="float32"):
    r = subprocess.run(command(corpus, out, *extra, nproc=nproc, dtype=dtype), cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=300)
    if ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def start_and_interrupt(corpus, out, at_step, sig, dtype="float32", times=1):
    """Start a run like the reference, and send `sig` (`times` times) once it has printed the line of step
    `at_step`."""
    p = subprocess.Popen(command(corpus, out, "--batch_size", "4", dtype=dtype), cwd=ROOT, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith(f"step {at_step:5d} |"):
            for i in range(times):
                time.sleep(0.3 if i else 0)  # apart, or the OS merges them into one
                p.send_signal(sig)
            break
    rest, _ = p.communicate(timeout=120)
    return p.returncode, "".join(lines) + rest


def log_rows(out):
    with open(os.path.join(out, "log.csv"), newline="") as f:
        return list(csv.DictReader(f))


def losses(out, column="train_loss"):
    return {int(r["step"]): float(r[column]) for r in log_rows(out) if r[column]}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One uninterrupted single-process run, batch 4: the reference of every test below."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(corpus, out, "--batch_size", "4")
    return out


def test_loss_goes_down_and_the_model_is_exported(corpus, reference):
    from data import PackedLoader
    from model import PRESETS, Transformer, load_model
    loss, val = losses(reference), losses(reference, "val_loss")
    assert sorted(loss) == list(range(STEPS)) and sorted(val) == [0, 5, 10]
    assert loss[0] == pytest.approx(math.log(600), abs=0.3)  # random init: about uniform over the vocabulary
    # and exactly the seeded fresh model's loss on the loader's first batch under the document mask (without the
    # mask the packed documents would see each other: another number)
    torch.manual_seed(1337)
    fresh = Transformer(dataclasses.replace(PRESETS["cpu"], dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                            vocab_size=600, max_seq_len=32))
    x, y, d = PackedLoader(corpus / "shards", "train", 4, 32, seed=1337).next_batch()
    with torch.no_grad():
        masked, unmasked = fresh(x, y, doc_ids=d).item(), fresh(x, y).item()
    assert loss[0] == pytest.approx(masked, abs=1e-5) and abs(masked - unmasked) > 1e-4
    assert loss[STEPS - 1] < loss[0] - 1.0 and val[10] < val[0] - 1.0
    rows = log_rows(reference)
    bpb = {int(r["step"]): float(r["val_bpb"]) for r in rows if r["val_bpb"]}
    meta = json.load(open(corpus / "shards" / "meta.json"))["val"]
    assert bpb[10] == pytest.approx(val[10] / math.log(2) * meta["tokens"] / meta["bytes"], rel=1e-4)
    # warmup, then cosine down to lr / 10 (the lr column is the one used at each step)
    lr = {int(r["step"]): float(r["lr"]) for r in rows if r["lr"]}
    assert lr[0] == pytest.approx(0.5e-2) and lr[1] == pytest.approx(1e-2)
    cosine = {s: 1e-3 + 0.5 * (1 + math.cos(math.pi * (s - 1) / (STEPS - 2))) * (1e-2 - 1e-3) for s in range(1, STEPS)}
    assert {s: lr[s] for s in cosine} == pytest.approx(cosine, rel=1e-3)
    # Meta's layout, loadable, and the exported weights are the trained ones: they give the final val loss
    for name in ("params.json", "consolidated.00.pth", "tokenizer.model", "log.csv", "train_args.json"):
        assert os.path.exists(reference / name), name
    assert json.load(open(reference / "train_args.json"))["max_steps"] == STEPS  # the run's flags, readable
    assert open(reference / "loss.svg").read().count("<polyline") == 2
    model = load_model(reference)
    assert model.args.dim == 32 and model.args.vocab_size == 600 and model.args.max_seq_len == 32
    val_loader = PackedLoader(corpus / "shards", "val", 4, 32, seed=1337)  # train.py's eval: 256 tokens, 2 batches
    with torch.no_grad():
        val_loss = sum(model(x, y, doc_ids=d).item() for x, y, d in (val_loader.next_batch() for _ in range(2))) / 2
    assert val_loss == pytest.approx(val[10], abs=1e-5)
    assert sorted(os.listdir(reference / "ckpt")) == ["step_000008", "step_000010"]  # the last two are kept


def test_each_step_is_adamw_written_out_by_hand(corpus, reference):
    """The reference's 10 steps against the recipe of train.py's docstring, written out here: the seeded fresh model on
    the loader's batches, the global gradient norm clipped to 1.0, AdamW (betas 0.9 / 0.95, eps 1e-8, decoupled weight
    decay 0.1 on the matrices only: linears and the embedding, not the norm gains) at the warmup + cosine lr. Each
    logged loss and gradient norm is the hand loop's (no test above looks inside a step: the reference would carry a
    lost zero_grad, other betas, or decay on the norms, into every run it is compared with)."""
    from data import PackedLoader
    from model import PRESETS, Transformer
    torch.manual_seed(1337)
    model = Transformer(dataclasses.replace(PRESETS["cpu"], dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                            vocab_size=600, max_seq_len=32))
    loader = PackedLoader(corpus / "shards", "train", 4, 32, seed=1337)
    params = list(model.parameters())
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    got, norms = {}, {}
    for step in range(STEPS):
        t = step + 1
        lr = 1e-2 * t / 2 if t < 2 else 1e-3 + 0.5 * (1 + math.cos(math.pi * (t - 2) / (STEPS - 2))) * 9e-3
        x, y, d = loader.next_batch()
        loss = model(x, y, doc_ids=d)
        grads = torch.autograd.grad(loss, params)
        norm = math.sqrt(sum((g * g).sum().item() for g in grads))
        got[step], norms[step] = loss.item(), norm
        with torch.no_grad():
            for p, g, mm, vv in zip(params, grads, m, v):
                g = g * min(1.0, 1.0 / (norm + 1e-6))
                if p.dim() >= 2:
                    p.mul_(1 - lr * 0.1)
                mm.mul_(0.9).add_(g, alpha=0.1)
                vv.mul_(0.95).addcmul_(g, g, value=0.05)
                p.sub_(lr * (mm / (1 - 0.9 ** t)) / ((vv / (1 - 0.95 ** t)).sqrt() + 1e-8))
    assert losses(reference) == pytest.approx(got, abs=1e-5)   # (fused vs this loop: ~1e-6 apart at step 9)
    assert losses(reference, "grad_norm") == pytest.approx(norms, abs=1e-4)   # (logged to 4 decimals)


@pytest.mark.parametrize("nproc", [1, 2])
def test_eval_reads_a_small_val_split_once(corpus, tmp_path, nproc):
    """--eval_tokens past the val split's size: the evaluation reads each of its whole global batches once (it read
    on into the split's next epochs, counting windows twice: a review found it, for a mix's small folder). Under DDP
    a global batch is every rank's rows (n_windows // batch_size, one rank's, passed the single process's case)."""
    from data import PackedLoader
    from model import load_model
    train(corpus, tmp_path / "out", "--max_steps", "1", "--eval_tokens", "100000", "--batch_size", "3", nproc=nproc)
    rows = 3 * nproc   # (44 windows: 14 batches of 3, 2 left; 7 of 6, 2 left)
    val_loader = PackedLoader(corpus / "shards", "val", rows, 32, seed=1337)
    model = load_model(tmp_path / "out")
    with torch.no_grad():
        batches = [val_loader.next_batch() for _ in range(val_loader.n_windows // rows)]
        val_loss = sum(model(x, y, doc_ids=d).item() for x, y, d in batches) / len(batches)
    assert val_loss == pytest.approx(losses(tmp_path / "out", "val_loss")[1], abs=1e-5)


def test_default_dtype_is_bf16_where_the_cpu_has_it(corpus, reference, tmp_path):
    """Without --dtype, a CPU with bf16 matrix instructions trains under bf16 autocast (fp32 weights): the losses
    follow the fp32 reference's closely, the exported weights give the logged val loss under the same autocast, and
    a run killed and resumed repeats the losses exactly, as in fp32."""
    from data import PackedLoader
    from model import bf16_matmuls, load_model
    train(corpus, tmp_path, "--batch_size", "4", dtype=None)
    has_bf16 = bf16_matmuls(torch.device("cpu"))
    dtype = json.load(open(tmp_path / "train_args.json"))["dtype"]
    assert dtype == ("bfloat16" if has_bf16 else "float32")
    got, ref, val = losses(tmp_path), losses(reference), losses(tmp_path, "val_loss")
    assert got[STEPS - 1] < got[0] - 1.0
    assert got == pytest.approx(ref, rel=1e-2) and (got != ref) == has_bf16   # close, and not fp32's exactly
    model = load_model(tmp_path)
    loader = PackedLoader(corpus / "shards", "val", 4, 32, seed=1337)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        val_loss = sum(model(x, y, doc_ids=d).item() for x, y, d in (loader.next_batch() for _ in range(2))) / 2
    assert val_loss == pytest.approx(val[10], abs=1e-5)
    killed = tmp_path / "killed"
    code, output = start_and_interrupt(corpus, killed, 6, signal.SIGKILL, dtype=None)
    assert code == -signal.SIGKILL, output
    train(corpus, killed, "--batch_size", "4", "--resume", dtype=None)
    assert losses(killed) == got


@pytest.mark.parametrize("mode", ["accumulation", "ddp", "fsdp"])
def test_same_losses_as_one_process(corpus, reference, tmp_path, mode):
    """Global batch of 4 sequences: 2 micro-steps of 2, or 2 gloo processes of 2 (DDP / FSDP2), vs 1 x 4."""
    if mode == "accumulation":
        train(corpus, tmp_path, "--batch_size", "2", "--tokens_per_step", str(4 * 32))
    else:
        # FSDP2 with activation checkpointing too: recomputing the blocks in backward changes nothing
        r = train(corpus, tmp_path, "--batch_size", "2", *(["--fsdp", "--act_ckpt"] if mode == "fsdp" else []),
                  nproc=2)
        # it ran as asked (a --fsdp that fell back to DDP, or a lost --act_ckpt, would give the same losses)
        assert ("2 process(es) on cpu, FSDP2, activation checkpointing in 2 blocks" if mode == "fsdp" else
                "2 process(es) on cpu, DDP") in r.stdout, r.stdout
    # and the gradient norm each step clipped: a backward of the unscaled micro-batch losses (2x the gradient, with
    # the logged loss right) moved the losses by < 5e-4, as AdamW hardly sees a gradient's scale
    for column in ("train_loss", "val_loss", "grad_norm"):
        ref, got = losses(reference, column), losses(tmp_path, column)
        assert sorted(got) == sorted(ref)
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=2e-4), (column, step)   # (norm: 4 decimals)
    # and the exported weights agree
    a, b = (torch.load(d / "consolidated.00.pth") for d in (reference, tmp_path))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)


def test_killed_run_resumes_exactly(corpus, reference, tmp_path):
    code, output = start_and_interrupt(corpus, tmp_path, 6, signal.SIGKILL)  # the last checkpoint: step 4 (or 8)
    assert code == -signal.SIGKILL, output
    r = train(corpus, tmp_path, "--batch_size", "4", "--resume")
    assert re.search(r"resumed from .*step_00000[48] at step [48]", r.stdout), r.stdout
    assert losses(tmp_path) == losses(reference)  # exactly: same batches, same optimizer state, same order
    assert losses(tmp_path, "val_loss") == losses(reference, "val_loss")
    # and the log is the reference's row for row: the resumed step's rows written once, not kept from before the kill
    # too (the dicts above would hide a second row of a step)
    rows = [[[r[k] for k in ("step", "train_loss", "val_loss", "val_bpb", "lr", "grad_norm")] for r in log_rows(out)]
            for out in (tmp_path, reference)]
    assert rows[0] == rows[1]


def test_sigterm_saves_and_resumes_exactly(corpus, reference, tmp_path):
    # twice, as under Slurm + torchrun (the scheduler's copy and torchrun's): the second must not quit unsaved
    code, output = start_and_interrupt(corpus, tmp_path, 2, signal.SIGTERM, times=2)
    assert code == 0, output
    stop = int(re.search(r"stopped by signal SIGTERM at step (\d+)", output).group(1))  # 3 unless the signal was slow
    assert 3 <= stop < STEPS and os.path.exists(tmp_path / "ckpt" / f"step_{stop:06d}" / "manifest.json")
    train(corpus, tmp_path, "--batch_size", "4", "--resume")
    assert losses(tmp_path) == losses(reference)


KILLED_WHILE_SAVING = """
import os
import torch.distributed.checkpoint as dcp
save = dcp.save
def save_then_die(*a, checkpoint_id=None, **k):  # step 8's weights written, its state.pt and manifest not yet
    save(*a, checkpoint_id=checkpoint_id, **k)
    if "step_000008" in str(checkpoint_id):
        os.kill(os.getpid(), 9)
dcp.save = save_then_die
"""


def test_a_run_killed_while_saving_resumes_from_the_checkpoint_before(corpus, reference, tmp_path):
    """SIGKILL in the middle of step 8's save: the half-written checkpoint is not under the name --resume looks for,
    so --resume goes on from step 4 to the reference's losses, and the leftover is cleared (a checkpoint written in
    place, without the rename, stopped --resume at step 8's folder: "not a complete checkpoint")."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(KILLED_WHILE_SAVING)
    run = tmp_path / "run"
    r = subprocess.run(command(corpus, run, "--batch_size", "4"), cwd=ROOT, capture_output=True, text=True,
                       env=dict(env(), PYTHONPATH=str(tmp_path / "site")), timeout=300)
    assert r.returncode == -signal.SIGKILL and "saved" in r.stdout and "step 8: saved" not in r.stdout, r.stdout
    # (saving every 3 steps from here: no later save at step 8 takes the leftover's place)
    r = train(corpus, run, "--batch_size", "4", "--resume", "--ckpt_interval", "3")
    assert re.search(r"resumed from .*step_000004 at step 4", r.stdout), r.stdout
    assert losses(run) == losses(reference)
    assert sorted(os.listdir(run / "ckpt")) == ["step_000009", "step_000010"]


def test_corrupt_checkpoint_is_refused_and_the_previous_one_works(corpus, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shard = run / "ckpt" / "step_000010" / "__0_0.distcp"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    shard.write_bytes(bytes(blob))
    r = train(corpus, run, "--batch_size", "4", "--resume", ok=False)
    assert r.returncode != 0
    assert "corrupt checkpoint" in r.stderr and str(shard) in r.stderr and "step_000008" in r.stderr, r.stderr
    assert shard.exists() and (run / "ckpt" / "step_000008").exists()  # nothing deleted
    # the previous checkpoint still resumes and reproduces the reference
    train(corpus, run, "--batch_size", "4", "--resume", str(run / "ckpt" / "step_000008"))
    assert losses(run) == losses(reference)


def test_a_shard_with_a_flipped_bit_is_refused(corpus, tmp_path):
    """One token's low bit flipped in a copy of the shards: still a valid id (the loader's range check passes it),
    so only the CRC-32 in meta.json tells; the run stops before training, naming the shard."""
    shutil.copytree(corpus / "shards", tmp_path / "shards")
    shard = tmp_path / "shards" / "train_000.bin"
    blob = bytearray(shard.read_bytes())
    at = 64 + 4 * ((len(blob) - 64) // 8)  # a token in the middle
    blob[at] ^= 1
    assert int.from_bytes(blob[at:at + 4], "little") < 600  # (the tokenizer's ids)
    shard.write_bytes(bytes(blob))
    r = subprocess.run(command(corpus, tmp_path / "out", "--data", str(tmp_path / "shards"), "--max_steps", "1"),
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and f"{tmp_path / 'shards'}: train_000.bin not as data.py wrote" in r.stderr, \
        r.stdout + r.stderr
    assert not (tmp_path / "out" / "log.csv").exists()  # stopped before any step


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(corpus, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = sorted(os.listdir(run / "ckpt"))
    # an absurd learning rate: the update after step 10 overflows, so step 11's loss is not finite
    r = train(corpus, run, "--batch_size", "4", "--resume", "--max_steps", "20", "--lr", "1e30",
              "--warmup_steps", "0", ok=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "step 11: loss" in r.stderr and "step_000010" in r.stderr, r.stderr
    assert sorted(os.listdir(run / "ckpt")) == before  # no checkpoint of the broken weights
    assert max(losses(run)) == 10  # step 11 never logged as a training step
    train(corpus, run, "--batch_size", "4", "--resume", "--max_steps", "11")  # the kept checkpoint loads


def test_checkpoints_of_another_run_never_come_back(corpus, reference, tmp_path):
    """A fresh run in an out_dir that holds an older run's later checkpoints replaces them (else --resume would
    go back to that run); resuming at or past --max_steps ends at once."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)  # checkpoints at steps 8 and 10
    r = train(corpus, run, "--batch_size", "4", "--resume", "--max_steps", "8")  # at step 10 already: no step taken
    assert max(losses(run)) == STEPS - 1
    assert "was trained on another schedule: --max_steps 8 (was 10)" in r.stdout, r.stdout  # said, not silent
    train(corpus, run, "--batch_size", "4", "--max_steps", "5", "--seed", "7")  # a fresh run, another seed
    assert sorted(os.listdir(run / "ckpt")) == ["step_000004", "step_000005"]
    r = train(corpus, run, "--batch_size", "4", "--resume", "--max_steps", "6", "--seed", "7")
    assert "at step 5" in r.stdout and max(losses(run)) == 5, r.stdout
    # they go when the fresh run starts, not at its first save: a run that dies before then (here: its loss turns
    # NaN at step 1) leaves nothing for --resume to go back to
    r = train(corpus, run, "--batch_size", "4", "--lr", "1e30", "--warmup_steps", "0", ok=False)
    assert r.returncode == 1 and "removed 2 checkpoint(s) after step 0" in r.stdout, r.stdout + r.stderr
    assert os.listdir(run / "ckpt") == []


def test_resume_takes_this_commands_weight_decay(corpus, reference, tmp_path):
    """The optimizer's saved groups bring back their weight decay; the flag given on resume must win, as --lr does."""
    shutil.copytree(reference, tmp_path / "run")
    train(corpus, tmp_path / "run", "--batch_size", "4", "--resume", str(tmp_path / "run" / "ckpt" / "step_000008"),
          "--weight_decay", "30")
    ref, run = losses(reference), losses(tmp_path / "run")
    assert [run[s] for s in range(9)] == [ref[s] for s in range(9)] and run[9] != ref[9]


def test_bad_flags_and_mismatched_checkpoints_are_refused(corpus, reference, tmp_path):
    r = train(corpus, tmp_path, "--eval_interval", "0", ok=False)
    assert r.returncode == 2 and "--eval_interval must be at least 1" in r.stderr
    r = subprocess.run([sys.executable, "train.py", "--data", str(corpus / "shardz"), "--tokenizer",
                        str(corpus / "tok.model"), "--out_dir", str(tmp_path), *TINY], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)  # a typo: not built from the stdlib
    assert r.returncode == 1 and f"--data {corpus / 'shardz'} not found" in r.stderr, r.stderr
    assert not (corpus / "shardz").exists()
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    r = train(corpus, run, "--batch_size", "4", "--resume", "--dim", "64", ok=False)
    assert r.returncode == 1 and "holds another model: dim 32 there, 64 here" in r.stderr, r.stderr
    r = train(corpus, run, "--batch_size", "4", "--resume", "--seed", "7", ok=False)
    assert r.returncode == 1 and "step_000010: its data position does not fit this run (loader state has seed=1337" \
        in r.stderr, r.stderr
    for flags, what in ((["--grad_clip", "-1"], "--grad_clip must be > 0"), (["--seq_len", "0"], "--seq_len must be"),
                        (["--warmup_steps", "-5"], "--warmup_steps must be >= 0"),
                        (["--init", str(reference), "--model", "llama3-8b"], "--init takes the shape"),
                        (["--init", str(tmp_path)], "is --init's folder: this run would delete")):
        r = train(corpus, tmp_path, *flags, ok=False)
        assert r.returncode == 2 and what in r.stderr, r.stderr
    r = train(corpus, tmp_path / "init", "--init", str(reference), "--dim", "64", ok=False)
    assert r.returncode == 1 and "gives the model's shape: --dim 64 (it has 32)" in r.stderr, r.stderr
    log = (run / "log.csv").read_text()
    (run / "log.csv").write_text(log.replace("\n3,", "\n3,x", 1))   # one damaged number: refused before any work
    r = train(corpus, run, "--batch_size", "4", "--resume", str(run / "ckpt" / "step_000008"), ok=False)
    assert r.returncode == 1 and "log.csv: not a log.csv of train.py (line " in r.stderr and "is no number" in \
        r.stderr and (run / "ckpt" / "step_000010").exists(), r.stderr   # (it died later, past the deletions)
    (run / "log.csv").write_text("garbage\nmore garbage\n")
    r = train(corpus, run, "--batch_size", "4", "--resume", ok=False)
    assert r.returncode == 1 and f"{run / 'log.csv'}: not a log.csv of train.py" in r.stderr, r.stderr
    r = train(corpus, run, "--resume", str(run / "ckpt" / "step_000009"), ok=False)
    assert r.returncode == 1 and "step_000009: no such checkpoint folder" in r.stderr, r.stderr
    r = train(corpus, run / "log.csv", ok=False)
    assert r.returncode == 1 and "log.csv is a file" in r.stderr, r.stderr
    for flags in (["--max_minutes", "nan"], ["--max_minutes", "inf"], ["--init", str(reference), "--rope_factor", "0"]):
        r = train(corpus, tmp_path, *flags, ok=False)   # (nan and inf: a run that never ended; 0: ignored)
        assert r.returncode == 2 and "(and finite)" in r.stderr, r.stderr
    shutil.copytree(corpus / "shards", tmp_path / "shards")
    (tmp_path / "shards" / "meta.json").write_text('{"version": 1, "con')
    r = subprocess.run(command(corpus, tmp_path / "out") + ["--data", str(tmp_path / "shards")], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and f"{tmp_path / 'shards' / 'meta.json'}: unreadable" in r.stderr, r.stderr
    # user errors found by following the README: each a one-line message before any work, no traceback
    for flags, what in (
            (["--seq_len", "2048"], f"{corpus / 'shards'}: val has"),  # the val split is ~1K tokens
            (["--tokenizer", str(tmp_path / "tok.model"), "--source", str(corpus / "docs")],
             f"--tokenizer {tmp_path / 'tok.model'} not found, but --data {corpus / 'shards'} is built"),
            (["--init", str(tmp_path / "nothere")], f"--init: {tmp_path / 'nothere'}: no such folder"),
            (["--init", str(reference / "ckpt" / "step_000010")], "a training checkpoint (what train.py --resume "
                                                                    "reads), not an exported model"),
            (["--dim", "36"], "head_dim=9 must be even"),
            (["--source", str(tmp_path / "nowhere"), "--data", str(tmp_path / "d"), "--tokenizer",
              str(tmp_path / "d" / "tok.model")], f"{tmp_path / 'nowhere'}")):
        r = train(corpus, tmp_path / "out", *flags, ok=False)
        assert r.returncode == 1 and what in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "tok.model").exists() and not (tmp_path / "out" / "log.csv").exists()
        assert not (tmp_path / "d").exists()   # (a source that fails leaves no folder behind)
    r = train(corpus, tmp_path / "new", "--resume", ok=False)  # a mistyped --out_dir: no empty folder left there
    assert r.returncode == 1 and f"--resume: no checkpoint in {tmp_path / 'new' / 'ckpt'}" in r.stderr, r.stderr
    assert not (tmp_path / "new").exists()


def test_shards_of_another_source_are_refused_and_edited_sources_flagged(corpus, tmp_path):
    """An existing --data folder is used as it is, never rebuilt by train.py: a --source it was not made from is an
    error, and a source whose files changed since is a warning (the run goes on with the old tokens)."""
    from data import prepare_data
    shutil.copytree(corpus / "docs", tmp_path / "docs")
    prepare_data(str(tmp_path / "docs"), str(corpus / "tok.model"), str(tmp_path / "shards"), num_proc=1,
                 verbose=False)

    def run(source):
        return subprocess.run([sys.executable, "train.py", "--data", str(tmp_path / "shards"), "--source", source,
                               "--tokenizer", str(corpus / "tok.model"), "--out_dir", str(tmp_path / "out"), *TINY,
                               "--max_steps", "1"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    r = run(str(corpus / "docs"))
    assert r.returncode == 1 and f"holds the tokens of {str(tmp_path / 'docs')!r}" in r.stderr, r.stderr
    (tmp_path / "data").mkdir()  # the default data/stdlib, made from another source: refused without a --source
    shutil.copytree(tmp_path / "shards", tmp_path / "data" / "stdlib")
    shutil.copy(corpus / "tok.model", tmp_path / "data" / "stdlib" / "tok.model")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--max_steps", "1"], cwd=tmp_path,
                       env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and f"holds the tokens of {str(tmp_path / 'docs')!r}, not of 'stdlib'" in r.stderr, \
        r.stdout + r.stderr
    r = run(str(tmp_path / "docs") + "/")  # the same folder, spelt differently
    assert r.returncode == 0 and "warning" not in r.stdout, r.stdout + r.stderr
    os.utime(tmp_path / "docs" / "007.txt", ns=(0, 0))
    r = run(str(tmp_path / "docs"))
    assert r.returncode == 0 and f"warning: {tmp_path / 'docs'}'s files changed" in r.stdout, r.stdout + r.stderr


SLOW_RANK_0 = """
import os
if "RANK" in os.environ:  # a torchrun worker: its process group times out after 5 s, and rank 0 builds slowly
    import time
    from datetime import timedelta
    import torch.distributed as dist
    init = dist.init_process_group
    def short_timeout(*a, **k):
        init(*a, timeout=timedelta(seconds=5), **k)
        import data  # (train.py has imported it by now)
        build = data.prepare_data
        data.prepare_data = lambda *a, **k: (time.sleep(8), build(*a, **k))[1]
    dist.init_process_group = short_timeout
"""


def test_ranks_wait_for_rank_0s_data_build_past_the_process_group_timeout(corpus, tmp_path):
    """Rank 0 alone tokenizes a --source while the other ranks wait: for a large source that takes hours, longer
    than the training group's timeout (NCCL's: 10 minutes). Here the group times out after 5 s and the build
    takes 8 s more: the run must still go through."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_RANK_0)
    cmd = command(corpus, tmp_path / "out", "--batch_size", "2", "--max_steps", "2", "--source", str(corpus / "docs"),
                  "--data", str(tmp_path / "shards"), "--tokenizer", str(tmp_path / "tok.model"), "--vocab_size",
                  "600", nproc=2)
    r = subprocess.run(cmd, cwd=ROOT, env=dict(env(), PYTHONPATH=str(tmp_path / "site")), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "tokenizing" in r.stdout and "exported" in r.stdout, \
        r.stdout[-3000:] + r.stderr[-3000:]


def test_init_continues_at_longer_context_with_rope_scaling(corpus, reference, tmp_path):
    """The long-context stage: start from the exported model at twice the context, RoPE scaled, WSD schedule."""
    train(corpus, tmp_path, "--batch_size", "2", "--init", str(reference), "--seq_len", "64", "--rope_factor", "2",
          "--max_steps", "4", "--schedule", "wsd", "--decay_frac", "1")
    params = json.load(open(tmp_path / "params.json"))
    assert params["context_len"] == 64 and params["use_scaled_rope"] and params["rope_scaling_factor"] == 2.0
    assert params["rope_original_context"] == json.load(open(reference / "params.json"))["context_len"]
    # the weights came from the reference: the first loss is far below a fresh model's ln(600) = 6.4
    assert losses(tmp_path)[0] < losses(reference)[0] - 1.0
    lr = {int(r["step"]): float(r["lr"]) for r in log_rows(tmp_path) if r["lr"]}
    # warmup, then linear decay to lr / 10: a decay of the whole run starts after the warmup, at the peak
    assert lr == pytest.approx({0: 0.5e-2, 1: 1e-2, 2: 0.55e-2, 3: 1e-3})
    # scaled twice, the second would re-anchor the first (Llama 3.1's 8192): refused
    r = train(corpus, tmp_path / "again", "--init", str(tmp_path), "--rope_factor", "2", ok=False)
    assert r.returncode == 1 and "scales its RoPE already (by 2.0 from a context of 32)" in r.stderr, r.stderr
    # a Hugging Face folder keeps Meta's tokenizer in original/: checked there too
    from tokenizer import Tokenizer
    hf = tmp_path / "hf"
    shutil.copytree(reference, hf, ignore=shutil.ignore_patterns("ckpt", "tokenizer.model"))
    (hf / "original").mkdir()
    Tokenizer.train(["other words entirely " * 40], 600).save(str(hf / "original" / "tokenizer.model"))
    r = train(corpus, tmp_path / "h", "--init", str(hf), ok=False)
    assert r.returncode == 1 and f"is not the tokenizer {hf} was trained with" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def second_source(corpus):
    """Another folder of shards with the same tokenizer: 60 documents of counting, not of animals."""
    from data import prepare_data
    rng, numbers = random.Random(1), "zero one two three four five six seven eight nine ten eleven twelve".split()
    (corpus / "numbers").mkdir()
    for i in range(60):
        counts = [" ".join(numbers[rng.randint(0, 6):][:rng.randint(3, 6)]).capitalize() + "." for _ in range(12)]
        (corpus / "numbers" / f"{i:02d}.txt").write_text(" ".join(counts))
    prepare_data(str(corpus / "numbers"), str(corpus / "tok.model"), str(corpus / "shards2"), val_fraction=0.1,
                 num_proc=1, verbose=False)
    return corpus / "shards2"


def test_data_mix_across_ranks_resume_and_annealing(corpus, reference, second_source, tmp_path):
    """--data A=3 B=1: rows drawn from both folders by share; the val loss and bits per byte weigh each folder's by
    its share; 2 processes take the rows of one; a resume goes on exactly; an annealing stage upsamples B."""
    mix = ["--data", f"{corpus / 'shards'}=3", f"{second_source}=1"]
    r = train(corpus, tmp_path / "mix", "--batch_size", "4", *mix)
    assert f"data mix: {corpus / 'shards'} 75.0% of the tokens" in r.stdout, r.stdout
    assert "epochs in this run" in r.stdout
    val = re.search(r"step 10: val loss ([\d.]+), ([\d.]+) bits per byte \(.*shards ([\d.]+), .*shards2 ([\d.]+)\)",
                    r.stdout)
    assert val, r.stdout
    loss, bpb, a, b = map(float, val.groups())
    assert loss == pytest.approx(0.75 * a + 0.25 * b, abs=2e-4) and abs(a - b) > 0.02  # (even shares: 5e-3 off)
    meta = [json.load(open(folder / "meta.json"))["val"] for folder in (corpus / "shards", second_source)]
    per_token = 0.75 * meta[0]["bytes"] / meta[0]["tokens"] + 0.25 * meta[1]["bytes"] / meta[1]["tokens"]
    assert bpb == pytest.approx(loss / math.log(2) / per_token, abs=2e-4)
    assert losses(tmp_path / "mix") != losses(reference)  # (the numbers are in the batches)
    ddp = tmp_path / "ddp"
    train(corpus, ddp, "--batch_size", "2", *mix, nproc=2)
    assert losses(ddp) == pytest.approx(losses(tmp_path / "mix"), rel=1e-4, abs=1e-4)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "mix", resumed)
    train(corpus, resumed, "--batch_size", "4", *mix, "--resume", str(resumed / "ckpt" / "step_000008"))
    assert losses(resumed) == losses(tmp_path / "mix")
    even = ["--batch_size", "4", "--data", f"{corpus / 'shards'}=1", f"{second_source}=1", "--ckpt_interval", "1"]
    r = train(corpus, resumed, *even, "--resume", str(resumed / "ckpt" / "step_000008"))  # Llama 3 changed its mix
    assert "note: the data mix changes at step 8: shares 75.0% / 25.0% -> 50.0% / 50.0%" in r.stdout, r.stdout
    before, after = losses(tmp_path / "mix"), losses(resumed)
    assert all(after[s] == before[s] for s in before if s < 8) and any(after[s] != before[s] for s in before if s > 8)
    again = tmp_path / "again"  # and once changed, a resume at the new shares goes on exactly, without a note
    shutil.copytree(resumed, again)
    r = train(corpus, again, *even, "--resume", str(again / "ckpt" / "step_000009"))
    assert "data mix changes" not in r.stdout and losses(again) == after
    # a share of 0, an eval-only folder: every row from the other, as in the reference (trained on it alone); its
    # own val loss printed, the headline val loss and bits per byte the reference's to the digit
    alone = ["--batch_size", "4", "--data", f"{corpus / 'shards'}=1", f"{second_source}=0"]
    r = train(corpus, tmp_path / "eval_only", *alone)
    assert f"data mix: {second_source} 0% of the tokens (evaluated only" in r.stdout, r.stdout
    val = re.search(r"step 10: val loss ([\d.]+), [\d.]+ bits per byte \(.*shards [\d.]+, .*shards2 ([\d.]+)\)",
                    r.stdout)
    assert val and abs(float(val[1]) - float(val[2])) > 0.02, r.stdout
    for column in ("train_loss", "val_loss", "val_bpb"):
        assert losses(tmp_path / "eval_only", column) == losses(reference, column), column
    # dropped on resume (a checkpoint's folders stay its folders): no row of it from there on, its count kept
    dropped = tmp_path / "dropped"
    shutil.copytree(tmp_path / "mix", dropped)
    r = train(corpus, dropped, *alone, "--resume", str(dropped / "ckpt" / "step_000008"))
    assert "shares 75.0% / 25.0% -> 100.0% / 0.0%" in r.stdout, r.stdout
    was, now = (torch.load(dropped / "ckpt" / f"step_{s:06d}" / "state.pt")["loader"]["taken"] for s in (8, 10))
    assert now == [was[0] + 2 * 4, was[1]] and was[1] > 0
    r = train(corpus, resumed, "--batch_size", "4", "--data", f"{second_source}=1", f"{corpus / 'shards'}=3",
              "--resume", ok=False)  # the folders are part of the position: not in another order
    assert r.returncode == 1 and "its data position does not fit this run (loader state has sources=" in r.stderr, \
        r.stderr
    r = train(corpus, resumed, "--batch_size", "4", "--resume", ok=False)  # the mix's checkpoint, one folder
    assert r.returncode == 1 and "loader state is of a data mix of 2 folders" in r.stderr, r.stderr
    # a run without a mix resumed with a folder added (a new source): its folder goes on, the new one from its start
    grown = tmp_path / "grown"
    shutil.copytree(reference, grown)
    r = train(corpus, grown, "--batch_size", "4", *mix, "--resume", str(grown / "ckpt" / "step_000008"))
    assert (f"shares 100.0% -> 75.0% / 25.0% (each folder goes on where it was, {second_source} new from its "
            "start;") in r.stdout, r.stdout
    before, after = losses(reference), losses(grown)
    assert all(after[s] == before[s] for s in before if s < 8) and any(after[s] != before[s] for s in before if s > 8)
    # and with the new folder at a share of 0 the run is the reference's to the digit: its own folder went on exactly
    shutil.rmtree(grown)
    shutil.copytree(reference, grown)
    r = train(corpus, grown, *alone, "--resume", str(grown / "ckpt" / "step_000008"))
    assert f"{second_source} new (evaluated only)" in r.stdout, r.stdout
    for column in ("train_loss", "val_loss", "val_bpb"):
        assert losses(grown, column) == losses(reference, column), column
    # the micro-batches may change (gradient accumulation, fewer processes): the same rows go on
    again = tmp_path / "accumulated"
    shutil.copytree(tmp_path / "mix", again)
    train(corpus, again, "--batch_size", "2", "--tokens_per_step", "128", *mix, "--resume",
          str(again / "ckpt" / "step_000008"))
    assert losses(again) == pytest.approx(losses(tmp_path / "mix"), rel=1e-4, abs=1e-4)
    shutil.copytree(corpus / "shards", tmp_path / "a=1")  # a folder with '=' in its name is taken whole
    r = train(corpus, tmp_path / "eq", "--data", str(tmp_path / "a=1"), "--max_steps", "1")
    assert "data mix" not in r.stdout
    # Llama 3's annealing (section 3.4.3): from the trained model, the lr straight down to 0 on an upsampled mix
    train(corpus, tmp_path / "anneal", "--batch_size", "4", "--init", str(reference), "--data",
          f"{corpus / 'shards'}=1", f"{second_source}=3", "--warmup_steps", "0", "--schedule", "wsd",
          "--decay_frac", "1", "--min_lr", "0", "--max_steps", "4")
    lr = {int(r["step"]): float(r["lr"]) for r in log_rows(tmp_path / "anneal") if r["lr"]}
    assert lr == pytest.approx({0: 0.75e-2, 1: 0.5e-2, 2: 0.25e-2, 3: 0.0})
    for flags, what in ((["--data", str(corpus / "shards"), str(second_source)], "give each folder of a mix its share"),
                        (["--data", f"{corpus / 'shards'}=x"], "a share is not a number"),
                        (["--data", f"{corpus / 'shards'}=1", f"{corpus / 'shards'}/=2"], "a folder named twice"),
                        (["--data", f"{corpus / 'shards'}=inf"], "a share must be a finite number >= 0, and one > 0"),
                        (["--data", f"{corpus / 'shards'}=0", f"{second_source}=0"], "and one > 0"),
                        ([*mix, "--source", str(corpus / "docs")], "--source builds one --data folder"),
                        (["--min_lr", "1"], "--min_lr within [0, --lr]")):
        r = train(corpus, tmp_path / "bad", *flags, ok=False)
        assert r.returncode == 2 and what in r.stderr, r.stderr


def test_average_of_the_last_steps_is_exported_and_resumes(corpus, reference, tmp_path):
    """--average_last 2 with a checkpoint every step: the export is the mean of the last two checkpoints' weights (the
    two kept), with its own val loss; resumed from the first of them, the same export to the bit; FSDP2's sharded
    average gives the same export as one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    def weights(ckpt):
        dcp_to_torch_save(ckpt, tmp_path / "full.pt")
        return torch.load(tmp_path / "full.pt")["model"]
    run, flags = tmp_path / "run", ["--batch_size", "4", "--ckpt_interval", "1", "--average_last", "2"]
    r = train(corpus, run, *flags)
    mean_val = re.search(r"the mean of the weights of the last 2 steps: val loss ([\d.]+)", r.stdout)
    assert mean_val, r.stdout
    exported = torch.load(run / "consolidated.00.pth")
    a, b = weights(run / "ckpt" / "step_000009"), weights(run / "ckpt" / "step_000010")
    for k, w in exported.items():
        torch.testing.assert_close(w, (a[k] + b[k]) / 2, rtol=0, atol=1e-6, msg=k)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # (two different weights)
    # the val loss said for the mean is the exported model's own (train.py's eval: 2 batches of 4), not step 10's
    from data import PackedLoader
    from model import load_model
    model, val_loader = load_model(run), PackedLoader(corpus / "shards", "val", 4, 32, seed=1337)
    with torch.no_grad():
        val_loss = sum(model(x, y, doc_ids=d).item() for x, y, d in (val_loader.next_batch() for _ in range(2))) / 2
    assert float(mean_val[1]) == pytest.approx(val_loss, abs=1e-4)   # (printed to 4 decimals)
    assert abs(val_loss - losses(run, "val_loss")[10]) > 1e-3   # (step 10's weights: another loss)
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    train(corpus, resumed, *flags, "--resume", str(resumed / "ckpt" / "step_000009"))
    again = torch.load(resumed / "consolidated.00.pth")
    assert all(torch.equal(again[k], w) for k, w in exported.items())
    train(corpus, tmp_path / "fsdp", "--batch_size", "2", "--average_last", "2", "--fsdp", nproc=2)
    for k, w in torch.load(tmp_path / "fsdp" / "consolidated.00.pth").items():
        torch.testing.assert_close(w, exported[k], rtol=1e-3, atol=1e-4, msg=k)
    r = train(corpus, resumed, "--batch_size", "4", "--resume", ok=False)
    assert r.returncode == 1 and "holds the mean of the weights since step 8 (--average_last 2 --max_steps 10): " \
        "resume with those two flags" in r.stderr, r.stderr
    # a checkpoint without an average: averaging may start after it (a longer run), not before it
    longer = tmp_path / "longer"
    shutil.copytree(reference / "ckpt" / "step_000008", longer / "ckpt" / "step_000008")  # (no --average_last)
    r = train(corpus, longer, "--batch_size", "4", "--resume", "--average_last", "4", ok=False)
    assert r.returncode == 1 and "is at step 8, past step 6 where --average_last 4 would start" in r.stderr, r.stderr
    r = train(corpus, longer, "--batch_size", "4", "--resume", "--average_last", "2", "--max_steps", "12")
    assert "the mean of the weights of the last 2 steps" in r.stdout, r.stdout
    for extra, what in ((["--average_last", "11"], "--average_last 11: more than the 10 steps"),
                        (["--average_last", "2", "--max_minutes", "1"], "give --max_steps, not --max_minutes")):
        r = train(corpus, tmp_path / "bad", *extra, ok=False)
        assert r.returncode == 2 and what in r.stderr, r.stderr


def test_compiled_blocks_train_like_eager_and_export_the_same_names(corpus, reference, tmp_path):
    """--compile (each block compiled in place by inductor, here on the CPU) with --average_last: the losses
    follow the eager reference's (inductor fuses and reorders fp32 sums: close, not equal), the export has the
    reference's tensor names (no `_orig_mod.`) and loads; resumed from step 9's checkpoint, the same last step
    and the same export, to the bit."""
    run, flags = tmp_path / "run", ["--batch_size", "4", "--compile", "--ckpt_interval", "1", "--average_last", "2"]
    r = train(corpus, run, *flags)
    assert re.search(r"the mean of the weights of the last 2 steps: val loss [\d.]+", r.stdout), r.stdout
    mine, ref = losses(run), losses(reference)
    assert mine.keys() == ref.keys() and all(abs(mine[s] - ref[s]) < 1e-3 for s in ref), (mine, ref)
    exported, eager = torch.load(run / "consolidated.00.pth"), torch.load(reference / "consolidated.00.pth")
    assert exported.keys() == eager.keys()
    from model import load_model
    load_model(str(run))
    shutil.rmtree(run / "ckpt" / "step_000010")
    (run / "consolidated.00.pth").unlink()
    r = train(corpus, run, *flags, "--resume")
    assert "at step 9" in r.stdout and losses(run) == mine, r.stdout
    again = torch.load(run / "consolidated.00.pth")
    assert all(torch.equal(again[k], exported[k]) for k in exported)


def test_wsd_holds_the_peak_then_decays_over_its_last_fraction(corpus, tmp_path):
    """--schedule wsd --decay_frac 0.5 over 10 steps, warmup 2: the lr at step s (t = s + 1) climbs for 2 steps,
    stays at the peak, and falls linearly to lr / 10 over the last half, t = 5 to 10 (with --decay_frac 1, as in
    the other tests, the decay starts after the warmup, whatever the formula for its start)."""
    train(corpus, tmp_path, "--batch_size", "2", "--schedule", "wsd", "--decay_frac", "0.5")
    lr = [float(r["lr"]) for r in log_rows(tmp_path) if r["lr"]]
    peak, low = 1e-2, 1e-3
    assert lr == pytest.approx([peak / 2, peak, peak, peak, peak] + [peak + k / 5 * (low - peak) for k in range(1, 6)])


def test_time_budget_runs_the_schedule_on_the_clock(corpus, tmp_path):
    """--max_minutes: the run ends when the budget is spent, however many steps that is, with the lr decayed.
    Under DDP, so that the ranks must agree on every lr and on the last step (rank 0's clock), or hang."""
    train(corpus, tmp_path, "--batch_size", "2", "--max_minutes", "0.1", "--max_steps", "100000", "--eval_interval",
          "100000", "--ckpt_interval", "100000", nproc=2)
    rows = log_rows(tmp_path)
    lr = [float(r["lr"]) for r in rows if r["lr"]]
    assert 3 <= len(lr) < 100000 and all(math.isfinite(float(r["train_loss"])) for r in rows if r["train_loss"])
    peak = lr.index(max(lr))  # warmup by the clock, then only down: cosine on the time spent
    assert all(a >= b for a, b in zip(lr[peak:], lr[peak + 1:])) and lr[-1] < 0.35e-2  # close to lr / 10 at the end
    assert os.path.exists(tmp_path / "consolidated.00.pth")
    # the clock is part of the checkpoint: resuming a finished budget takes no step (it used to start over)
    train(corpus, tmp_path, "--batch_size", "2", "--max_minutes", "0.1", "--max_steps", "100000", "--eval_interval",
          "100000", "--ckpt_interval", "100000", "--resume", nproc=2)
    assert [float(r["lr"]) for r in log_rows(tmp_path) if r["lr"]] == lr


def test_fsdp_resumes_a_single_process_checkpoint_and_refuses_a_corrupt_one(corpus, reference, tmp_path):
    """dcp reshards: the reference's step-8 checkpoint resumes under FSDP2 on 2 processes to the same losses;
    then a damaged file is refused by both ranks together, with one clear message and no hang."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    train(corpus, run, "--batch_size", "2", "--fsdp", "--resume", str(run / "ckpt" / "step_000008"), nproc=2)
    got, ref = losses(run), losses(reference)
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-4) and sorted(got) == sorted(ref)
    shard = run / "ckpt" / "step_000010" / "__1_0.distcp"  # written by rank 1 this time
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    r = train(corpus, run, "--batch_size", "2", "--fsdp", "--resume", nproc=2, ok=False)
    assert r.returncode != 0 and (r.stdout + r.stderr).count(f"corrupt checkpoint: {shard}") == 1, r.stderr[-3000:]


def test_gradient_clipping_acts_on_the_step(corpus, reference, tmp_path):
    """--grad_clip scales the gradient the optimizer steps with: clipped to a norm of 1e-9, AdamW's eps (1e-8)
    swamps it, so the weights barely move and the loss stays at its start, where the reference's falls by > 1.
    (The logged grad_norm is the norm before clipping: the same first value as the reference's.)"""
    train(corpus, tmp_path, "--batch_size", "4", "--grad_clip", "1e-9", "--weight_decay", "0")
    loss, ref = losses(tmp_path), losses(reference)
    assert loss[0] == ref[0]
    assert abs(loss[STEPS - 1] - loss[0]) < 0.05 and ref[STEPS - 1] < ref[0] - 1.0
    norm = {int(r["step"]): float(r["grad_norm"]) for r in log_rows(tmp_path) if r["grad_norm"]}
    assert norm[0] == pytest.approx(losses(reference, "grad_norm")[0], rel=1e-4) and norm[0] > 1e-3


@pytest.mark.parametrize("damage", ["state.pt flipped", ".metadata missing"])
def test_every_checkpoint_file_is_checked(corpus, reference, tmp_path, damage):
    """The manifest covers every file of a checkpoint, not only the weight shards: state.pt (step, loader, RNG)
    and dcp's .metadata too; a changed byte or a missing file is refused by name before anything loads."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    name = damage.split()[0]
    target = run / "ckpt" / "step_000010" / name
    assert name in json.load(open(run / "ckpt" / "step_000010" / "manifest.json"))["files"]
    if damage.endswith("missing"):
        target.unlink()
    else:
        blob = bytearray(target.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        target.write_bytes(bytes(blob))
    r = train(corpus, run, "--batch_size", "4", "--resume", ok=False)
    assert r.returncode == 1 and f"corrupt checkpoint: {target} does not match" in r.stderr, r.stderr[-3000:]


def test_a_mix_of_folders_with_other_val_fractions_is_told(tmp_path):
    """is_val keeps 1 in round(1/val_fraction) documents by h % every: the val sets of two fractions are not nested,
    so folders made from overlapping sources (an upsampled 'best' subset, a small folder given the larger
    --val_fraction prepare_data's own error asks for) hold the same document in one's val and the other's train.
    A mix of them trains on the val documents it reports a loss for, silently. Expected: a warning (or refusal)."""
    import data
    from test_data import read_docs
    from tokenizer import Tokenizer
    rng, texts = random.Random(0), []
    (tmp_path / "docs").mkdir()
    for i in range(200):
        texts.append(" ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "."
                              for _ in range(rng.randint(4, 10))))
        (tmp_path / "docs" / f"{i:03d}.txt").write_text(texts[-1])
    tok_path = str(tmp_path / "tok.model")
    Tokenizer.train(texts, 600).save(tok_path)
    tok = Tokenizer.load(tok_path)
    for name, fraction in (("all", 0.1), ("best", 0.5)):
        data.prepare_data(str(tmp_path / "docs"), tok_path, str(tmp_path / name), val_fraction=fraction, num_proc=1,
                          verbose=False)
    leaked = set(read_docs(str(tmp_path / "best"), "val", tok)) & set(read_docs(str(tmp_path / "all"), "train", tok))
    print(f"{len(leaked)} of {len(read_docs(str(tmp_path / 'best'), 'val', tok))} best-val docs in all-train")
    assert leaked  # the hazard itself: 'best' val documents that 'all' trains on
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [a for a in TINY]
    args[args.index("--max_steps") + 1] = "1"
    r = subprocess.run([sys.executable, "train.py", "--data", f"{tmp_path / 'all'}=1", f"{tmp_path / 'best'}=1",
                        "--tokenizer", tok_path, "--out_dir", str(tmp_path / "out"), "--batch_size", "4",
                        "--dtype", "float32", *args], cwd=root, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "val_fraction" in r.stdout + r.stderr, r.stdout[-2000:]


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds rank 1's process through /proc (Linux)")
def test_a_signal_to_one_rank_stops_every_rank_with_a_checkpoint(corpus, tmp_path):
    """SIGTERM to rank 1 alone (one node of several preempted): all ranks save, exit 0, and rank 0, which got no
    signal, says how to resume (it used to crash on signal.Signals(0) after the save)."""
    p = subprocess.Popen(command(corpus, tmp_path, "--batch_size", "2", nproc=2), cwd=ROOT, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("step     2 |"):
            for pid in filter(str.isdigit, os.listdir("/proc")):   # torchrun's children: the ranks (Linux)
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        parent = int(f.read().rsplit(")", 1)[1].split()[1])
                    with open(f"/proc/{pid}/environ") as f:
                        rank1 = "RANK=1" in f.read().split("\0")
                except OSError:   # (a process that ended meanwhile)
                    continue
                if parent == p.pid and rank1:
                    os.kill(int(pid), signal.SIGTERM)
            break
    rest, _ = p.communicate(timeout=120)
    output = "".join(lines) + rest
    stop = re.search(r"stopped by signal .* at step (\d+)", output)
    assert p.returncode == 0 and stop, output[-3000:]
    assert (tmp_path / "ckpt" / f"step_{int(stop[1]):06d}").is_dir()   # the checkpoint --resume goes on from


def test_a_device_that_is_not_there_is_one_line(corpus, tmp_path):
    """(review, helper) --device gpu (a name torch does not know) or --device cuda on a machine without CUDA ended in
    a traceback from torch; now a one-line message naming --device, before any work."""
    for device in ["gpu"] + ([] if torch.cuda.is_available() else ["cuda"]):
        r = train(corpus, tmp_path, "--device", device, ok=False)
        assert r.returncode == 2 and f"--device {device}:" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_fsdp_without_torchrun_is_refused(corpus, tmp_path):
    """(review, helper) --fsdp in a plain `python train.py` ran one unsharded process, said only as "no parallelism"
    in the log (a model sized for sharding would not fit); now refused, saying to launch it under torchrun."""
    r = train(corpus, tmp_path, "--fsdp", ok=False)
    assert r.returncode == 2 and "--fsdp" in r.stderr and "torchrun --standalone --nproc_per_node=N" in r.stderr, \
        r.stderr
    assert not (tmp_path / "log.csv").exists()


def test_a_tokenizer_that_is_a_folder_is_refused(corpus, tmp_path):
    """(review, helper) --tokenizer new_dir/ (to be made) trained a tokenizer, then lost it to a NotADirectoryError
    that did not name --tokenizer, leaving new_dir/ behind; an existing folder failed in data.py, "no tokenizer there".
    Both refused before any work, naming --tokenizer."""
    (tmp_path / "folder").mkdir()
    for path in (tmp_path / "folder", str(tmp_path / "new_dir") + "/"):
        r = subprocess.run(command(corpus, tmp_path / "out") + ["--source", str(corpus / "docs"), "--data",
                           str(tmp_path / "shards"), "--tokenizer", str(path), "--vocab_size", "600"], cwd=ROOT,
                           env=env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and f"--tokenizer {path} is a folder" in r.stderr, r.stdout + r.stderr
        assert "training a" not in r.stdout and not (tmp_path / "new_dir").exists()


def test_an_infinite_lr_or_weight_decay_is_refused(corpus, tmp_path):
    """(review, helper) --lr inf or --weight_decay inf passed the parser: the first update made every weight NaN, and
    with --max_steps 1 a NaN model was exported with exit status 0."""
    for flags in (["--lr", "inf"], ["--weight_decay", "inf"]):
        r = train(corpus, tmp_path, *flags, "--max_steps", "1", ok=False)
        assert r.returncode == 2 and "finite" in r.stderr and not (tmp_path / "params.json").exists(), r.stderr


def test_decay_frac_without_wsd_is_refused(corpus, tmp_path):
    """(review, helper) --decay_frac is the wsd schedule's: with the default cosine schedule it was silently ignored
    (the run decayed over all its steps)."""
    r = train(corpus, tmp_path, "--decay_frac", "0.5", ok=False)
    assert r.returncode == 2 and "--decay_frac" in r.stderr and "--schedule wsd" in r.stderr, r.stderr


def test_a_negative_seed_is_refused_by_name(corpus, tmp_path):
    """(review, helper) --seed -1 passed the parser and was refused later by the data loader, in its words
    ("PackedLoader: seed=-1"), not naming --seed; now the parser refuses it, before any work."""
    r = train(corpus, tmp_path, "--seed", "-1", ok=False)
    assert r.returncode == 2 and "--seed and --warmup_steps must be >= 0" in r.stderr, r.stderr


def test_steps_flags_under_a_time_budget_are_told_unused(corpus, tmp_path):
    """(review, helper) under --max_minutes the schedule runs on the clock: --max_steps and --warmup_steps were
    silently not used (--max_steps 2 --max_minutes 0.02 ran as many steps as fit in the time). A note says so."""
    r = train(corpus, tmp_path, "--max_steps", "2", "--warmup_steps", "1", "--max_minutes", "0.01", "--eval_interval",
              "100000", "--ckpt_interval", "100000")
    assert re.search(r"note: .*--max_minutes 0\.01.*: --max_steps 2, --warmup_steps 1 not used", r.stdout), r.stdout
    r = train(corpus, tmp_path, "--max_steps", "2")   # (TINY's --max_minutes 0: no clock, nothing to tell)
    assert "not used" not in r.stdout, r.stdout
