"""Benchmark of tokenizer.py: training time and compression against Hugging Face tokenizers' Rust BpeTrainer,
the minbpe-style reference trainer for scale, and encoding speed against raw tiktoken.

A script, not a test: it prints a table (paste it into the README with the date and the machine).
  python tests/bench_tokenizer.py                     # ~20 MB of the stdlib, vocab 8192
  python tests/bench_tokenizer.py --mb 5 --vocab_size 4096 --repeat 1

Corpus: the running interpreter's standard library (stdlib_sources), the first --mb MB (UTF-8 bytes) of
files in sorted order to train on, the next 2 MB of files held out for bytes-per-token and encode speed.
HF tokenizers is imported here only; its rows are skipped if it is not installed."""
import argparse
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tokenizer as T  # noqa: E402


def timed(fn, repeat=1):
    """(best wall time in seconds over `repeat` runs, result of the last run)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def take_mb(sources, mb):
    texts, n = [], 0
    for _, text in sources:
        texts.append(text)
        n += len(text.encode("utf-8"))
        if n >= mb * 1e6:
            break
    return texts, n


def train_hf(texts, vocab_size):
    """HF tokenizers' BPE with the same pre-tokenization: Llama 3 regex split, then bytes -> ByteLevel chars.
    vocab_size counts the 256 bytes and the merged tokens only (our specials are added separately)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(T.LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=20, help="MB of stdlib text to train on")
    parser.add_argument("--vocab_size", type=int, default=8192, help="vocabulary incl. our 256 specials")
    parser.add_argument("--ref_mb", type=float, default=1, help="MB for the reference trainer")
    parser.add_argument("--ref_vocab_size", type=int, default=1280, help="vocab for the reference trainer")
    parser.add_argument("--repeat", type=int, default=3, help="training runs of each trainer (best counts)")
    args = parser.parse_args()

    sources = T.stdlib_sources()
    train_texts, train_bytes = take_mb(sources, args.mb)
    held_out, held_bytes = take_mb(sources, 2)
    print(f"corpus: {len(train_texts)} stdlib files, {train_bytes / 1e6:.1f} MB to train on; "
          f"{len(held_out)} other files, {held_bytes / 1e6:.1f} MB held out; {os.cpu_count()} CPU cores")
    rows = []  # (what, ours, other, other's name, ratio definition)

    # 1. Training wall time and compression, ours vs the Rust trainer: runs interleaved, best of --repeat,
    #    so that a burst of load from other jobs on a shared machine hits both sides alike.
    have_hf = importlib.util.find_spec("tokenizers") is not None
    if not have_hf:
        print("HF tokenizers not installed: skipping its rows (pip install tokenizers)")
    t_ours = t_hf = t_count = t_merge = float("inf")
    for _ in range(args.repeat):
        t, tok = timed(lambda: T.Tokenizer.train(train_texts, args.vocab_size))
        t_ours = min(t_ours, t)
        t, counts = timed(lambda: T.count_chunks(train_texts))  # our two stages again, separately
        t_count = min(t_count, t)
        t, _ = timed(lambda: T.train_bpe(counts, args.vocab_size - T.N_SPECIAL))
        t_merge = min(t_merge, t)
        if have_hf:
            t, hf = timed(lambda: train_hf(train_texts, args.vocab_size - T.N_SPECIAL))
            t_hf = min(t_hf, t)
    print(f"tokenizer.py stages: count {len(counts)} distinct chunks {t_count:.2f}s, "
          f"merge loop {t_merge:.2f}s")
    bpt_ours = held_bytes / sum(map(len, tok.encode_batch(held_out)))
    what = f"train {args.mb:g} MB, vocab {args.vocab_size}: seconds (best of {args.repeat})"
    if have_hf:
        bpt_hf = held_bytes / sum(len(e.ids) for e in hf.encode_batch(held_out))
        rows.append((what, t_ours, t_hf, "HF tokenizers", t_ours / t_hf))
        rows.append(("held-out bytes per token (higher = better)", bpt_ours, bpt_hf, "HF tokenizers",
                     bpt_ours / bpt_hf))
    else:
        rows.append((what, t_ours, None, "", None))
        rows.append(("held-out bytes per token", bpt_ours, None, "", None))

    # 2. The minbpe-style reference trainer on a small slice, for scale (and the same merges).
    ref_texts, ref_bytes = take_mb(iter((None, t) for t in train_texts), args.ref_mb)
    counts = T.count_chunks(ref_texts)
    n_tokens = args.ref_vocab_size - T.N_SPECIAL
    t_fast, (m_fast, _) = timed(lambda: T.train_bpe(counts, n_tokens))
    t_ref, (m_ref, _) = timed(lambda: T.train_bpe_reference(counts, n_tokens))
    rows.append((f"merge loop {ref_bytes / 1e6:.1f} MB, vocab {args.ref_vocab_size}: seconds", t_fast, t_ref,
                 "reference", t_fast / t_ref))
    print(f"reference and fast trainer give the same merges: {m_fast == m_ref}")

    # 3. Encoding speed: our encode / encode_batch vs tiktoken's Encoding called directly.
    enc = tok.enc
    t_enc, _ = timed(lambda: [tok.encode(t) for t in held_out], repeat=3)
    t_raw, _ = timed(lambda: [enc.encode_ordinary(t) for t in held_out], repeat=3)
    rows.append(("encode MB/s (one text at a time)", held_bytes / 1e6 / t_enc, held_bytes / 1e6 / t_raw,
                 "raw tiktoken", t_raw / t_enc))
    t_enc, _ = timed(lambda: tok.encode_batch(held_out), repeat=3)
    t_raw, _ = timed(lambda: enc.encode_ordinary_batch(held_out), repeat=3)
    rows.append(("encode_batch MB/s", held_bytes / 1e6 / t_enc, held_bytes / 1e6 / t_raw,
                 "raw tiktoken", t_raw / t_enc))

    print()
    print("| measurement | tokenizer.py | other | other is | ratio ours/other |")
    print("|---|---:|---:|---|---:|")
    for what, ours, other, name, ratio in rows:
        fmt = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
        print(f"| {what} | {fmt(ours)} | {fmt(other)} | {name} | {fmt(ratio)} |")
    print("\nratio: time ours/other for seconds (lower is better), ours/other for bytes/token and MB/s "
          "(higher is better)")


if __name__ == "__main__":
    main()
