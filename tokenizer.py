"""tokenizer.py: the Llama 3 tokenizer. Byte-level BPE, trained here, saved and loaded in Meta's format.

Stage 1 of the recipe. Llama 3 replaced Llama 2's SentencePiece with a tiktoken-style byte-level BPE
(128K vocabulary: 100K tokens from tiktoken plus 28K more for other languages, "The Llama 3 Herd of
Models" 2024, section 3.2). This file trains such a tokenizer on our own text and reads and writes the
exact file format Meta ships.

Design choices
- Byte-level BPE: every one of the 256 byte values is a token (ids 0..255 in the vocabularies we train),
  so any string encodes and nothing is ever unknown.
- Text is first split into chunks by LLAMA3_PATTERN (Meta's regex, verbatim); merges never cross a chunk
  boundary, so " the", "123" and "):" can become tokens but "e t" never does.
- Training (train_bpe) counts the unique chunks once, then merges incrementally: the pair counts, an
  index pair -> chunks containing it, and a heap give the most frequent pair without rescanning the
  corpus. train_bpe_reference is the plain minbpe-style loop that rescans everything each merge; the
  tests hold the two to identical merges. Ties: the pair with the highest count wins, among equal counts
  the smallest pair of ids (a, b) -- so the result does not depend on the order the text came in.
- File format: tiktoken's / Meta's `tokenizer.model`, one `base64(token bytes) rank` line per token.
  There is no merge list: the ranks are the merges (to encode a chunk, repeatedly join the adjacent pair
  whose joined bytes have the lowest rank, encode_reference below). So Tokenizer.load reads Meta's own
  tokenizer.model (128000 ranks) and gives Meta's ids. A `.vocab` file beside it is for human eyes only.
- Special tokens: Meta's Llama 3 layout, 256 ids right after the ranks (<|begin_of_text|> = 128000 and
  <|eot_id|> = 128009 for Meta's vocabulary). encode() treats every string as plain text, so a user
  who types "<|eot_id|>" gets ordinary characters, never the control token.
- Encoding runs in tiktoken (Rust) built from our ranks; encode_reference is the pure-Python spec.
- Chat format (Llama 3): <|begin_of_text|> then per message
  <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>; encode_dialog returns a loss mask
  that is 1 on the assistant's content and its <|eot_id|> only.

Run it
  python tokenizer.py                                      # train on the standard library, as train.py does
  python tokenizer.py --source notes/ --vocab_size 32000 --out tok.model   # any data.py source: folder, .jsonl
  python tokenizer.py --source crawl/ --blocklist ut1/adult/domains --out tok.model   # web pages, as data.py reads
  python tokenizer.py --load tok.model --encode "Hello world"    # show the tokens of a string
  python tokenizer.py --load Meta-Llama-3-8B/original/tokenizer.model --encode "Hello world"
"""
import argparse
import base64
import hashlib
import heapq
import itertools
import multiprocessing
import os
import re
import sys
import sysconfig
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import regex
import tiktoken
from tqdm import tqdm

# Meta's split regex for Llama 3 (meta-llama/llama3, llama/tokenizer.py `pat_str`; it is the regex of tiktoken's
# cl100k_base, GPT-4's tokenizer): contractions, letters with one optional leading non-letter, numbers of at most 3
# digits, punctuation runs, newlines, and whitespace that never swallows the space before a word.
# (The trainer splits with the `regex` module, tiktoken with Rust's regex; their Unicode tables can be a version
# apart, today 17 and 16: 4,657 code points new in 17 are letters to one, punctuation to the other.)
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
SURROGATE = regex.compile("[\ud800-\udfff]")  # half of a UTF-16 pair: "\ud83d" alone is valid JSON, not UTF-8

# Meta's Tokenizer.encode hands tiktoken the text in pieces: windows of 400,000 characters, and in each, runs of
# whitespace or of non-whitespace cut every 25,000 characters (tiktoken's regex gives up on a run of about a
# million spaces: a Rust panic, which `except Exception` does not catch; tiktoken issue 195). The same cuts here
# give Meta's ids for any text; text without such a run or window (nearly all) is one piece, encoded as is.
MAX_PIECE, MAX_RUN = 400_000, 25_000
LONG_RUN = re.compile(r"(?<!\s)\s{%d,}|(?<!\S)\S{%d,}" % (MAX_RUN + 1, MAX_RUN + 1))   # (re's \s is str.isspace)
SPACE = re.compile(r"\s")


def encode_pieces(text):
    """text -> the pieces Meta's encode hands tiktoken (above). A run of over MAX_RUN holds a whole slice [p, p +
    MAX_RUN/2) with p a multiple of MAX_RUN/2: those slices are looked at, and the text searched only if one is a
    run (whitespace throughout, or none in it)."""
    half, pieces = MAX_RUN // 2, []
    for window in (text[w:w + MAX_PIECE] for w in range(0, max(len(text), 1), MAX_PIECE)):
        if not any(window[p:p + half].isspace() or not SPACE.search(window, p, p + half)
                   for p in range(0, len(window) - half + 1, half)):
            pieces.append(window)
            continue
        cuts = [i for m in LONG_RUN.finditer(window) for i in range(m.start() + MAX_RUN, m.end(), MAX_RUN)]
        pieces += [window[a:b] for a, b in zip([0] + cuts, cuts + [len(window)])]
    return pieces


# Meta's Llama 3 special tokens, in id order after the mergeable ranks, under Llama 3.1's names (meta-llama/
# llama-models, models/llama3/tokenizer.py): the same 256 ids as 3.0's (meta-llama/llama3), which called the slots
# of <|finetune_right_pad_id|>, <|step_id|>, <|eom_id|> and <|python_tag|> reserved; one tokenizer.model serves both.
N_SPECIAL = 256
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: a tool call, whose answer the turn waits for
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",  # a tool call follows
] + [f"<|reserved_special_token_{i}|>" for i in range(2, N_SPECIAL - 9)]
assert len(SPECIAL_TOKENS) == N_SPECIAL

ROLES = ("system", "user", "assistant")


# ----------------------------------------------------------------------------------------------------
# Reference BPE, minbpe-style: short, slow, obviously right. The fast trainer below must match it.

def get_stats(ids, counts=None, weight=1):
    """Count adjacent pairs: ids=[1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}."""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge(ids, pair, idx):
    """Replace every occurrence of pair, left to right: ids=[1, 2, 3, 1, 2], pair=(1, 2), idx=4 -> [4, 3, 4]."""
    out, i = [], 0
    while i < len(ids):
        if ids[i] == pair[0] and i + 1 < len(ids) and ids[i + 1] == pair[1]:
            out.append(idx)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe_reference(chunk_counts, n_tokens):
    """Learn merges until the vocabulary has n_tokens tokens, rescanning every chunk at every merge.

    chunk_counts: {chunk bytes: how often the chunk occurs}. Returns (merges, vocab): merges is the list
    of ((a, b), new_id) in order, vocab[id] the token's bytes. Should the joined bytes of the best pair
    already be a token (the same bytes joined another way, e.g. "ab"+"c" and then "a"+"bc"), the pair
    merges into that token and the vocabulary does not grow, since tiktoken's format needs each token's
    bytes to be unique. (A guard: we have not seen it happen with left-to-right merging.)"""
    words = Counter({tuple(chunk): n for chunk, n in chunk_counts.items()})
    vocab = [bytes([b]) for b in range(256)]
    token_id = {tok: i for i, tok in enumerate(vocab)}
    merges = []
    while len(vocab) < n_tokens:
        stats = {}
        for word, n in words.items():
            get_stats(word, stats, n)
        if not stats:
            break  # every chunk is a single token: nothing left to merge
        pair = min(stats, key=lambda p: (-stats[p], p))  # most frequent; ties: smallest (a, b)
        new = vocab[pair[0]] + vocab[pair[1]]
        idx = token_id.setdefault(new, len(vocab))
        if idx == len(vocab):
            vocab.append(new)
        merges.append((pair, idx))
        merged = Counter()
        for word, n in words.items():
            merged[tuple(merge(word, pair, idx))] += n
        words = merged
    return merges, vocab


def encode_reference(ranks, text, pattern=LLAMA3_PATTERN):
    """What tiktoken does, in plain Python: split text by the pattern, then in each chunk repeatedly join
    the adjacent pair whose joined bytes have the lowest rank, until no joined pair is a token.
    ranks: {token bytes: id}. E.g. ranks with b"ab"=256, b"abc"=257: "abc" -> [a,b,c] -> [ab,c] -> [abc]."""
    ids = []
    for chunk in (c for piece in encode_pieces(text) for c in regex.findall(pattern, piece)):
        parts = [bytes([b]) for b in chunk.encode("utf-8")]
        while True:
            # the adjacent pair whose joined bytes are the lowest-ranked token (leftmost if several)
            candidates = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                          if parts[i] + parts[i + 1] in ranks]
            if not candidates:
                break
            _, i = min(candidates)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


# ----------------------------------------------------------------------------------------------------
# Fast trainer. Step 1: count the unique chunks once (in worker processes for large inputs).

def _count_chunks(args):
    """Worker: (pattern, texts) -> Counter of the pattern's chunks in those texts."""
    pattern, texts = args
    rx, counts = regex.compile(pattern), Counter()
    for text in texts:
        for piece in encode_pieces(SURROGATE.sub("\ufffd", text)):  # (as tiktoken encodes a lone surrogate)
            counts.update(rx.findall(piece))                          # the chunks encode() makes
    return counts


def text_batches(texts, batch_chars):
    """Group an iterable of strings into lists of about batch_chars characters."""
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def count_chunks(texts, pattern=LLAMA3_PATTERN, processes=None, batch_chars=2_000_000):
    """Split every text with the pattern and count each distinct chunk: -> {chunk bytes: count}.

    20 MB of Python source has only ~90K distinct chunks, so after this the corpus is never read again.
    Input of more than one batch is split across `processes` worker processes (default: all cores)."""
    batches = text_batches(texts, batch_chars)
    head = list(itertools.islice(batches, 2))
    counts = Counter()
    # Workers are forked: "spawn" would re-run the caller's script in each worker, and flat scripts like
    # train.py have no `if __name__ == "__main__"` guard. No fork (Windows): count in this process.
    if len(head) < 2 or processes == 1 or "fork" not in multiprocessing.get_all_start_methods():
        for batch in itertools.chain(head, batches):
            counts.update(_count_chunks((pattern, batch)))
    else:
        with multiprocessing.get_context("fork").Pool(processes or os.cpu_count()) as pool:
            jobs = ((pattern, batch) for batch in itertools.chain(head, batches))
            for part in pool.imap_unordered(_count_chunks, jobs):
                counts.update(part)  # a sum: the order the parts come back in does not matter
    return {chunk.encode("utf-8"): n for chunk, n in counts.items()}


# Step 2: merge incrementally. Per merge we touch only the chunks that contain the merged pair.

def train_bpe(chunk_counts, n_tokens, verbose=False):
    """Same contract and result as train_bpe_reference, in time proportional to what each merge changes.

    State: words[w] is distinct chunk w as a list of token ids and freq[w] its count; pair_counts[p] the
    weighted count of pair p over all chunks; where[p] the chunks that contain (or once contained) p;
    a heap of (-count, pair). A merge only lowers the counts of existing pairs, and the new pairs it
    makes are pushed with their counts, so a popped entry is either current (take it) or too high (push
    the current count back, pop again) -- "lazy invalidation", no decrease-key needed."""
    words = [list(chunk) for chunk in chunk_counts]
    freq = list(chunk_counts.values())
    pair_counts, where = defaultdict(int), defaultdict(set)
    for w, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq[w]
            where[pair].add(w)
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)  # smallest (-count, a, b) first: most frequent pair, ties to the smallest ids

    vocab = [bytes([b]) for b in range(256)]
    token_id = {tok: i for i, tok in enumerate(vocab)}
    merges = []
    bar = tqdm(total=n_tokens - len(vocab), desc="bpe merges", unit="tok",
               disable=None if verbose is None else not verbose)  # None: only on a terminal
    while len(vocab) < n_tokens and heap:
        neg, pair = heapq.heappop(heap)
        n = pair_counts.get(pair, 0)
        if n != -neg:  # stale entry
            if 0 < n < -neg:
                heapq.heappush(heap, (-n, pair))
            continue
        new = vocab[pair[0]] + vocab[pair[1]]
        idx = token_id.setdefault(new, len(vocab))  # bytes already a token: reuse its id (see reference)
        if idx == len(vocab):
            vocab.append(new)
            bar.update()
        merges.append((pair, idx))

        # Re-merge only the chunks that contain the pair, left to right like merge(), and update the counts
        # of the neighbouring pairs: for "x a b y" -> "x X y", pairs (x,a), (a,b), (b,y) lose the chunk's
        # count f and (x,X), (X,y) gain it. In a run "a b a b" -> "X X" the pair between the two
        # occurrences, (b,a), becomes (X,X) once: the left side of the second occurrence handles it.
        grown = set()
        a, b = pair
        for w in where.pop(pair):
            word, f = words[w], freq[w]
            if a not in word:
                continue  # a left-over index entry: an earlier merge took this chunk's `a` away
            out, i, n = [], 0, len(word)
            while i < n:
                if word[i] == a and i + 1 < n and word[i + 1] == b:
                    if out:  # left neighbour
                        pair_counts[word[i - 1], a] -= f
                        p = (out[-1], idx)
                        pair_counts[p] += f
                        where[p].add(w)
                        grown.add(p)
                    if i + 2 < n and not (word[i + 2] == a and i + 3 < n and word[i + 3] == b):
                        pair_counts[b, word[i + 2]] -= f  # right neighbour, unless it is merged next
                        p = (idx, word[i + 2])
                        pair_counts[p] += f
                        where[p].add(w)
                        grown.add(p)
                    out.append(idx)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[w] = out
        del pair_counts[pair]  # every occurrence is gone
        for p in grown:  # the new pairs (x, X), (X, y): push their counts
            heapq.heappush(heap, (-pair_counts[p], p))
    bar.close()
    return merges, vocab


# ----------------------------------------------------------------------------------------------------
# The default corpus: the Python standard library, always on disk (data.py reads it and every other source).

def stdlib_sources():
    """Yield (path, text) for every .py file of this interpreter's standard library, in sorted path order.
    site-packages is not the standard library and is skipped; files that are not UTF-8 (a few test
    fixtures) are skipped too and counted in one line on stderr."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        paths += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    skipped = 0
    for path in sorted(paths):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            skipped += 1
            continue
        yield path, text
    if skipped:
        print(f"stdlib_sources: skipped {skipped} files under {root} that are not UTF-8", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------
# The tokenizer: ranks + special tokens, encoding through tiktoken.

def render_token(token):
    """Token bytes -> one printable line for the .vocab file: invalid UTF-8 as \\xNN, unprintable
    characters (newline, tab, control, line separators) as \\uNNNN."""
    s = token.decode("utf-8", errors="backslashreplace")
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in s)


def check_dialog(messages):
    """Llama 3's dialog shape: a list of {"role", "content"} messages, an optional system message first, then
    user and assistant taking turns, user first. Raises ValueError naming the message at fault."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a dialog is a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r}")
    first = 1 if messages[0]["role"] == "system" else 0
    for i, m in enumerate(messages[first:], first):
        want = "user" if (i - first) % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"message {i} has role {m['role']!r}, expected {want!r}: "
                             "an optional system message, then user and assistant alternating")


class Tokenizer:
    def __init__(self, ranks, pattern=LLAMA3_PATTERN):
        """ranks: {token bytes: id} with ids exactly 0..len(ranks)-1. Special tokens follow the ranks."""
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError("token ranks must be exactly 0..n-1, each once")
        self.ranks, self.pattern = ranks, pattern
        self.special_tokens = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.n_words = len(ranks) + len(self.special_tokens)  # what ModelArgs.vocab_size must be at least
        self.enc = tiktoken.Encoding("nanollama3", pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.start_header_id = self.special_tokens["<|start_header_id|>"]
        self.end_header_id = self.special_tokens["<|end_header_id|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        # generation ends at any: end of text, of a turn, or of a message that waits for a tool's answer
        self.stop_ids = {self.eos_id, self.eot_id, self.special_tokens["<|eom_id|>"]}

    @classmethod
    def train(cls, texts, vocab_size, pattern=LLAMA3_PATTERN, processes=None, verbose=None):
        """Learn a BPE vocabulary of vocab_size tokens in all (the 256 special tokens included, like
        Meta's 128256) from an iterable of strings. verbose: progress bar (None: only on a terminal)."""
        n_tokens = vocab_size - N_SPECIAL
        if n_tokens < 256:
            raise ValueError(f"vocab_size={vocab_size} is too small: it must hold the 256 byte tokens and "
                             f"the {N_SPECIAL} special tokens, so at least {256 + N_SPECIAL}")
        if isinstance(texts, str):
            texts = [texts]
        chunk_counts = count_chunks(texts, pattern, processes)
        if not chunk_counts:
            raise ValueError("empty corpus: the texts given to Tokenizer.train contain no characters")
        merges, vocab = train_bpe(chunk_counts, n_tokens, verbose=verbose)
        if len(vocab) < n_tokens:
            print(f"Tokenizer.train: the corpus ran out of pairs to merge at {len(vocab)} tokens "
                  f"(asked for {n_tokens} + {N_SPECIAL} special); give it more text", file=sys.stderr)
        return cls({tok: i for i, tok in enumerate(vocab)}, pattern)

    @classmethod
    def load(cls, path, pattern=LLAMA3_PATTERN):
        """Read a tiktoken / Meta tokenizer.model file (`base64(token) rank` per line). The file does not
        store the split pattern: Llama 3's is assumed, as Meta's loader does."""
        ranks, seen = {}, {}
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    b64, rank = line.split()
                    token, rank = base64.b64decode(b64, validate=True), int(rank)
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: malformed line {line[:60]!r}: "
                                     f"expected 'base64(token bytes) rank'") from None
                if rank < 0 or rank in seen or token in ranks:
                    why = ("a negative rank" if rank < 0 else f"rank {rank} is also on line {seen[rank]}"
                           if rank in seen else f"token {token!r} is also on line {seen[ranks[token]]}")
                    raise ValueError(f"{path}:{lineno}: {why}")
                ranks[token], seen[rank] = rank, lineno
        if not ranks:
            raise ValueError(f"{path}: no tokens in the file")
        missing = sorted(set(range(len(ranks))) - set(seen))
        if missing:
            raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1} with no gaps; rank {missing[0]} "
                             f"is missing")
        no_byte = next((b for b in range(256) if bytes([b]) not in ranks), None)
        if no_byte is not None:  # tiktoken would panic on the first text that needs it
            raise ValueError(f"{path}: byte {no_byte:#04x} is not a token: a byte-level BPE has all 256")
        return cls(ranks, pattern)

    def save(self, path):
        """Write `path` (tiktoken / Meta format) atomically, and a readable `.vocab` file beside it."""
        by_rank = sorted(self.ranks.items(), key=lambda kv: kv[1])
        vocab_path = os.path.splitext(path)[0] + ".vocab"
        if os.path.abspath(vocab_path) == os.path.abspath(path):
            raise ValueError(f"{path}: the tokenizer and its readable .vocab would be the same file: name it *.model")
        text = "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in by_rank)
        atomic_write(path, lambda f: f.write(text.encode()))
        lines = [f"{rank}\t{render_token(tok)}\n" for tok, rank in by_rank]
        lines += [f"{i}\t{tok}\n" for tok, i in self.special_tokens.items()]
        atomic_write(vocab_path, lambda f: f.write("".join(lines).encode()))

    def fingerprint(self):
        """Short hash of ranks, split pattern and the number of special tokens: the same fingerprint, the same ids
        (the special tokens' names are not in it: 3.1 renamed reserved slots, their ids stayed)."""
        h = hashlib.sha256(self.pattern.encode())
        for tok, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]):
            h.update(base64.b64encode(tok) + b" %d\n" % rank)
        h.update(b"special %d" % len(self.special_tokens))
        return h.hexdigest()[:16]

    def encode(self, text, bos=False, eos=False):
        """Plain text -> ids. Special-token strings in text are ordinary characters (encode_ordinary)."""
        ids = [self.bos_id] if bos else []
        for piece in encode_pieces(text):
            ids += self.enc.encode_ordinary(piece)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts, bos=False, eos=False):
        """Many texts at once, on threads (tiktoken's encoder lets go of the GIL), as tiktoken's own batch."""
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda text: self.encode(text, bos, eos), texts))

    def decode_bytes(self, ids):
        """ids -> raw bytes. A prefix of a stream may end inside a UTF-8 character: decode once complete."""
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.n_words):
            bad = next(i for i in ids if not 0 <= i < self.n_words)
            raise ValueError(f"token id {bad} is out of range: this tokenizer has ids 0..{self.n_words - 1}")
        return self.enc.decode_bytes(ids)

    def decode(self, ids):
        """ids -> str; bytes that are not valid UTF-8 (a cut-off character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # Llama 3 chat format (Meta's llama3 ChatFormat): a header per message, content stripped, <|eot_id|>.
    def _header(self, role):
        return [self.start_header_id] + self.encode(role) + [self.end_header_id] + self.encode("\n\n")

    def encode_dialog(self, messages):
        """Render a conversation for training -> (ids, mask); mask[i] = 1 on the tokens the model learns
        to produce (each assistant message's content and its <|eot_id|>), 0 elsewhere."""
        check_dialog(messages)
        ids, mask = [self.bos_id], [0]
        for m in messages:
            header = self._header(m["role"])
            body = self.encode(m["content"].strip()) + [self.eot_id]
            ids += header + body
            mask += [0] * len(header) + [int(m["role"] == "assistant")] * len(body)
        return ids, mask

    def encode_dialog_prompt(self, messages):
        """Render a conversation that the model should answer: ends with an open assistant header."""
        check_dialog(messages)
        if messages[-1]["role"] != "user":
            raise ValueError(f"the last message is the {messages[-1]['role']}'s: the prompt must end with the "
                             "user's turn")
        ids, _ = self.encode_dialog(messages)
        return ids + self._header("assistant")


def atomic_write(path, write):
    """write(f) into a temporary file beside path (its folder made if missing), fsync, then rename over path: readers
    see the old file or the new, never half of one, and a failed write leaves no temporary behind. Every file this
    project writes whole goes through here (tokenizers, shards, meta.json, checkpoints, logs); train.py appends
    rows to log.csv."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:  # some filesystems (a VM's shared folder, FUSE, CIFS) cannot fsync a folder: the file is there
            pass


# ----------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Train or inspect a Llama 3 style BPE tokenizer.")
    parser.add_argument("--source", default="stdlib", help="what data.py reads: stdlib | PATH (file or folder of "
                        ".txt, .md, .jsonl[.gz], .parquet, .html, .warc[.gz], .wet[.gz]) | hf:NAME[:CONFIG]")
    parser.add_argument("--blocklist", help="a file of domains whose WARC/WET pages are left out, as data.py "
                        "--blocklist leaves them out of the shards")
    parser.add_argument("--vocab_size", type=int, default=8192, help="tokens in all, 256 specials included")
    parser.add_argument("--out", default="tok.model", help="where to write the tokenizer (+ .vocab beside it)")
    parser.add_argument("--load", help="inspect an existing tokenizer.model instead of training")
    parser.add_argument("--encode", help="a string to show as tokens")
    args = parser.parse_args()
    if args.encode is not None and args.load is None:
        parser.error("--encode needs --load TOKENIZER (without --load, tokenizer.py trains one and writes --out)")
    if args.blocklist and args.load is not None:
        parser.error("--blocklist is for training (it leaves pages out of the text); --load reads a tokenizer")
    for name in ("source", "vocab_size", "out"):  # (--load writes nothing: each would be ignored)
        if args.load is not None and getattr(args, name) != parser.get_default(name):
            parser.error(f"--{name} is for training; --load reads a tokenizer (and writes nothing)")
    if args.load is None:  # --out checked now: a save that fails (a traceback) would lose the training
        if not args.out or os.path.isdir(args.out) or args.out.endswith(("/", os.sep)):  # ("": the folder we are in)
            parser.error(f"--out {args.out} is a folder: give the tokenizer's file, e.g. "
                         f"{os.path.join(args.out, 'tok.model')}")
        if os.path.abspath(os.path.splitext(args.out)[0] + ".vocab") == os.path.abspath(args.out):
            parser.error(f"--out {args.out}: its readable .vocab would be written over it: name it *.model")
        above = os.path.dirname(os.path.abspath(args.out))
        while not os.path.exists(above):  # the nearest folder there is: save makes the ones below it
            above = os.path.dirname(above)
        if not os.path.isdir(above):
            parser.error(f"--out {args.out}: {above} is a file, not a folder")

    if args.load is not None:  # (--load "", an unset shell variable: an error, not a training over tok.model)
        try:
            tok = Tokenizer.load(args.load)
        except (ValueError, OSError) as e:  # a malformed file (named with its line), a missing or unreadable one
            sys.exit(str(e))
    else:
        from data import check_blocklist, clean_text, iter_documents, read_blocklist  # data.py imports this file
        # trained on the text the shards will hold: cleaned as data.py cleans it (\n newlines, no trailing spaces),
        # without the pages of blocklisted domains
        try:
            check_blocklist(args.blocklist, args.source)
            blocklist = read_blocklist(args.blocklist) if args.blocklist else ()
            tok = Tokenizer.train(map(clean_text, iter_documents(args.source, blocklist)), args.vocab_size,
                                  verbose=True)
        except (ValueError, FileNotFoundError, ImportError) as e:  # as data.py's: bad input named, no traceback
            sys.exit(f"tokenizer.py: {e}")
        tok.save(args.out)
        print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.vocab")
    print(f"{tok.n_words} tokens: 256 bytes + {len(tok.ranks) - 256} merged + {N_SPECIAL} special "
          f"(<|begin_of_text|> = {tok.bos_id}, <|eot_id|> = {tok.eot_id}); fingerprint {tok.fingerprint()}")
    if args.encode is not None:
        ids = tok.encode(args.encode)
        print(ids)
        print(" | ".join(render_token(tok.decode_bytes([i])) for i in ids))
