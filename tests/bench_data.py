"""Benchmark data.py: text -> token shards against raw tiktoken, and the loader against what training consumes.

    python tests/bench_data.py                      # tokenizer: data/stdlib/tok.model, else one trained here
    python tests/bench_data.py --mb 8 --tokenizer tok.model

Rows (MB/s of UTF-8 text, best of --repeat runs):
- raw tiktoken: tiktoken.Encoding(same ranks).encode_ordinary_batch(texts), its default 8 threads, output discarded
- data.py shards, N proc: what prepare_data does after filtering: 4 MB chunks -> N forked workers ->
  encode_to_numpy in threads -> uint32 arrays with <|begin_of_text|> -> ShardWriter (atomic files on disk)
- prepare_data, N proc: the whole pipeline (clean, dedup, filters, tokenize, shards), for scale
Loader: PackedLoader.next_batch() batches/s at B=16, T = the cpu preset's 256, against the training steps/s of the
default CPU model (forward + backward + AdamW), and tokens/s at a GPU-sized batch (B=8, T=8192)."""
import argparse
import multiprocessing
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tiktoken  # noqa: E402
import torch  # noqa: E402
from tiktoken.load import load_tiktoken_bpe  # noqa: E402

import data  # noqa: E402
from tokenizer import LLAMA3_PATTERN, Tokenizer  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--tokenizer", default="data/stdlib/tok.model")
p.add_argument("--mb", type=float, default=8, help="MB of stdlib text to tokenize")
p.add_argument("--repeat", type=int, default=3)
args = p.parse_args()

texts, size = [], 0
for text in data.iter_documents("stdlib"):
    texts.append(data.clean_text(text))
    size += len(texts[-1].encode("utf-8"))
    if size >= args.mb * 1e6:
        break
mb = size / 1e6
tmp = tempfile.mkdtemp()
if not os.path.exists(args.tokenizer):
    args.tokenizer = os.path.join(tmp, "tok.model")
    Tokenizer.train(texts[:300], 8192).save(args.tokenizer)
print(f"{len(texts)} stdlib documents, {mb:.1f} MB, tokenizer {args.tokenizer}; {os.cpu_count()} cores, "
      f"torch {torch.__version__}, tiktoken {tiktoken.__version__}")


def best(fn):
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def raw_tiktoken():
    enc = tiktoken.Encoding("raw", pat_str=LLAMA3_PATTERN, mergeable_ranks=load_tiktoken_bpe(args.tokenizer),
                            special_tokens={})
    return lambda: enc.encode_ordinary_batch(texts)


def shards(num_proc):
    """The tokenize -> shards stage of prepare_data, on already clean text. Workers (and the tokenizer they
    load) start once, outside the timing: a one-off cost of a prepare_data run, not a rate."""
    tok = Tokenizer.load(args.tokenizer)
    out = os.path.join(tmp, f"shards{num_proc}")
    os.makedirs(out, exist_ok=True)
    if num_proc == 1:
        data._init_worker(args.tokenizer)
        pmap = map
    else:
        pmap = multiprocessing.get_context("fork").Pool(num_proc, data._init_worker, (args.tokenizer,)).imap

    def run():
        w = data.ShardWriter(out, "train", 1 << 26, tok.n_words, tok.bos_id, tok.fingerprint())
        chunks = [("train", c) for c in data.text_batches(texts, 1 << 22)]
        for _, tokens, n_docs, n_bytes in pmap(data._encode_chunk, chunks):
            w.add(tokens, n_docs, n_bytes)
        w.close()
    return run


def prepare(num_proc):
    src = os.path.join(tmp, "src")
    os.makedirs(src, exist_ok=True)
    for i, t in enumerate(texts):
        with open(os.path.join(src, f"{i:05d}.txt"), "w") as f:
            f.write(t)

    out = os.path.join(tmp, f"prep{num_proc}")

    def run():
        if os.path.exists(os.path.join(out, "meta.json")):
            os.remove(os.path.join(out, "meta.json"))  # or the second run is answered from the cache
        data.prepare_data(src, args.tokenizer, out, num_proc=num_proc, val_fraction=0, verbose=False)
    return run


rows = [("raw tiktoken encode_ordinary_batch", raw_tiktoken())]
rows += [(f"data.py text -> shards, {n} proc", shards(n)) for n in (1, 2)]
rows += [(f"prepare_data (all steps), {n} proc", prepare(n)) for n in (1, 2)]
times = {name: [] for name, _ in rows}
for _ in range(args.repeat):  # interleaved, so that load from other jobs on the machine hits every row alike
    for name, fn in rows:
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)
results = [(name, mb / min(times[name])) for name, _ in rows]
print(f"\n{'text -> tokens':<40} {'MB/s':>7} {'vs raw':>7}")
for name, speed in results:
    print(f"{name:<40} {speed:>7.2f} {speed / results[0][1]:>6.2f}x")

# ----------------------------------------------------------------------------- loader vs training
from model import PRESETS, Transformer  # noqa: E402
import dataclasses  # noqa: E402

tok = Tokenizer.load(args.tokenizer)
out = os.path.join(tmp, "shards1")
import json  # noqa: E402
with open(os.path.join(out, "meta.json"), "w") as f:
    json.dump({"fingerprint": tok.fingerprint(), "vocab_size": tok.n_words, "bos_id": tok.bos_id,
               "train": {"shards": sorted(n for n in os.listdir(out) if n.startswith("train_"))}}, f)
margs = dataclasses.replace(PRESETS["cpu"], vocab_size=tok.n_words)
B, T = 16, margs.max_seq_len


def loader_rate(B, T, n=200):
    loader = data.PackedLoader(out, "train", B, T, seed=0)
    loader.next_batch()
    t0 = time.perf_counter()
    for _ in range(n):
        loader.next_batch()
    return n / (time.perf_counter() - t0)


torch.manual_seed(0)
model = Transformer(margs)
opt = model.configure_optimizer(1e-3, 0.1)
x = torch.randint(0, tok.n_words, (B, T))


def train_step():
    loss = model(x, x)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


train_step()
steps = 3
t_train = best(lambda: [train_step() for _ in range(steps)]) / steps
load = loader_rate(B, T)
print(f"\n{'loader vs training':<40} {'batch/s':>9} {'tokens/s':>11}")
print(f"{f'train.py cpu model step, B={B} T={T}':<40} {1 / t_train:>9.2f} {B * T / t_train:>11,.0f}")
print(f"{f'PackedLoader.next_batch, B={B} T={T}':<40} {load:>9.1f} {load * B * T:>11,.0f}   "
      f"{load * t_train:,.0f}x what training consumes")
big = loader_rate(8, 8192, n=50)
print(f"{'PackedLoader.next_batch, B=8 T=8192':<40} {big:>9.1f} {big * 8 * 8192:>11,.0f}")
