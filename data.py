"""data.py — from raw text to packed, document-masked training batches (Llama 3 §3.1, "pre-training data").

    sources [web pages: URL dedup, HTML -> text] -> clean -> lines of repeated content -> exact dedup
            -> heuristic filters (incl. personal data, [dirty words]) -> MinHash near-dedup -> [line-level dedup]
            -> [model-based quality filter]
            -> tokenize (processes x tiktoken threads) -> {train,val}_NNN.bin uint32 shards
            -> [token-distribution outliers: the shards written again without them] -> meta.json
            -> PackedLoader: (x, y, doc_ids) windows of (B, T), packed across documents and shards
            -> MixedLoader: rows from several such folders in given shares of the tokens (the data mix)

Design choices
- Sources: "stdlib" (the default: every .py file of the running interpreter's standard library as a code
  document, plus one English document per module made of its docstrings, plus pydoc's topic pages — no
  download needed), a local file or folder of .txt/.md (a file is a document), .jsonl/.jsonl.gz (the "text"
  field of each line), .parquet (needs pyarrow), .html/.htm (a page), .warc[.gz] / .wet[.gz] (Common Crawl's),
  or "hf:NAME[:CONFIG]" (a streamed Hugging Face dataset, needs the datasets package and the network).
- Web pages (Llama 3 §3.1.1): a WARC file's pages are its 200 responses of HTML (or the text of WET "conversion"
  records); across all the WARC files of a source only the newest page of each URL is read (URL-level dedup,
  a first pass over the files), and none of a domain on a --blocklist (Llama 3's safety filter). Text comes out
  of HTML in the worker processes (html_to_text: the main text, boilerplate dropped, code blocks, image alt text
  and TeX kept, no markdown); documents where e-mail and public IP addresses are dense go (Llama 3 removes pages
  with high volumes of personal data).
- Bad JSONL: a line that is not JSON means a truncated or corrupt file, so it is an error naming file and line;
  a valid record without a string "text" field is skipped and counted, with one warning per file naming the
  first such line (web dumps carry the odd metadata-only record; a whole run should not die for it).
- Every step is a small function with its rule beside it; prepare_data prints how many documents and bytes
  each step removed. The model-based quality filter (Llama 3 trained fastText/RoBERTa classifiers on Llama 2
  labels) is here: a labeller scores a sample (ours: bits per byte under a trained checkpoint, lower = better),
  a hashed word n-gram logistic regression learns the labels and scores every document, the low scorers go.
  It runs only when a checkpoint is named (--quality_model): the first run has no model to label with.
  The labelled sample is the first quality_sample surviving documents (shuffle a source sorted by quality).
- Line-level dedup (Llama 3's, --line_dedup 6) is off by default: it is for web text, and our default corpus is
  code, where `try:` and `else:` repeat by nature.
- Processes: cleaning, the heuristics and the MinHash signatures, then tokenization (tiktoken straight to
  uint32 arrays, in threads on the worker's share of the cores), run in num_proc forked workers on ~4 MB
  chunks; the decisions that need every document seen so far (dedup, the split, the shard writer) stay in the
  main process, in source order, so the shards are the same for any num_proc. Dedup memory grows with the
  kept documents (a 16-byte hash and a 480-byte signature each): fine up to ~10M documents; web-scale dedup
  is a cluster job of its own.
- Shards: 64-byte header (magic, version, vocab size, <|begin_of_text|> id, docs, tokens, tokenizer
  fingerprint) then little-endian uint32 tokens (a 128K vocab does not fit uint16). Every shard starts a
  document and every document starts with <|begin_of_text|>, so boundaries are recovered from the tokens.
  Files are written to a temporary name and renamed; meta.json is written last, so a folder with meta.json is
  complete; it holds each shard's CRC-32, which train.py checks (a flipped bit in a token would train).
  Train/val split by document, by its hash: 1 in round(1/val_fraction) kept documents, the same ones whatever the
  other documents are (a filter that removes some, a source read in another order), so val losses stay comparable.
- Loader: the split's shards form one token stream, cut into windows of T tokens (x = stream[p:p+T],
  y = stream[p+1:p+T+1]); nothing is padded and every token of an epoch is an input exactly once, but for the
  stream's last (n_tokens - 1) % T + 1 (at most one window's worth, the same every epoch).
  Target at a document boundary: the last token of a document has target <|begin_of_text|> and we keep it —
  under the document mask that prediction sees only its own document, so it is the model learning "this document
  ends here" (we write no <|end_of_text|>); nothing leaks across documents, and no position is wasted.
  doc_ids[b, t] = number of <|begin_of_text|> in x[b, :t+1] minus the count at t=0, so 0 is the (part of a)
  document the window starts in. Shuffle: windows are dealt into blocks of 2^20 consecutive windows; each epoch
  visits the blocks in a random order and the windows inside a block in a random order (seeded by seed, epoch),
  so memory is two permutations however large the data; tokens are np.memmap'ed, never loaded.
  DDP: global batch b holds the next B * world_size windows of that order, rank r takes rows [r*B, (r+1)*B):
  ranks never overlap and together see every window. The state is the number of windows consumed.
- Data mix (MixedLoader): folders made from different sources are mixed at training time, not by copying tokens
  around: each row of a batch is drawn from one folder with probability its share of the tokens, and each folder
  reads its own shuffled windows in turn (train.py --data data/web=0.7 data/code=0.3). A share changes without
  rebuilding a shard: Llama 3 chose its mix from small-model experiments, and changed it for the annealing.

Run it
    python data.py --source stdlib --tokenizer data/stdlib/tok.model --out data/stdlib
    python data.py --source ~/corpus/ --tokenizer tok.model --out data/corpus --num_proc 8
    python data.py --source hf:HuggingFaceFW/fineweb-edu:sample-10BT --max_docs 100000 --line_dedup 6 \
        --tokenizer tok.model --out data/fineweb  # pip install datasets
    python data.py --source stdlib --tokenizer data/stdlib/tok.model --out data/stdlib-q --quality_model out/default
train.py calls prepare_data(...) and PackedLoader(...) itself, so `python train.py` needs none of this by hand.
"""
import argparse
import ast
import datetime
import gzip
import hashlib
import ipaddress
import itertools
import json
import math
import multiprocessing
import numbers
import os
import re
import shutil
import struct
import sys
import sysconfig
import time
import unicodedata
import urllib.parse
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser

import numpy as np
import regex
import torch
from tqdm import tqdm

from tokenizer import SURROGATE, Tokenizer, atomic_write, encode_pieces, stdlib_sources, text_batches

# -----------------------------------------------------------------------------
# 1. Sources: every function yields documents as str


def docstrings(node, name):
    """(qualified name, docstring) of a module, class or function and of those defined in its body, depth
    first (a function defined inside an `if` or `try` block is not visited)."""
    doc = ast.get_docstring(node)
    if doc:
        yield name, doc
    for child in node.body:
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from docstrings(child, f"{name}.{child.name}")


class Part(str):
    """A document that goes to the split (is_val) of `of`, the name of the whole it is part of: a module's
    docstrings are in its code word for word, and split apart, val would hold text that train has."""

    def __new__(cls, text, of):
        self = super().__new__(cls, text)
        self.of = of
        return self

    def __reduce__(self):  # (pickled on its way to a worker process)
        return Part, (str(self), self.of)


def stdlib_documents():
    """The default corpus: each standard-library module as code, then (except for test modules, whose
    docstrings are one-liners) its docstrings as an English document, in the module's split (Part), then
    pydoc's topic pages (the language reference text behind help('if'))."""
    root = sysconfig.get_paths()["stdlib"]
    for path, text in stdlib_sources():
        of = os.path.relpath(path, root)   # (the module's file: code and docstrings split as one)
        yield Part(text, of)
        if {"test", "tests", "idle_test"} & set(of.split(os.sep)[:-1]):
            continue  # (inside the stdlib: a user named "test" keeps the docstrings)
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):  # a few files are deliberately broken Python
            continue
        module = os.path.splitext(of)[0].replace(os.sep, ".")
        parts = [f"{name}\n\n{doc}" for name, doc in docstrings(tree, module)]
        if parts:
            yield Part("\n\n\n".join(parts), of)
    from pydoc_data.topics import topics
    for name in sorted(topics):
        yield topics[name]


def read_jsonl(path, field="text"):
    """Yield the `field` string of each line of a .jsonl or .jsonl.gz file.
    Not JSON -> ValueError naming file:line (corrupt file). No string field -> skipped, counted, warned."""
    opener = gzip.open if path.endswith(".gz") else open
    missing, first_missing, lineno = 0, None, 0
    with opener(path, "rb") as f:
        while True:
            try:
                line = next(f, None)  # gzip: a cut or foreign file fails here
            except (EOFError, OSError, zlib.error) as e:
                raise ValueError(f"{path}: unreadable after line {lineno} ({e}); is the file truncated?") from None
            if line is None:
                break
            lineno += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8").removeprefix("\ufeff"))  # (a BOM: Windows editors write one)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 (byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); is the file truncated?") from None
            except (ValueError, RecursionError) as e:  # valid JSON Python refuses: over 4,300 digits, deep nesting
                raise ValueError(f"{path}:{lineno}: JSON that Python cannot read ({e})") from None
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                missing += 1
                first_missing = first_missing or lineno
                continue
            yield text
    if missing:
        print(f"warning: {path}: skipped {missing} line(s) without a string {field!r} field "
              f"(first at line {first_missing})", file=sys.stderr)


def read_parquet(path, field="text"):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no {field!r} column (columns: {pf.schema_arrow.names})")
    yield from only_strings((t for batch in pf.iter_batches(columns=[field]) for t in batch.column(0).to_pylist()),
                            path, field)


def only_strings(values, where, field="text"):
    """Yield the strings; skip the rest (None, numbers: a dataset's missing values) and say how many at the end."""
    skipped = 0
    for v in values:
        if isinstance(v, str):
            yield v
        else:
            skipped += 1
    if skipped:
        print(f"warning: {where}: skipped {skipped} record(s) without a string {field!r}", file=sys.stderr)


def read_file(path):
    if path.endswith((".jsonl", ".jsonl.gz")):
        yield from read_jsonl(path)
    elif path.endswith(".parquet"):
        yield from read_parquet(path)
    elif path.endswith((".html", ".htm")):
        with open(path, "rb") as f:
            yield HTML(decode_html(f.read()))  # (its text is extracted by clean_text, in the worker processes)
    elif path.endswith((".txt", ".md")):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 (byte {e.start}); convert it or remove it") from None
    else:
        raise ValueError(f"{path}: unknown file type (want {', '.join(SUFFIXES)})")


WARC = (".warc", ".warc.gz", ".wet", ".wet.gz")  # Common Crawl's archives: pages (WARC), their text (WET)
SUFFIXES = (".txt", ".md", ".jsonl", ".jsonl.gz", ".parquet", ".html", ".htm") + WARC


def iter_documents(source, blocklist=(), removed=None):
    """source: "stdlib" | a file or folder path | "hf:NAME[:CONFIG]" -> documents (str), deterministic order.
    blocklist: domains whose WARC/WET pages are left out (read_blocklist); removed: where newest_pages counts the
    pages it leaves out."""
    if source == "stdlib":
        yield from stdlib_documents()
    elif source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        rows = hf_datasets(source).load_dataset(name, config or None, split="train", streaming=True)
        yield from only_strings((row.get("text") for row in rows), source)
    else:
        paths = source_files(source)
        newest = newest_pages([p for p in paths if p.endswith(WARC)], blocklist, removed)  # (URL dedup: all files)
        for path in paths:
            if path in newest:
                yield from (warc_page(h, b) for n, (h, b) in enumerate(warc_records(path)) if n in newest[path])
            else:
                yield from read_file(path)


def hf_datasets(source):
    """The datasets package, imported only for an "hf:" source, or an error saying so."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"source {source!r} needs the datasets package (pip install datasets)") from None
    return datasets


def source_files(source):
    """The files a file or folder source reads, in the order it reads them."""
    if os.path.isdir(source):
        paths = sorted(p for p in folder_files(source) if p.endswith(SUFFIXES))
        if not paths:
            raise ValueError(f"{source}: no {', '.join(SUFFIXES)} files in this folder")
        return paths
    if os.path.isfile(source):
        return [source]
    raise FileNotFoundError(f"source {source!r}: not 'stdlib', 'hf:NAME' or an existing file or folder")


def folder_files(folder, inside=()):
    """The files under folder as glob's "**" finds them (hidden names left out, symlinked folders followed), but for
    a symlink to a folder they are inside (a loop: glob went ~40 deep, each file read 41 times, and two loops were
    2^40 paths). A subfolder that cannot be listed is an error (glob left it out without a word)."""
    inside += (os.path.realpath(folder),)
    with os.scandir(folder) as it:
        entries = list(it)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if os.path.realpath(entry.path) not in inside:
                yield from folder_files(entry.path, inside)
        elif entry.is_file():
            yield entry.path


def source_stamp(source):
    """What changes when a source's documents may have: the name, size and modification time of each of its
    files (what make and rsync compare; hashing a corpus at every start would take minutes), the interpreter
    for "stdlib", nothing for "hf:" (a hub dataset is named by the source string). Stored in meta.json, so that
    a cache of edited files is rebuilt rather than silently reused."""
    if source == "stdlib":
        return f"python {sys.version.split()[0]} {sysconfig.get_paths()['stdlib']}"
    if source.startswith("hf:"):
        return None
    return files_stamp(source_files(source), source)


def files_stamp(paths, root):
    """A hash of each file's path under root, size and modification time."""
    h = hashlib.sha256()
    for path in paths:
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# 1b. Web pages (Llama 3 §3.1.1): text from HTML, Common Crawl's WARC files, URL-level dedup

class HTML(str):
    """A web page's markup on its way to a worker process, which extracts its text (html_to_text)."""


SKIP = {"title", "script", "style", "noscript", "template", "svg", "canvas", "iframe", "object", "nav", "header",
        "footer", "aside", "button", "select", "textarea"}  # never the page's content (a <form> may wrap a page)
BOILERPLATE = {"nav", "navbar", "navigation", "menu", "sidebar", "footer", "cookie", "cookies", "banner", "popup",
               "modal", "breadcrumb", "breadcrumbs", "share", "sharing", "social", "advert", "advertisement",
               "ads"}  # a class that is one of these, or starts with one and "-" or "_" ("menu-bar"), is not content

BLOCK = {"p": 2, "div": 1, "section": 2, "article": 2, "main": 2, "h1": 2, "h2": 2, "h3": 2, "h4": 2, "h5": 2,
         "h6": 2, "pre": 2, "blockquote": 2, "ul": 2, "ol": 2, "dl": 2, "table": 2, "figure": 2, "details": 2,
         "li": 1, "dt": 1, "dd": 1, "tr": 1, "br": 1, "hr": 2, "figcaption": 1, "caption": 1, "summary": 1,
         "address": 1, "center": 1, "form": 1, "fieldset": 1, "legend": 1, "dialog": 1, "search": 1,
         "listing": 2, "nav": 2, "header": 2, "footer": 2, "aside": 2}  # (the last four: dropped, see SKIP)
# a block's text stands on its own lines: 1 newline before it, or 2 (a blank line); a dropped one still parts the text
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}  # no end
KEEP = {"html", "body", "main", "article"} | VOID  # the page itself (<html class="sidebar-visible">: not boilerplate)
SECTION_ENDS = {"table", "thead", "tbody", "tfoot"}
CLOSED_BY = {  # elements whose end tag may be left out: the start tags and end tags that end them (HTML's rules)
    "p": (set(BLOCK) - {"br"}, set(BLOCK) | {"form", "td", "th", "body", "html"}),
    "li": ({"li"}, {"ul", "ol"}), "dt": ({"dt", "dd"}, {"dl"}), "dd": ({"dt", "dd"}, {"dl"}),
    "tr": ({"tr"}, SECTION_ENDS), "td": ({"td", "th", "tr"}, SECTION_ENDS | {"tr"}),
    "th": ({"td", "th", "tr"}, SECTION_ENDS | {"tr"}), "option": ({"option", "optgroup"}, {"select", "optgroup"})}
NESTS = {"ul", "ol", "dl", "table", "select"}  # inside these, items do not end the element around them
INLINE = {"span", "abbr", "bdi", "bdo", "cite", "data", "dfn", "kbd", "label", "mark", "q", "samp", "sub", "sup",
          "time", "var"}  # left open, they end with the item around them (HTML reopens <a>, <b>, <font>: not these)
MAX_LINK_SHARE = 0.5  # a block whose characters are mostly link text is a menu, a tag cloud or "next / previous"


def visible(text):
    """Characters that are not whitespace."""
    return len("".join(text.split()))


class TextExtractor(HTMLParser):
    """html_to_text's parser: text blocks in reading order, boilerplate skipped (rules: html_to_text)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks, self.parts, self.gap = [], [], 0  # finished blocks; the open block's text; newlines before it
        self.link_chars = 0  # characters of the open block in links to other pages
        self.skip = None     # [tag, depth, base] inside an element whose text is dropped; depth: the elements
                             # inside it still open that it cannot end before (opens_inside); base: its place
                             # in the stack (the end of an element around it ends it too)
        self.stack = []      # the open elements (HTML's stack, roughly: an end tag closes what is open inside it)
        self.open = Counter()  # how many of each tag it holds (sloppy pages leave thousands open: no list scans)
        self.pre, self.link = False, False  # inside <pre>; inside a link to another page (<a> do not nest)

    def flush(self, gap):
        text = "".join(self.parts)
        text = text.strip("\n") if self.pre else " ".join(text.split())  # <pre> keeps its spaces: code
        if text.strip() and (self.pre or self.link_chars <= MAX_LINK_SHARE * visible(text)):  # (code: all of it)
            self.blocks.append("\n" * (self.gap if self.blocks else 0) + text)
            self.gap = 0
        self.parts, self.link_chars, self.gap = [], 0, max(self.gap, gap)

    def handle_starttag(self, tag, attrs):
        top = len(self.stack)  # under the inline elements left open (8 at most: no scan of a page's thousands)
        while top and self.stack[top - 1] in INLINE and len(self.stack) - top < 8:
            top -= 1
        at = top
        while at and tag in CLOSED_BY.get(self.stack[at - 1], ((),))[0]:  # <li>a<li>: the first item ends, and
            at -= 1                                                        # the <span>s left open in it
        if self.skip and at < top and at > self.skip[2]:  # (ended inside the skipped element: its count of them)
            self.skip[1] = max(0, self.skip[1] - sum(opens_inside(self.skip[0], t) for t in self.stack[at:]))
        if at < top:
            self.end_element(at)
        if tag not in VOID:
            self.stack.append(tag)
            self.open[tag] += 1
        if self.skip:
            name, depth, base = self.skip
            ended = at < top and at <= base  # (by an implied end above: <p><span hidden>a<p>b)
            if not ended and (depth or name not in CLOSED_BY or tag not in CLOSED_BY[name][0]):
                self.skip[1] += opens_inside(name, tag)
                return
            self.skip = None  # <li hidden>a<li>b: the next item ends the skipped one, and is read below
        attrs = {k: v or "" for k, v in attrs}
        if tag in SKIP or (tag not in KEEP and boilerplate(attrs)):
            self.skip = [tag, 0, len(self.stack) - 1]
            if tag in BLOCK:  # a block dropped still ends the text before it ('a<div class=ads>..</div>b' is no 'ab')
                self.flush(BLOCK[tag])
        elif tag in BLOCK:
            self.flush(BLOCK[tag])
            self.pre = self.open["pre"] > 0
        elif tag in ("td", "th"):
            self.parts.append(" ")
        elif tag == "a":  # (a heading that links to itself, href="#...", is not navigation)
            self.link = not attrs.get("href", "#").startswith("#")
        elif tag == "img" and attrs.get("alt"):  # Llama 3 keeps alt text: math is often an image with its TeX there
            self.handle_data(f" {attrs['alt']} ")
        elif tag == "math" and attrs.get("alttext"):  # MathML with its TeX: the TeX, not the markup's symbols
            self.handle_data(f" {attrs['alttext']} ")
            self.skip = [tag, 0, len(self.stack) - 1]

    def handle_endtag(self, tag):
        at = next((i for i in range(len(self.stack) - 1, -1, -1) if self.stack[i] == tag), None) \
            if self.open[tag] else None  # the element it ends
        if self.skip:
            name, depth, base = self.skip
            if at is not None and at < base:  # an element around the skipped one ends, and with it the skipped one
                self.skip = None              # (<div><span class=share>3</div>: the page goes on after the div)
            elif depth or not (tag == name or tag in CLOSED_BY.get(name, ((), ()))[1]):
                self.skip[1] -= depth > 0 and opens_inside(name, tag)  # (an element inside it closes)
                self.end_element(at)
                return
            else:  # its end tag, or <ul><li hidden>a</ul>: the parent's end ends the item (read below)
                self.skip = None
                if tag == name:
                    return self.end_element(at)
        if tag in BLOCK:
            self.flush(BLOCK[tag])
        elif tag == "a":
            self.link = False
        self.end_element(at)

    def end_element(self, at):
        """The end of the open element at stack position `at` (None: a stray end tag), and of those inside it:
        an unclosed <pre> ends with its parent (its text flushed as code first), an unclosed link too."""
        if at is None:
            return
        ended = self.stack[at:]
        if self.pre and "pre" in ended and not self.skip:   # (one opened in a dropped element held no text)
            self.flush(BLOCK["pre"])
        self.link = self.link and "a" not in ended
        for tag in ended:
            self.open[tag] -= 1
        del self.stack[at:]
        self.pre = self.open["pre"] > 0

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)
            self.link_chars += visible(data) if self.link else 0


def opens_inside(name, tag):
    """Inside a skipped element `name`: whether `tag` is an element that must close before `name` can end (its own
    tag nested in it; for one of CLOSED_BY, a list or table inside it, whose items do not end it)."""
    return tag in NESTS if name in CLOSED_BY else tag == name


def boilerplate(attrs):
    """Whether an element's attributes say it is not the page's content: hidden, or a class naming boilerplate."""
    style = attrs.get("style", "").lower().replace(" ", "")
    return ("hidden" in attrs or attrs.get("aria-hidden", "").lower() == "true" or "display:none" in style
            or "visibility:hidden" in style
            or any(re.split(r"[-_]", name)[0] in BOILERPLATE for name in attrs.get("class", "").lower().split()))


def html_to_text(html):
    """A page's main text, plain (Llama 3: "markdown markers" hurt, so none are written), one block per paragraph:
    - dropped: <title>, scripts, styles, navigation, headers, footers, asides, buttons; elements hidden (hidden,
      aria-hidden, display:none, ...) or whose class names boilerplate (menu, sidebar, cookie, share, ads, ...);
      blocks whose characters are mostly link text. (Llama 3's parser aims at precision in removing boilerplate
      and at recall of content; where they conflict, this one drops text: an unclosed <nav> ends its page
      unless an element around it ends.)
    - kept: text in reading order, <pre> with its spaces (code), the alt text of images and the TeX of <math
      alttext=...> (Llama 3 keeps both for mathematics), table cells separated by spaces.
    '<nav><a href=/>Home</a></nav><h1>Hi</h1><p>a &amp; <b>b</b></p><pre>x = 1\\n  y</pre>'
    -> 'Hi\\n\\na & b\\n\\nx = 1\\n  y'"""
    parser = TextExtractor()
    try:
        parser.feed(html.replace("\r\n", "\n").replace("\r", "\n"))  # (HTML reads CR LF and CR as LF)
        if not parser.rawdata.startswith("<"):  # a page cut inside a tag or comment: the rest is markup, not text
            parser.close()
    except AssertionError:  # html.parser gives up on a few malformed "<![" sections: keep the text before it
        pass
    parser.flush(0)
    return "".join(parser.blocks)


META_CHARSET = re.compile(rb"""<meta[^>]*?charset\s*=\s*["']?([\w.:-]+)""", re.IGNORECASE)
# scripts and comments, which hide a <meta> (an unclosed one runs to the end; <!--> and <!---> are empty comments, a
# comment may end --!>, and a "<!--" inside a script is script)
COMMENT = re.compile(rb"<script\b.*?(?:</script\s*>|\Z)|<!--(?:-?>|.*?(?:--!?>|\Z))", re.DOTALL | re.IGNORECASE)
BODY = re.compile(rb"<body", re.IGNORECASE)
# The WHATWG Encoding Standard's label table (encoding.spec.whatwg.org, "Names and labels"), by the Python codec that
# decodes as its encoding does: every label a browser knows. Any other names no encoding to a browser, nor here
# (utf-7, utf-32, latin_1, unicode_escape, base64: Python's codecs, no page's). Where Python's codec of a label's name
# differs, the browser's wins: latin1 and ascii are windows-1252 (Python's latin-1 turns curly quotes and dashes into
# control characters, which clean_text deletes), gb2312 is GBK (the gb18030 decoder), euc-kr is windows-949,
# shift_jis is Windows-31J, utf-16 is UTF-16LE. x-user-defined is windows-1252 (a browser's reading of it in a <meta>).
WHATWG_ENCODINGS = {
    "utf-8": "unicode-1-1-utf-8 unicode11utf8 unicode20utf8 utf-8 utf8 x-unicode20utf8",
    "cp866": "866 cp866 csibm866 ibm866",
    "iso8859-2": "csisolatin2 iso-8859-2 iso-ir-101 iso8859-2 iso88592 iso_8859-2 iso_8859-2:1987 l2 latin2",
    "iso8859-3": "csisolatin3 iso-8859-3 iso-ir-109 iso8859-3 iso88593 iso_8859-3 iso_8859-3:1988 l3 latin3",
    "iso8859-4": "csisolatin4 iso-8859-4 iso-ir-110 iso8859-4 iso88594 iso_8859-4 iso_8859-4:1988 l4 latin4",
    "iso8859-5": "csisolatincyrillic cyrillic iso-8859-5 iso-ir-144 iso8859-5 iso88595 iso_8859-5 iso_8859-5:1988",
    "iso8859-6": "arabic asmo-708 csiso88596e csiso88596i csisolatinarabic ecma-114 iso-8859-6 iso-8859-6-e "
                 "iso-8859-6-i iso-ir-127 iso8859-6 iso88596 iso_8859-6 iso_8859-6:1987",
    "iso8859-7": "csisolatingreek ecma-118 elot_928 greek greek8 iso-8859-7 iso-ir-126 iso8859-7 iso88597 iso_8859-7 "
                 "iso_8859-7:1987 sun_eu_greek",
    "iso8859-8": "csiso88598e csisolatinhebrew hebrew iso-8859-8 iso-8859-8-e iso-ir-138 iso8859-8 iso88598 iso_8859-8 "
                 "iso_8859-8:1988 visual csiso88598i iso-8859-8-i logical",  # (ISO-8859-8-I too: the same bytes)
    "iso8859-10": "csisolatin6 iso-8859-10 iso-ir-157 iso8859-10 iso885910 l6 latin6",
    "iso8859-13": "iso-8859-13 iso8859-13 iso885913",
    "iso8859-14": "iso-8859-14 iso8859-14 iso885914",
    "iso8859-15": "csisolatin9 iso-8859-15 iso8859-15 iso885915 iso_8859-15 l9",
    "iso8859-16": "iso-8859-16",
    "koi8-r": "cskoi8r koi koi8 koi8-r koi8_r",
    "koi8-u": "koi8-ru koi8-u",
    "mac-roman": "csmacintosh mac macintosh x-mac-roman",
    "cp874": "dos-874 iso-8859-11 iso8859-11 iso885911 tis-620 windows-874",
    "cp1250": "cp1250 windows-1250 x-cp1250",
    "cp1251": "cp1251 windows-1251 x-cp1251",
    "cp1252": "ansi_x3.4-1968 ascii cp1252 cp819 csisolatin1 ibm819 iso-8859-1 iso-ir-100 iso8859-1 iso88591 "
              "iso_8859-1 iso_8859-1:1987 l1 latin1 us-ascii windows-1252 x-cp1252 x-user-defined",
    "cp1253": "cp1253 windows-1253 x-cp1253",
    "cp1254": "cp1254 csisolatin5 iso-8859-9 iso-ir-148 iso8859-9 iso88599 iso_8859-9 iso_8859-9:1989 l5 latin5 "
              "windows-1254 x-cp1254",
    "cp1255": "cp1255 windows-1255 x-cp1255",
    "cp1256": "cp1256 windows-1256 x-cp1256",
    "cp1257": "cp1257 windows-1257 x-cp1257",
    "cp1258": "cp1258 windows-1258 x-cp1258",
    "mac-cyrillic": "x-mac-cyrillic x-mac-ukrainian",
    "gb18030": "chinese csgb2312 csiso58gb231280 gb2312 gb_2312 gb_2312-80 gbk iso-ir-58 x-gbk gb18030",
    "big5hkscs": "big5 big5-hkscs cn-big5 csbig5 x-x-big5",
    "euc_jp": "cseucpkdfmtjapanese euc-jp x-euc-jp",
    "iso2022_jp": "csiso2022jp iso-2022-jp",
    "cp932": "csshiftjis ms932 ms_kanji shift-jis shift_jis sjis windows-31j x-sjis",
    "cp949": "cseuckr csksc56011987 euc-kr iso-ir-149 korean ks_c_5601-1987 ks_c_5601-1989 ksc5601 ksc_5601 "
             "windows-949",
    "replacement": "csiso2022kr hz-gb-2312 iso-2022-cn iso-2022-cn-ext iso-2022-kr replacement",
    "utf-16-be": "unicodefffe utf-16be",
    "utf-16-le": "csunicode iso-10646-ucs-2 ucs-2 unicode unicodefeff utf-16 utf-16le",
}
WHATWG_LABELS = {label: codec for codec, labels in WHATWG_ENCODINGS.items() for label in labels.split()}
MAX_RECORD = 1 << 30  # bytes: a larger WARC record is a damaged header (Common Crawl cuts pages at 1 MiB)


def codec_of(label):
    """A charset label -> the Python codec that decodes as a browser does (WHATWG_LABELS), "replacement" (a browser
    shows no text), or None: a label no browser knows, which it reads as no label."""
    return WHATWG_LABELS.get(label.strip().strip("\"'").lower())


def latin_legacy(raw, text):
    """Whether an unlabelled page, `text` its bytes `raw` read as UTF-8, is rather an old Western page: most of its
    non-ASCII characters are no UTF-8 (a U+FFFD the page holds, validly encoded, is none of them), and most of its
    non-ASCII bytes stand alone or in pairs, as accents do (é, ß; a Cyrillic or CJK legacy page's bytes run in words:
    read as windows-1252 they would be fluent garbage, where U+FFFD lets the heuristics drop the page)."""
    bad = text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")
    if bad <= 0 or 2 * bad <= len(text) - len(text.encode("ascii", "ignore")):
        return False
    high = len(raw) - len(raw.decode("ascii", "ignore"))
    return 2 * sum(map(len, re.findall(rb"[\x80-\xff]{3,}", raw))) < high


def decode_html(raw, charset=None):
    """Bytes of a page -> str, by its byte-order mark, or else the charset its HTTP header gives, or its <meta>
    tag (in its <head> or its first 1024 bytes, outside comments and scripts; UTF-16 there means UTF-8, since the
    tag was read as ASCII), or else UTF-8, or windows-1252 for an old Western page (latin_legacy). A
    label that names no encoding is passed over, one of the "replacement" encoding (iso-2022-kr, hz-gb-2312, ...)
    leaves no text; bytes that do not decode become U+FFFD, as in a browser (pages often misstate their charset)."""
    codec = charset and codec_of(charset)
    if not codec:
        head = COMMENT.sub(b"", raw[:1 << 16])
        body = BODY.search(head)  # (a browser reads a <meta> in the first 1024 bytes wherever it is, later in the head)
        m = META_CHARSET.search(head[:max(body.start(), 1024)] if body else head)
        codec = m and codec_of(m.group(1).decode("ascii"))
        codec = "utf-8" if codec and codec.startswith("utf-16") else codec
    for bom, name in ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if raw.startswith(bom):  # a byte-order mark outranks every label, as in a browser
            codec = name
    if codec == "replacement":  # a browser shows one U+FFFD for the page (7-bit encodings that could hide markup)
        return ""
    text = raw.decode(codec or "utf-8", "replace")
    if not codec and latin_legacy(raw, text):  # no label: HTML leaves the guess to the browser, whose detector
        text = raw.decode("cp1252", "replace")  # reads an old Western page as windows-1252
    return text


def warc_records(path):
    """(WARC headers with lower-case names, content block bytes) of each record of a .warc or .warc.gz file
    (Common Crawl gzips each record on its own; gzip reads the members as one stream).
    Not WARC, cut inside a record, or damaged gzip -> ValueError naming the file and the record."""
    opener = gzip.open if path.endswith(".gz") else open
    n = 0
    with opener(path, "rb") as f:
        try:
            while line := f.readline():
                if not line.strip():
                    continue  # the blank lines that end each record
                if not line.startswith(b"WARC/"):
                    raise ValueError(f"{path}: record {n + 1}: not a WARC record (it starts {line[:40]!r})" +
                                     (f"; or record {n}'s Content-Length is wrong" if n else ""))
                headers = {}
                while (line := f.readline()).strip():
                    name, _, value = line.decode("utf-8", "replace").partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = headers.get("content-length", "")
                if not line or not re.fullmatch(r"[0-9]{1,10}", length) or int(length) > MAX_RECORD:
                    raise ValueError(f"{path}: record {n + 1}: " + ("cut inside its header" if not line else
                                     "no Content-Length" if not length else
                                     f"Content-Length {length!r} is not a size up to {MAX_RECORD:,} bytes"))
                block = f.read(int(length))
                if len(block) < int(length):
                    raise ValueError(f"{path}: record {n + 1}: cut ({len(block)} of {length} bytes); is the "
                                     f"file truncated?")
                n += 1
                yield headers, block
        except (EOFError, OSError, zlib.error) as e:  # gzip: a cut or foreign file fails here
            raise ValueError(f"{path}: unreadable after record {n} ({e}); is the file truncated?") from None


def warc_page(headers, block):
    """A WARC record -> its page: HTML (a 200 response of an HTML page, to extract), str (a WET "conversion"
    record: text Common Crawl extracted), or None (requests, metadata, redirects, errors, images, PDFs, ...)."""
    kind = headers.get("warc-type")
    if kind == "conversion":
        return block.decode("utf-8", "replace")
    blank = re.search(rb"\r?\n\r?\n", block)  # the end of the HTTP header (CRLF, or LF from some writers)
    if kind != "response" or not headers.get("content-type", "").lower().startswith("application/http") or not blank:
        return None
    status, *lines = block[:blank.start()].decode("latin-1").splitlines() or [""]  # (no status line: no page)
    http = {k.strip().lower(): v.strip().lower() for k, _, v in (line.partition(":") for line in lines)}
    content_type = http.get("content-type", "")
    if status.split()[1:2] != ["200"] or "html" not in content_type or any(  # (Common Crawl stores bodies decoded)
            http.get(h, "identity") != "identity" for h in ("content-encoding", "transfer-encoding")):
        return None
    charset = re.search(r"charset\s*=\s*[\"']?([\w.:-]+)", content_type)
    body = block[blank.end():]
    return HTML(decode_html(body, charset and charset.group(1)))


def newest_pages(paths, blocklist=(), removed=None):
    """URL-level dedup across the WARC files `paths` (Llama 3: "we keep the most recent version for pages
    corresponding to each URL"): {path: numbers of its records to read}, the page of each URL with the latest
    WARC-Date (a tie keeps the first read), but none of a domain in `blocklist`. A first pass over the files: the
    URLs are held in memory, fine for a few million pages. The pages left out are counted in `removed` (step ->
    [documents, bytes], prepare_data's table), or else printed."""
    newest = {}  # URL -> (WARC-Date, path, record number, UTF-8 bytes)
    counts = {"URL: blocklisted": [0, 0], "URL: older version": [0, 0]}
    for path in paths:
        for n, (headers, block) in enumerate(warc_records(path)):
            page = warc_page(headers, block)
            if page is None:
                continue
            url = headers.get("warc-target-uri", "").strip("<>") or (path, n)  # (no URL: a page of its own)
            this = (warc_time(headers.get("warc-date", "")), path, n, len(page.encode("utf-8")))
            if blocklist and isinstance(url, str) and blocked(url, blocklist):
                step, gone = "URL: blocklisted", this
            elif url not in newest:
                step, gone, newest[url] = None, None, this
            elif this[0] > newest[url][0]:  # (a tie keeps the first read)
                step, gone, newest[url] = "URL: older version", newest[url], this
            else:
                step, gone = "URL: older version", this
            if gone:
                counts[step][0] += 1
                counts[step][1] += gone[3]
    keep = {path: set() for path in paths}
    for _, path, n, _ in newest.values():
        keep[path].add(n)
    for step, (docs, n_bytes) in counts.items():
        if docs and removed is not None:
            removed[step] = [docs, n_bytes]
        elif docs:
            print(f"data: {step}: {docs:,} of the pages of {len(paths)} WARC file(s) left out", file=sys.stderr)
    return keep


HOSTLESS = "/:@#?<>[\\]^|%"  # what no URL's host holds (WHATWG's forbidden domain code points): '||ads.example^'


def read_blocklist(path):
    """Domains whose pages are left out (Llama 3's safety filter drops domains ranked harmful or known for adult
    content; FineWeb used the UT1 lists): one per line, '#' comments, a leading '*.' ignored -> a set of domains
    in one form (host_form). A line that is not one domain (two words, a URL, a port, an adblock rule) -> ValueError
    naming file:line: UT1's `urls` files, beside its `domains` files, would otherwise block nothing."""
    domains = set()
    try:
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                words = [host_form(w.lstrip("*.")) for w in line.split("#")[0].split()]
                if len(words) > 1 or any(c in "".join(words) for c in HOSTLESS) or words and not words[0]:
                    raise ValueError(f"{path}:{lineno}: not a domain ({line.strip()[:60]!r})")
                domains.update(words)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 (byte {e.start})") from None
    if not domains:  # (an empty download, the wrong file: it would leave out nothing)
        raise ValueError(f"{path}: no domains listed")
    return domains


def check_blocklist(path, source):
    """Refuse by name a blocklist that is missing (or a UT1 category's folder) or given for a source without
    WARC/WET files, where it would leave out nothing. Cheap: the list is read later, by read_blocklist."""
    if not path:
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"blocklist {path}: no such file" + (" (a folder: of a UT1 category, give its "
                                "`domains` file)" if os.path.isdir(path) else ""))
    if source == "stdlib" or source.startswith("hf:") or not any(p.endswith(WARC) for p in source_files(source)):
        raise ValueError(f"blocklist {path}: it leaves out pages by their URL, and source {source!r} has no "
                         f"{' or '.join(WARC)} files")


def host_form(host):
    """One spelling per host name: lower case, no trailing dot, international labels as punycode ('bücher.de' ->
    'xn--bcher-kva.de'), so that a list and a URL that spell a domain differently still meet. As browsers spell
    them (IDNA 2008, UTS #46 non-transitional): 'straße' is 'xn--strae-oqa', where Python's idna codec (IDNA
    2003) makes it 'strasse'."""
    labels = LABEL_DOTS.split(unicodedata.normalize("NFKC", IDNA_IGNORED.sub("", host)).lower())
    while labels and not labels[-1]:
        labels.pop()   # (the trailing dot)
    try:
        return ".".join(label if label.isascii() else "xn--" + label.encode("punycode").decode("ascii")
                        for label in labels)
    except UnicodeError:  # (a lone surrogate)
        return host


LABEL_DOTS = re.compile("[.\u3002\uff0e\uff61]")  # the full stops IDNA reads as dots
# UTS #46's "ignored" code points, which IDNA maps to nothing before it normalizes (IdnaMappingTable.txt, Unicode 16,
# as the idna package's uts46data has them): soft hyphen, zero-width space, word joiner, BOM, variation selectors,
# invisible operators, Hangul fillers. A list or a link may carry one unseen: 'ex\u00adample.com' is 'example.com'
# to a browser. (Stringprep's table B.1, IDNA 2003's "mapped to nothing", holds 24 of them, and U+1806, valid in
# IDNA 2008, and the joiners U+200C/U+200D, which UTS #46 non-transitional keeps as "deviation" characters.)
IDNA_IGNORED = re.compile("[\u00ad\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b\u2060-\u2064\u206a-\u206f"
                          "\u3164\ufe00-\ufe0f\ufeff\uffa0\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
                          "\U000e0100-\U000e01ef]")


def blocked(url, domains):
    """Whether the URL's host is one of `domains` or inside one: 'https://a.B.com.:8080/x' is inside 'b.com'."""
    try:
        labels = host_form(urllib.parse.urlsplit(url).hostname or "").split(".")
    except ValueError:  # a malformed URL ("http://[::1")
        return False
    return any(".".join(labels[i:]) in domains for i in range(len(labels)))


def warc_time(date):
    """A WARC-Date (ISO 8601, UTC) -> seconds since 1970; unreadable -> -inf (older than any)."""
    try:
        return datetime.datetime.fromisoformat(date.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return -math.inf


# -----------------------------------------------------------------------------
# 2. Cleaning: one canonical form, so that dedup compares like with like

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")  # C0/C1 controls but \t \n, and the BOM
BLANK_LINES = re.compile(r"\n{4,}")


def clean_text(text):
    """NFC Unicode (one code point sequence per character; a lone surrogate becomes U+FFFD, as tiktoken would
    encode it), \\n newlines, no control characters, no trailing spaces, at most two blank lines in a row, no
    blank lines at either end.
    'Cafe\\u0301  \\r\\n\\r\\n\\r\\n\\r\\nx' -> 'Café\\n\\n\\nx'"""
    text = html_to_text(text) if isinstance(text, HTML) else text  # a web page: its text first
    text = SURROGATE.sub("\ufffd", text).replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", CONTROL.sub("", text))  # after the controls go: they may part a mark
    text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))   # (5x a regex's speed)
    text = BLANK_LINES.sub("\n\n\n", text)
    return text.strip("\n")


# -----------------------------------------------------------------------------
# 3. Deduplication: exact (a hash per document), near-duplicates (MinHash + LSH banding), repeated lines

def doc_hash(text):
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


# Words and letters by Unicode's rules (the `regex` module's \w includes combining marks; `re`'s does not, and
# splits हिन्दी into ह, न, द: every vowel sign of Devanagari, Tamil or Bengali, and Arabic's vowel marks, would
# end a word and count as a symbol). Thai and Chinese write no spaces: a "word" there is a whole phrase.
WORD = regex.compile(r"\w+")
NOT_WORD = bytes(b if regex.fullmatch(r"\w", chr(b)) else 32 for b in range(256))   # ASCII: word bytes kept, others
                                                                                   # a space (bytes.translate)


def words(text):
    """The text's words (WORD), lower-cased, as UTF-8 bytes. ASCII text (most code and English) is split by
    bytes.translate and split, ~5x faster than the regex and the same words."""
    if text.isascii():
        return text.encode("ascii").lower().translate(NOT_WORD).split()
    return [w.encode("utf-8") for w in WORD.findall(text.lower())]


def word_hashes(text):
    """Lower-cased words -> uint64 hashes (crc32: deterministic, unlike Python's salted hash())."""
    return np.array([zlib.crc32(w) for w in words(text)], dtype=np.uint64)


def ngram_hashes(h, n):
    """Combine n consecutive word hashes into one (polynomial hash, uint64 wrap-around).
    h=[a, b, c], n=2 -> [a*P + b, b*P + c]"""
    if len(h) < n:
        return h[:0]
    P = np.uint64(0x100000001B3)  # the FNV-64 prime: odd, so the map is a bijection mod 2^64
    out = h[: len(h) - n + 1].copy()
    for k in range(1, n):
        out = out * P + h[k: len(h) - n + 1 + k]
    return out


class MinHashDedup:
    """Near-duplicate removal (Broder 1997; the LSH recipe of Lee et al. 2022, "Deduplicating Training Data
    Makes Language Models Better", used for Llama 3's document-level dedup).
    Shingles: word 5-grams. Signature: for each of 120 hash functions h_i(x) = (a_i x + b_i) mod 2^64 >> 32
    (multiply-shift hashing, a_i odd), the minimum over the document's shingles; P(agree at i) = Jaccard(A, B).
    Banding: 20 bands of 6 rows; two documents are candidates if any band matches, probability 1-(1-J^6)^20
    (J=0.8 -> 0.998, J=0.5 -> 0.27, J=0.3 -> 0.01), then a candidate is a duplicate if its estimated Jaccard
    (the fraction of equal signature entries) is >= threshold. The first document of a cluster is kept."""

    def __init__(self, num_perm=120, bands=20, threshold=0.8, shingle=5, seed=0):
        assert num_perm % bands == 0
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self.b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
        self.bands, self.rows, self.threshold, self.shingle = bands, num_perm // bands, threshold, shingle
        self.buckets = {}      # (band, band bytes) -> indices of the kept documents that have that band
        self.signatures = []   # signatures of kept documents

    def signature(self, text):
        sh = np.unique(ngram_hashes(word_hashes(text), self.shingle))
        if len(sh) == 0:  # fewer words than a shingle: hash the whole text
            sh = np.array([zlib.crc32(text.encode("utf-8"))], dtype=np.uint64)
        sig = np.full(len(self.a), np.iinfo(np.uint64).max, dtype=np.uint64)
        for i in range(0, len(sh), 4096):  # (n, num_perm) in chunks: memory flat for long documents
            s = sh[i: i + 4096, None]
            sig = np.minimum(sig, ((s * self.a + self.b) >> np.uint64(32)).min(axis=0))
        return sig.astype(np.uint32)

    def is_duplicate(self, sig):
        """True if the document with signature sig is a near-duplicate of one seen before; else remember it."""
        keys = [(i, sig[i * self.rows:(i + 1) * self.rows].tobytes()) for i in range(self.bands)]
        # every kept document that shares a band is a candidate, not only the first one that had it: two kept
        # documents share a band only by chance (their Jaccard is under the threshold), so the lists stay short
        candidates = {j for key in keys for j in self.buckets.get(key, ())}
        if any(np.mean(self.signatures[j] == sig) >= self.threshold for j in candidates):
            return True
        for key in keys:
            self.buckets.setdefault(key, []).append(len(self.signatures))
        self.signatures.append(sig)
        return False


LINE_BUCKET = 100_000  # documents whose lines are counted together (Llama 3: 30M; ours are held in memory)


def drop_repeated_lines(texts, max_repeats):
    """Line-level de-duplication (Llama 3 §3.1.1, after CCNet): a line (stripped, not blank) that appears more than
    max_repeats times in these documents is removed from all of them: navigation menus, cookie notices, licence
    headers; frequent good lines too, which Llama 3 found a price worth paying (repeats inside one document count
    too). For web text: in code, `try:` and `else:` repeat by nature. -> (the texts, bytes removed)."""
    keys = [[hashlib.blake2b(line.strip().encode("utf-8"), digest_size=8).digest() if line.strip() else None
             for line in text.split("\n")] for text in texts]
    counts = Counter(k for doc in keys for k in doc if k)
    out, n_bytes = [], 0
    for text, doc in zip(texts, keys):
        lines = text.split("\n")
        kept = [line for line, k in zip(lines, doc) if k is None or counts[k] <= max_repeats]
        if len(kept) < len(lines):  # (blank runs closed up, as clean_text leaves them)
            new = BLANK_LINES.sub("\n\n\n", "\n".join(kept)).strip("\n")
            n_bytes += len(text.encode("utf-8")) - len(new.encode("utf-8"))
            text = new
        out.append(text)
    return out, n_bytes


# -----------------------------------------------------------------------------
# 4. Heuristic quality filters (Llama 3 §3.1.1: "heuristic filtering"; thresholds after Gopher, Rae et al. 2021,
#    loosened where source code, our default corpus, is legitimately symbol-heavy and repetitive)

MIN_CHARS = 64              # shorter than a sentence or two: nothing to learn from
MAX_CHARS = 1_000_000       # a 1 MB "document" is a data dump, not prose or code
MIN_ALPHA = 0.25            # share of letters; below it: tables of numbers, base64, binary junk
MAX_SYMBOL = 0.40           # share of characters that are not letters, digits or whitespace (stdlib max: 0.37)
MAX_DUP_LINE_CHARS = 0.50   # share of characters in repeated lines (Gopher: 0.20 for prose; stdlib: 6 files over)
MAX_PII = 0.02              # e-mail and public IP addresses per word, when 5 or more (Llama 3 drops pages with
                            # "high volumes of PII"; stdlib: 4 files over, tests of the email and ipaddress modules)
LONG_LINE_WORDS = 50        # a line this long may be one of "repeated content" (below); stdlib has 37 such lines
MAX_LINE_DUP_5GRAMS = 0.6   # share of its word characters in 5-grams it repeats; the most in real prose, 0.53 (the
                            # Rust docs: 1,740 long lines of 2,500 pages of std; the Rust book's 2,961: 0.39)
MIN_KL_DOCS = 20            # --token_kl: fewer train documents than this give no spread to measure outliers by
MIN_DIRTY, MAX_DIRTY = 3, 0.01   # --dirty_words: a document goes with 3 or more listed words and over 1 in 100 of its
                            # words listed (a choice, not a measurement: C4 dropped a page for one word, which takes
                            # medical and biology pages too; Llama 3 counts, with no threshold published)


LETTERS = regex.compile(r"[^\W\d_]+")   # letters (with their marks): word characters not digits or underscores
SYMBOLS = regex.compile(r"[^\w\s]+|_+")  # characters that are not letters, digits or whitespace
PII = regex.compile(r"(?<=[\w%+-])@(?:[a-z0-9-]{1,63}\.){1,8}(?:[a-z]{2}|com|org|net|edu|gov|info|biz|io)\b(?!\()"
                    r"|(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?!\.?\d)", regex.IGNORECASE)  # IPv4 (not in 1.3.6.1.2.1)
# (an e-mail's domain ends in a country's two letters or a common generic name, not followed by "(", so that
# q@k.transpose and x@W.to(device) are no addresses; the repeats are bounded, else the regex module, 4x re's speed
# here, is quadratic on "a@b.b.b.b...")


ASCII_LETTERS = bytes(b for b in range(128) if LETTERS.fullmatch(chr(b)))   # the same rules, byte by byte
ASCII_SYMBOLS = bytes(b for b in range(128) if SYMBOLS.fullmatch(chr(b)))


def letters(text):
    """How many of the text's characters are letters: for ASCII text the bytes that bytes.translate deletes
    (~20x faster than the regex), else the runs the regex cuts out (~2x faster than one by one)."""
    if text.isascii():
        return len(text) - len(text.encode("ascii").translate(None, ASCII_LETTERS))
    return len(text) - len(LETTERS.sub("", text))


def symbols(text):
    """How many of the text's characters are symbols (SYMBOLS), as letters() counts letters."""
    if text.isascii():
        return len(text) - len(text.encode("ascii").translate(None, ASCII_SYMBOLS))
    return len(text) - len(SYMBOLS.sub("", text))


def personal_data(text):
    """How many e-mail addresses and public IPv4 addresses (not private, loopback or documentation ones) the
    text holds: 'mail bob@corp.com or ana@corp.com from 8.8.8.8, not 10.0.0.1' -> 3"""
    def public(ip):
        try:
            address = ipaddress.ip_address(ip)
            return address.is_global and not address.is_multicast  # (Python calls 224.0.0.1 global)
        except ValueError:  # 999.1.2.3: not an address
            return False
    return sum(1 for m in PII.findall(text) if m.startswith("@") or public(m))


def read_word_list(path):
    """--dirty_words FILE: one word or phrase per line (the format of the "List of Dirty, Naughty, Obscene, and
    Otherwise Bad Words" that C4 used), blank lines and '#' comments skipped -> a set of word tuples, compared
    as words (words(): lower case, UTF-8): 'S&M' is the phrase (b's', b'm'). A line with no word in it can match
    nothing: ValueError naming file:line."""
    phrases = set()
    try:
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                line = unicodedata.normalize("NFC", line.split("#")[0].strip())   # as clean_text leaves texts
                if line and not words(line):
                    raise ValueError(f"{path}:{lineno}: no word in {line[:60]!r}, so it would match nothing")
                if line:
                    phrases.add(tuple(words(line)))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 (byte {e.start})") from None
    if not phrases:
        raise ValueError(f"{path}: no words listed")
    return phrases


def listed_words(text, phrases):
    """How many times the text holds one of `phrases` (read_word_list), and how many words it has:
    ('Damn it, DAMN the rain', {(b'damn',), (b'the', b'rain')}) -> (3, 5)"""
    found = words(text)
    hits = 0
    for n in {len(p) for p in phrases}:
        hits += sum(gram in phrases for gram in zip(*(found[i:] for i in range(n))))
    return hits, len(found)


def repeated_content(text):
    """Llama 3's line-level duplicated n-gram coverage (Rae et al. 2021's ratio, applied to lines): a line of 50
    words or more, mostly letters, goes when over MAX_LINE_DUP_5GRAMS of its word characters lie in word 5-grams
    that occur in it more than once: logging or error output run together, too long and too unique for line dedup
    to see twice. (Mostly letters: over two thirds of its visible characters, as in prose, ~90%. A table in code,
    `[0, 1, 1, 0, ...]` or `'GET', 'GET', ...`, repeats itself too, but cutting it would break the program.)
    -> (the text without those lines, bytes removed)"""
    lines, kept = text.split("\n"), []
    if max(map(len, lines)) < 2 * LONG_LINE_WORDS - 1:   # (50 words take 99 characters: most texts have no such line)
        return text, 0
    for line in lines:
        words = WORD.findall(line) if len(line) >= 2 * LONG_LINE_WORDS - 1 else ()
        if len(words) >= LONG_LINE_WORDS and 3 * letters(line) > 2 * len("".join(line.split())):
            grams = list(zip(*(words[i:] for i in range(5))))   # the line's word 5-grams, in order
            counts, covered = Counter(grams), [False] * len(words)
            for i, gram in enumerate(grams):
                if counts[gram] > 1:
                    covered[i:i + 5] = [True] * 5
            dup = sum(len(w) for w, c in zip(words, covered) if c)
            if dup > MAX_LINE_DUP_5GRAMS * sum(map(len, words)):
                continue
        kept.append(line)
    if len(kept) == len(lines):
        return text, 0
    new = BLANK_LINES.sub("\n\n\n", "\n".join(kept)).strip("\n")  # (blank runs closed up, as clean_text leaves them)
    return new, len(text.encode("utf-8")) - len(new.encode("utf-8"))


def heuristic_reject(text, phrases=None):
    """The name of the first rule the document breaks, or None to keep it. phrases: --dirty_words (read_word_list)."""
    n = len(text)
    if n < MIN_CHARS:
        return "too short"
    if n > MAX_CHARS:
        return "too long"
    if letters(text) < MIN_ALPHA * n:
        return "few letters"
    if symbols(text) > MAX_SYMBOL * n:
        return "many symbols"
    # repeated lines (logging spam, boilerplate); short lines like "    pass" or "}" may repeat
    counts = Counter(map(str.strip, text.split("\n")))
    if sum(len(line) * c for line, c in counts.items() if c > 1 and len(line) > 10) > MAX_DUP_LINE_CHARS * n:
        return "repeated lines"
    pii = personal_data(text)
    if pii >= 5 and pii > MAX_PII * len(text.split()):
        return "personal data"
    if phrases:
        hits, n_words = listed_words(text, phrases)
        if hits >= MIN_DIRTY and hits > MAX_DIRTY * n_words:
            return "dirty words"
    return None


# -----------------------------------------------------------------------------
# 5. Model-based quality filter: a labeller scores a sample, a fast classifier learns it and scores everything

def ngram_features(texts, dim):
    """Hashed word unigrams + bigrams, log(1 + count), each document's vector L2-normalised, as a sparse
    matrix in coordinate form: (row of each entry, feature id in [0, dim), value)."""
    rows, ids, vals = [], [], []
    for i, text in enumerate(texts):
        h = word_hashes(text)
        f, c = np.unique(np.concatenate([h, ngram_hashes(h, 2)]) % np.uint64(dim), return_counts=True)
        v = np.log1p(c)
        rows.append(np.full(len(f), i))
        ids.append(f.astype(np.int64))
        vals.append(v / max(np.linalg.norm(v), 1e-9))
    cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
    return cat(rows, np.int64), cat(ids, np.int64), cat(vals, np.float64)


class QualityClassifier:
    """fastText-style linear classifier (Joulin et al. 2016), what Llama 3 used for quality: a bag of hashed
    word n-grams -> one logit, p(good) = sigmoid(w . x + b). Logistic regression, trained in numpy."""

    def __init__(self, dim=1 << 20):
        self.w, self.b = np.zeros(dim), 0.0
        self.threshold = 0.5  # documents that score below it go (train_quality_filter sets it)

    def fit(self, texts, labels, steps=300, lr=4.0, l2=1e-4):
        """Full-batch gradient descent on the mean logistic loss + l2 |w|^2; labels 1 = good, 0 = junk.
        Rows have unit norm, so the loss is 1/4-smooth and lr = 4 < 2 / (1/4) is stable."""
        rows, ids, vals = ngram_features(texts, len(self.w))
        used, ids = np.unique(ids, return_inverse=True)  # train only the features present: w[used]
        w, b, y, n = np.zeros(len(used)), 0.0, np.asarray(labels, dtype=np.float64), len(texts)
        for _ in range(steps):
            z = np.bincount(rows, weights=w[ids] * vals, minlength=n) + b
            err = (1 / (1 + np.exp(-z)) - y) / n                  # d loss / d logit, per document
            w -= lr * (np.bincount(ids, weights=err[rows] * vals, minlength=len(used)) + 2 * l2 * w)
            b -= lr * err.sum()
        self.w[:] = 0
        self.w[used], self.b = w, b
        return self

    def score(self, texts):
        """P(good) for each text."""
        rows, ids, vals = ngram_features(texts, len(self.w))
        z = np.bincount(rows, weights=self.w[ids] * vals, minlength=len(texts)) + self.b  # (N,) sparse X @ w
        return 1 / (1 + np.exp(-z))


def checkpoint_labeller(ckpt_dir, max_tokens=1024):
    """A labeller from a trained checkpoint (ours, Meta's or Hugging Face's): score = -(bits per UTF-8 byte) of
    the text's first max_tokens tokens, so lower loss = better. CCNet (Wenzek et al. 2019) filtered by a reference
    LM's perplexity in the same way; Llama 3 asked Llama 2 for labels instead."""
    from sample import load_checkpoint
    model, tok = load_checkpoint(ckpt_dir)
    model.eval()
    max_tokens = min(max_tokens, model.args.max_seq_len)

    @torch.no_grad()
    def label(texts):
        scores = []
        for text in texts:
            ids = tok.encode(text, bos=True)[: max_tokens + 1]
            if len(ids) < 2:
                scores.append(-np.inf)
                continue
            x, y = torch.tensor(ids[:-1])[None], torch.tensor(ids[1:])[None]  # (1, T) each
            nats = model(x, y).item() * y.numel()
            scores.append(-nats / np.log(2) / len(tok.decode_bytes(ids[1:])))
        return np.array(scores)
    return label


def model_stamp(ckpt_dir):
    """What changes when a checkpoint does (retrained in place): the files_stamp of its folder's files (not of
    subfolders: a run's ckpt/ changes as it trains, its exported model only when it ends), and of the tokenizer
    model.tokenizer_path reads from original/ when the folder has none (a Hugging Face download). None: no folder."""
    if not os.path.isdir(ckpt_dir):
        return None   # (refused by checkpoint_labeller, before the old dataset is touched)
    files = sorted(e.path for e in os.scandir(ckpt_dir) if e.is_file())
    hf_tokenizer = os.path.join(ckpt_dir, "original", "tokenizer.model")
    if not os.path.exists(os.path.join(ckpt_dir, "tokenizer.model")) and os.path.isfile(hf_tokenizer):
        files.append(hf_tokenizer)
    return files_stamp(files, ckpt_dir)


def train_quality_filter(texts, labeller, drop=0.1):
    """Label the sample (the `drop` fraction with the lowest labeller score is junk), fit a classifier on it, and
    set its `threshold`: the score below which the same share of the sample lies, so that about `drop` of the
    documents go (DCLM keeps a top share by fastText score too; of documents it has not seen, a little fewer: it
    fits its sample). By p(good) < 0.5, the classifier, trained on a 10% minority, dropped 0.6% of 2,000 unseen
    stdlib documents labelled by compressibility, 6% of their junk; by the threshold 9.8%: 63% of the junk, at
    72% precision (2026-11-28)."""
    scores = np.asarray(labeller(texts), dtype=np.float64)
    if scores.shape != (len(texts),):  # (a batch's scores lost or one per token: labels for the wrong documents)
        raise ValueError(f"the quality labeller gave scores of shape {scores.shape} for {len(texts)} documents: "
                         "one score per document")
    if np.isnan(scores).any():  # (NaN sorts above every score: labelled good. -inf is a score, the worst; NaN none)
        i = int(np.flatnonzero(np.isnan(scores))[0])
        raise ValueError(f"the quality labeller scored {int(np.isnan(scores).sum())} of the {len(texts)} sampled "
                         f"documents NaN, the first #{i} ({texts[i][:60]!r}): a score is a number, higher = better")
    k = int(drop * len(texts) + 1e-9)  # the junk's count (0.35 * 180 is 62.99999999999999 in floats)
    labels = np.ones(len(texts), dtype=np.float32)
    labels[np.argsort(scores, kind="stable")[:k]] = 0  # by rank: ties cannot make all junk
    clf = QualityClassifier().fit(texts, labels)
    score = np.sort(clf.score(texts))
    clf.threshold = (score[k - 1] + score[k]) / 2 if k else -np.inf   # between the k lowest and the rest
    return clf


# -----------------------------------------------------------------------------
# 6. Token shards: 64-byte header + little-endian uint32 tokens

MAGIC = b"NLL3TOKS"
VERSION = 1
HEADER = struct.Struct("<8sIIIIQ32s")  # magic, version, vocab_size, bos_id, n_docs, n_tokens, tokenizer fingerprint
assert HEADER.size == 64


def write_shard(path, tokens, vocab_size, bos_id, fingerprint):
    """-> the file's CRC-32."""
    tokens = np.asarray(tokens, dtype="<u4")
    assert len(tokens) and tokens[0] == bos_id, "a shard starts with <|begin_of_text|>"
    n_docs = int(np.count_nonzero(tokens == bos_id))
    header = HEADER.pack(MAGIC, VERSION, vocab_size, bos_id, n_docs, len(tokens), fingerprint.encode("ascii"))
    atomic_write(path, lambda f: f.writelines([header, tokens.tobytes()]))
    return zlib.crc32(tokens, zlib.crc32(header))


def read_shard(path):
    """-> (header dict, np.memmap of uint32 tokens). Refuses foreign, truncated or inconsistent files."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size or raw[:8] != MAGIC:
        raise ValueError(f"{path}: not a nanollama3 token shard (bad magic/header)")
    magic, version, vocab_size, bos_id, n_docs, n_tokens, fp = HEADER.unpack(raw)
    if version != VERSION:
        raise ValueError(f"{path}: shard format version {version}, this data.py reads version {VERSION}")
    if size != HEADER.size + 4 * n_tokens:
        raise ValueError(f"{path}: truncated or padded: header says {n_tokens} tokens "
                         f"({HEADER.size + 4 * n_tokens} bytes), file has {size} bytes")
    tokens = np.memmap(path, dtype="<u4", mode="r", offset=HEADER.size, shape=(n_tokens,))
    if n_tokens == 0:
        raise ValueError(f"{path}: has no tokens")
    if tokens[0] != bos_id:
        raise ValueError(f"{path}: does not start with <|begin_of_text|> (id {bos_id})")
    if not (0 <= bos_id < vocab_size and fp.rstrip(b"\0").isascii()):
        raise ValueError(f"{path}: damaged header (vocab size {vocab_size}, <|begin_of_text|> id {bos_id})")
    header = dict(vocab_size=vocab_size, bos_id=bos_id, n_docs=n_docs, n_tokens=n_tokens,
                  fingerprint=fp.rstrip(b"\0").decode("ascii"))
    return header, tokens


class ShardWriter:
    """Collects tokenized documents of one split and writes {split}_NNN.bin of about shard_tokens tokens,
    cut at document boundaries (so every shard starts with <|begin_of_text|>)."""

    def __init__(self, out_dir, split, shard_tokens, vocab_size, bos_id, fingerprint):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.bos_id, self.info = bos_id, (vocab_size, bos_id, fingerprint)
        self.buf, self.buffered = [], 0
        self.shards, self.crc32, self.docs, self.tokens, self.bytes = [], [], 0, 0, 0

    def add(self, tokens, docs, n_bytes):
        """tokens: uint32 array of whole documents, each starting with <|begin_of_text|>."""
        self.docs, self.tokens, self.bytes = self.docs + docs, self.tokens + len(tokens), self.bytes + n_bytes
        self.buf.append(tokens)
        self.buffered += len(tokens)
        while self.buffered > self.shard_tokens:  # (at exactly shard_tokens the next document may start there)
            flat = np.concatenate(self.buf)
            starts = np.flatnonzero(flat == self.bos_id)
            cut = starts[starts <= self.shard_tokens].max()  # last document start within the budget
            cut = cut if cut > 0 else (starts[1] if len(starts) > 1 else len(flat))  # one huge document
            self._write(flat[:cut])
            self.buf, self.buffered = [flat[cut:]], len(flat) - cut

    def _write(self, tokens):
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self.crc32.append(write_shard(os.path.join(self.out_dir, name), tokens, *self.info))
        self.shards.append(name)

    def close(self):
        if self.buffered:
            self._write(np.concatenate(self.buf))
        self.buf, self.buffered = [], 0
        return dict(docs=self.docs, tokens=self.tokens, bytes=self.bytes, shards=self.shards, crc32=self.crc32)


def token_kl(tokens, bos_id, log_q):
    """The KL divergence of each document's token distribution from the corpus's, in bits per token:
    KL = sum_t p(t) log2(p(t) / q(t)), p the document's own token frequencies. tokens: a shard's (each document
    after its <|begin_of_text|>); log_q: log2 of the corpus's token probabilities -> (KL, tokens) per document.
    For the whole shard at once: one sort of (document, token) pairs gives every document's counts."""
    starts = tokens == bos_id
    doc = (np.cumsum(starts) - 1)[~starts]                    # each token's document
    n = np.bincount(doc, minlength=int(starts.sum()))
    pairs, counts = np.unique(doc * len(log_q) + tokens[~starts], return_counts=True)
    d, t = np.divmod(pairs, len(log_q))
    p = counts / n[d]
    return np.bincount(d, weights=p * (np.log2(p) - log_q[t]), minlength=len(n)), n


def drop_token_outliers(out_dir, splits, tok, z_max, shard_tokens):
    """Llama 3's token-distribution KL filter (§3.1.1: documents "containing excessive numbers of outlier tokens
    compared to the training corpus distribution"), a pass over the finished shards. q: the train split's token
    frequencies (+0.5 each, so that a token only val holds has some). KL falls with a document's length n (a
    short one's own frequencies are far from any corpus's: on the stdlib KL ~ 8.7 - 0.52 log2(n) bits), so each
    document is compared with those of its length: its distance above the least-squares line of KL on log2(n)
    over the train documents, in robust standard deviations (1.4826 x the median absolute deviation). Over z_max
    it goes, and the shards are written again without it (shard i is written after the old shard i was read:
    documents only move towards the start). -> (splits as ShardWriter.close() gives them, [documents, bytes] removed)"""
    def shards(split):  # (in memory one at a time: the old files are replaced as the new ones are written)
        for name in splits[split]["shards"]:
            yield np.array(read_shard(os.path.join(out_dir, name))[1])
    counts = sum((np.bincount(x, minlength=tok.n_words) for x in shards("train")), np.zeros(tok.n_words))
    counts[tok.bos_id] = 0
    log_q = np.log2((counts + 0.5) / (counts + 0.5).sum())
    stats = {split: [token_kl(x, tok.bos_id, log_q) for x in shards(split)] for split in splits}
    kl, n = (np.concatenate([st[i] for st in stats["train"]]) for i in (0, 1))
    x, inlier = np.log2(n), np.ones(len(n), bool)
    for _ in range(10):  # fitted again without the outliers found, until they stay the same (least squares follows
        slope, intercept = np.polyfit(x[inlier], kl[inlier], 1) if np.ptp(x[inlier]) else (0.0, np.median(kl))
        residual = kl - (slope * x + intercept)                        # its outliers: a few far ones tilt the line)
        center = np.median(residual)
        scale = 1.4826 * np.median(np.abs(residual - center)) or np.inf    # (all alike: none is an outlier)
        inlier, before = residual - center <= z_max * scale, inlier
        if np.array_equal(inlier, before):
            break
    n_bytes = np.zeros(tok.n_words, np.int64)                   # each token's UTF-8 bytes (specials: none)
    n_bytes[list(tok.ranks.values())] = [len(b) for b in tok.ranks]
    removed, out = [0, 0], {}
    for split in splits:
        writer = ShardWriter(out_dir, split, shard_tokens, tok.n_words, tok.bos_id, tok.fingerprint())
        for x, (kl, n) in zip(shards(split), stats[split]):
            go = kl - (slope * np.log2(n) + intercept) - center > z_max * scale    # per document
            doc = np.cumsum(x == tok.bos_id) - 1
            gone = int(n_bytes[x[go[doc]]].sum())
            removed = [removed[0] + int(go.sum()), removed[1] + gone]
            writer.add(x[~go[doc]], int((~go).sum()), int(n_bytes[x].sum()) - gone)
        out[split] = writer.close()
        for name in set(splits[split]["shards"]) - set(out[split]["shards"]):   # (fewer shards now)
            os.remove(os.path.join(out_dir, name))
    return out, removed


# -----------------------------------------------------------------------------
# 7. Parallel work: clean + filter features, and tokenization, run in worker processes on chunks of
#    documents; the decisions that need to see every document (dedup, the split) stay in the main process.

_worker = {}


def _init_worker(tokenizer_path, threads=None, phrases=None):
    _worker["tok"] = Tokenizer.load(tokenizer_path)
    _worker["phrases"] = phrases  # --dirty_words
    _worker["threads"] = threads or os.cpu_count() or 1  # tokenizer threads: this process's share of the cores
    _worker["minhash"] = MinHashDedup()  # same seed everywhere: the same hash functions in every process


def _clean_chunk(texts):
    """Raw documents -> [(clean text, heuristic rule broken or None, exact hash, MinHash signature, bytes of
    repeated-content lines removed, the hash that decides its split: is_val)]."""
    out = []
    for raw in texts:
        text, cut = repeated_content(clean_text(raw))
        if not text.strip():
            out.append((text, "empty", None, None, cut, None))
        else:
            h = doc_hash(text)
            out.append((text, heuristic_reject(text, _worker["phrases"]), h, _worker["minhash"].signature(text), cut,
                        doc_hash(raw.of) if isinstance(raw, Part) else h))
    return out


def _encode_chunk(job):
    """(split, texts) -> (split, uint32 tokens with <|begin_of_text|> before each document, n_docs, n_bytes)."""
    split, texts = job
    tok = _worker["tok"]
    # tiktoken's Rust encoder releases the GIL, so threads run in parallel, and encode_to_numpy hands back a
    # uint32 array, no list of Python ints (faster than tiktoken's own encode_ordinary_batch). No special
    # tokens are allowed or checked: a "<|eot_id|>" in the text is plain text, as in Tokenizer.encode.
    encode = lambda text: np.concatenate([tok.enc.encode_to_numpy(piece, allowed_special=set(), disallowed_special=())
                                          for piece in encode_pieces(text)])  # noqa: E731  (Meta's cuts)
    with ThreadPoolExecutor(_worker["threads"]) as pool:
        docs = list(pool.map(encode, texts))
    bos = np.array([tok.bos_id], dtype=np.uint32)
    flat = np.concatenate([part for doc in docs for part in (bos, doc)])  # <|begin_of_text|> before each document
    return split, flat, len(texts), sum(len(t.encode("utf-8")) for t in texts)


# -----------------------------------------------------------------------------
# 8. prepare_data: the whole pipeline, cached in out_dir/meta.json

PIPELINE = 10  # bump when a rule of cleaning, dedup or filtering changes: caches of an older pipeline are rebuilt
               # (what each version changed: `git log -S"PIPELINE =" data.py`)


def is_val(h, every):
    """The train/val split, by document: 1 in `every` (0: none) by h, the hash of the document's cleaned text
    with its lines of repeated content gone (doc_hash, as exact dedup takes it), or of the name of the whole it
    is a Part of, so that its split depends on it alone, not on the documents before it (a filter that removes
    some, or a source in another order, leaves the val split as it was). Taken before line dedup, whose
    cut of a document depends on the others in its bucket."""
    return every > 0 and int.from_bytes(h[:8], "little") % every == 0


def damaged_shards(out_dir, meta, share=slice(None)):
    """Of the shards meta.json lists (a `share` of their sorted names: train.py splits them among ranks), those
    missing or whose CRC-32 is not the one they were written with."""
    crc = {name: c for split in ("train", "val") for name, c in
           zip(meta.get(split, {}).get("shards", []), meta.get(split, {}).get("crc32", []))}
    paths = {name: os.path.join(out_dir, name) for name in sorted(crc)[share]}
    return [name for name, path in paths.items() if not os.path.exists(path) or file_crc32(path) != crc[name]]


def intact(out_dir, meta):
    """Every shard meta.json lists is there as it was written (a meta.json of an older data.py, without CRC-32s:
    not intact, so rebuilt)."""
    listed = all(len(meta.get(s, {}).get("crc32", [])) == len(meta.get(s, {}).get("shards", [None]))
                 for s in ("train", "val"))
    return listed and not damaged_shards(out_dir, meta)


def file_crc32(path):
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def read_meta(path, cache=False):
    """meta.json -> dict; unreadable: ValueError naming it, or with cache=True {} (a stale cache, to rebuild)."""
    try:
        with open(path) as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
        return meta
    except (OSError, ValueError) as e:  # (json.JSONDecodeError and UnicodeDecodeError are ValueErrors)
        if cache:
            return {}
        raise ValueError(f"{path}: unreadable ({e}); re-run prepare_data / `python data.py`") from None


# the keys of a dataset's meta.json that are read back (here and in train.py), parents first, with their JSON types:
# [t] is an array of t, (t, u) an array of a t and a u. A folder of an older data.py has no crc32s
META_KEYS = {"config": dict, "config.source": str, "config.blocklist": (str, int), "fingerprint": str,
             "vocab_size": int, "bos_id": int, "train": dict, "val": dict,
             **{f"{split}.{key}": kind for split in ("train", "val") for key, kind in
                (("shards", [str]), ("crc32", [int]), ("docs", int), ("tokens", int), ("bytes", int))}}


def check_meta(path, needed):
    """A dataset's meta.json (read_meta) -> its dict, if each key of META_KEYS it holds is of its type and the keys
    `needed` (those the caller reads) are there; else ValueError naming the file and the key (a hand-edited file:
    refused here, not by a KeyError or TypeError further on)."""
    def fits(value, kind):
        if isinstance(kind, list):
            return isinstance(value, list) and all(fits(v, kind[0]) for v in value)
        if isinstance(kind, tuple):
            return isinstance(value, list) and len(value) == len(kind) and all(map(fits, value, kind))
        return type(value) is kind  # (true is no whole number, 3.0 no shard size)

    meta = read_meta(path)
    for name, kind in META_KEYS.items():
        *parents, key = name.split(".")
        holder = meta
        for parent in parents:  # (checked before its keys: an object, or not there)
            holder = holder.get(parent, {})
        if key not in holder and name in needed:
            raise ValueError(f"{path}: not a meta.json of data.py (KeyError: '{name}')")
        if key in holder and not fits(holder[key], kind):
            raise ValueError(f'{path}: not a meta.json of data.py (TypeError: its "{name}" is '
                             f'{json.dumps(holder[key])[:40]}, not what data.py writes there)')
    return meta


def check_folder(folder, source=None, blocklist=None):
    """train.py's check of a --data folder made earlier -> (its meta.json, notes to print). train.py never rebuilds
    one (data.py's settings may differ from its defaults; rebuilding would lose them), so it must at least hold the
    `source` asked for, made with the `blocklist` file as it is now; else ValueError (naming train.py's flags).
    The notes say when that source's files have changed, or that there are no CRC-32s to check the shards by
    (damaged_shards: train.py shares that out among its ranks)."""
    where = lambda path: os.path.realpath(path) if os.path.exists(path) else path  # "corpus/" is "./corpus"
    path = os.path.join(folder, "meta.json")
    meta = check_meta(path, ("config", "config.source", "train.tokens", "val.tokens", "val.bytes"))
    made_from, stamp = meta["config"]["source"], meta["config"].get("source_stamp")  # (no stamp: older data.py)
    if source and where(source) != where(made_from):
        raise ValueError(f"--data {folder} holds the tokens of {made_from!r}, not of {source!r}: give a new --data "
                         "folder (and --tokenizer) to build this source there")
    made_with = meta["config"].get("blocklist") or ["", None]   # (prepare_data's: the list's path and CRC-32)
    if blocklist and [where(made_with[0]), made_with[1]] != [where(blocklist), file_crc32(blocklist)]:
        raise ValueError(f"--data {folder} was not made with --blocklist {blocklist} as it is now: give a new --data "
                         "folder (and --tokenizer) to build it there")
    notes = []
    try:
        changed = stamp is not None and source_stamp(made_from) != stamp
    except (OSError, ValueError):  # the source is not here (shards copied to a cluster): nothing to compare
        changed = False
    if changed:
        notes.append(f"warning: {made_from}'s files changed after {folder} was made from them; this run trains on the "
                     f"old tokens (to use the new ones, rerun data.py with --out {folder}, or delete it)")
    if not any("crc32" in meta.get(split, {}) for split in ("train", "val")):
        notes.append(f"note: {folder}/meta.json has no CRC-32s of its shards (an older data.py): they are not "
                     f"checked; rerun data.py with --out {folder} to rebuild it with them")
    return meta, notes


def prepare_data(source, tokenizer_path, out_dir, val_fraction=0.02, num_proc=None, shard_tokens=1 << 26,
                 max_docs=None, quality_model=None, quality_sample=2000, quality_drop=0.1, labeller=None,
                 line_dedup=0, blocklist=None, dirty_words=None, token_kl=0, chunk_bytes=1 << 22, verbose=True):
    """Clean, dedup, filter and tokenize `source` into out_dir/{train,val}_NNN.bin + meta.json; returns meta.
    If out_dir/meta.json already describes this source (files unchanged: source_stamp), settings (the quality
    model's files too: model_stamp), pipeline and tokenizer, returns it without work. Else the shards are built
    in out_dir/building and replace the old ones only when the build succeeds.
    labeller: a function list[str] -> scores (higher = better) for the quality filter; quality_model=CKPT_DIR
    builds one from a checkpoint (checkpoint_labeller). Neither: no model-based filter.
    line_dedup N > 0: lines seen more than N times in a bucket of LINE_BUCKET kept documents are removed (Llama 3:
    6), for web text; 0: none. blocklist: a file of domains whose WARC/WET pages are left out (read_blocklist).
    dirty_words: a file of words and phrases; a document dense in them goes (read_word_list, MAX_DIRTY).
    token_kl Z > 0: a document whose token distribution is over Z robust standard deviations further from the
    corpus's than documents of its length goes (drop_token_outliers); 0: none.
    num_proc worker processes (default: the cores, at most 8) clean and tokenize; the output is the same
    for any num_proc."""
    if not 0 <= val_fraction <= 0.5:
        raise ValueError(f"val_fraction={val_fraction}: must be within [0, 0.5] (1 in round(1/val_fraction) "
                         "documents goes to val)")
    if not 0 <= quality_drop < 1:
        raise ValueError(f"quality_drop={quality_drop}: the fraction of the sample labelled junk, within [0, 1)")
    for name, value in (("num_proc", 1 if num_proc is None else num_proc), ("shard_tokens", shard_tokens),
                        ("max_docs", 1 if max_docs is None else max_docs)):   # (None: the default; 0 is no count)
        if not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer")
    if not isinstance(line_dedup, numbers.Integral) or isinstance(line_dedup, bool) or line_dedup < 0:
        raise ValueError(f"line_dedup={line_dedup!r}: must be an integer >= 0 (0: no line-level dedup)")
    if not isinstance(token_kl, numbers.Real) or isinstance(token_kl, bool) or not 0 <= token_kl < math.inf:
        raise ValueError(f"token_kl={token_kl!r}: must be a number >= 0 (robust standard deviations; 0: off)")
    check_blocklist(blocklist, source)   # (a bad list: refused before the old cache is touched)
    phrases = read_word_list(dirty_words) if dirty_words else None
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):   # (else a NotADirectoryError once the build starts)
        raise ValueError(f"{out_dir}: a file, not a folder: give the folder the shards go to")
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"{tokenizer_path}: no tokenizer there (tokenizer.py makes one; train.py too, with "
                                "its data)")
    tok = Tokenizer.load(tokenizer_path)
    num_proc = num_proc or min(os.cpu_count() or 1, 8)
    # (numbers as Python's: json cannot write numpy's, and they pass the checks above)
    config = dict(source=source, source_stamp=source_stamp(source), val_fraction=float(val_fraction),
                  shard_tokens=int(shard_tokens), max_docs=None if max_docs is None else int(max_docs),
                  quality_model=quality_model and [os.path.abspath(quality_model), model_stamp(quality_model)],
                  quality_sample=quality_sample, quality_drop=float(quality_drop), pipeline=PIPELINE,
                  **({"line_dedup": int(line_dedup), "line_bucket": LINE_BUCKET} if line_dedup else {}),
                  **({"blocklist": [os.path.abspath(blocklist), file_crc32(blocklist)]} if blocklist else {}),
                  **({"dirty_words": [os.path.abspath(dirty_words), file_crc32(dirty_words)]} if dirty_words else {}),
                  **({"token_kl": float(token_kl)} if token_kl else {}),
                  **({"labeller": True} if labeller is not None else {}))   # (its shards: no later call's)
    # (line_dedup, blocklist, dirty_words, token_kl and labeller off: the config of older caches, which stay valid)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path) and labeller is None:  # (a labeller function cannot be compared: always rebuild)
        try:  # (unreadable, or damaged by hand: rebuilt, as a damaged shard is)
            meta = check_meta(meta_path, set(META_KEYS) - {"config.blocklist"})
        except ValueError:
            meta = {}
        if meta.get("config") == config and meta.get("fingerprint") == tok.fingerprint() and intact(out_dir, meta):
            if verbose:
                print(f"data: {out_dir} is up to date ({meta['train']['tokens']:,} train tokens; same source "
                      f"files, settings, pipeline and tokenizer, every shard as written)")
            return meta
    if quality_model and labeller is None:  # (before the old folder goes: a mistyped model loses nothing)
        labeller = checkpoint_labeller(quality_model)
    if source.startswith("hf:"):
        hf_datasets(source)  # (not installed: an error before out_dir is made)
    domains = read_blocklist(blocklist) if blocklist else set()   # (a line that is no domain: refused here)
    # The shards are written to out_dir/building and moved in at the end: a build refused half-way (a file of the
    # source found bad, too few documents) leaves the old dataset whole. (Disk: old and new side by side till then.)
    build, made = os.path.join(out_dir, "building"), not os.path.exists(out_dir)
    shutil.rmtree(build, ignore_errors=True)   # (a killed build's)
    os.makedirs(build)
    try:
        t0 = time.time()
        read = [0, 0]  # documents, bytes
        removed = {}  # step -> [documents, bytes] it removed
        seen, minhash, clf = set(), MinHashDedup(), None
        pending = []          # documents waiting for the quality classifier to be trained on them,
        bucket = []           # and for their line counts (line_dedup): (text, split hash) pairs from here on
        line_kept = set()     # doc_hash of each document line dedup let through
        every = round(1 / val_fraction) if val_fraction > 0 else 0
        writers = {s: ShardWriter(build, s, shard_tokens, tok.n_words, tok.bos_id, tok.fingerprint())
                   for s in ("train", "val")}

        def drop(step, text):
            removed.setdefault(step, [0, 0])
            removed[step][0] += 1
            removed[step][1] += len(text.encode("utf-8"))

        def dedup_and_filter(features):
            """The sequential decisions, in this order: empty, exact duplicate, heuristic, near duplicate (only kept
            documents enter the MinHash index: a rejected one must not take a clean near-copy with it)."""
            for text, rule, h, sig, cut, split_h in features:
                if cut:  # (a row of bytes: lines, not documents)
                    removed.setdefault("heuristic: repeated content", [0, 0])[1] += cut
                if rule == "empty":
                    drop("empty", text)
                    continue
                if h in seen:
                    drop("exact duplicate", text)
                    continue
                seen.add(h)
                if rule:
                    drop(f"heuristic: {rule}", text)
                elif minhash.is_duplicate(sig):
                    drop("near duplicate", text)
                else:
                    yield text, split_h

        def line_filter(texts, final):
            """line_dedup: each bucket of LINE_BUCKET kept documents loses its lines repeated more than line_dedup times
            (after document dedup, so that copies do not count twice); what is left of a document that lost lines goes
            through the heuristic filters again (Llama 3 filters after de-duplicating), and goes if it is blank, or
            if it is now the text of a document kept before (two pages whose only difference was their boilerplate).
            The table's row: the documents left blank, and every byte the lines took."""
            if not line_dedup:
                return texts
            bucket.extend(texts)
            out = []
            while len(bucket) >= LINE_BUCKET or (final and bucket):  # (the same buckets however the chunks fall)
                done, n_bytes = drop_repeated_lines([text for text, _ in bucket[:LINE_BUCKET]], line_dedup)
                removed.setdefault("line duplicates", [0, 0])[1] += n_bytes
                for (before, split_h), text in zip(bucket, done):
                    rule = None if text == before else "blank" if not text.strip() else heuristic_reject(text, phrases)
                    if rule == "blank":
                        drop("line duplicates", text)
                    elif rule:
                        drop(f"heuristic: {rule}", text)
                    elif (h := doc_hash(text)) in line_kept:
                        drop("exact duplicate", text)
                    else:
                        line_kept.add(h)
                        out.append((text, split_h))
                del bucket[:LINE_BUCKET]
            return out

        def quality_filter(texts, final):
            """No labeller: all pass. Else the first quality_sample documents train the classifier (Llama 3's
            model-based filter), which then scores them and every later document; those below its threshold go."""
            nonlocal clf, pending
            if labeller is None:
                return texts
            if clf is None:
                pending += texts
                if (len(pending) < quality_sample and not final) or not pending:
                    return []
                clf = train_quality_filter([text for text, _ in pending[:quality_sample]], labeller, quality_drop)
                texts, pending = pending, []
            keep = clf.score([text for text, _ in texts]) >= clf.threshold
            for (text, _), k in zip(texts, keep):
                if not k:
                    drop("quality", text)
            return [t for t, k in zip(texts, keep) if k]

        def split_jobs(texts):
            """(split, texts) jobs of about chunk_bytes, each (text, hash) in its split (is_val)."""
            by_split = {"train": [], "val": []}
            for text, split_h in texts:
                by_split["val" if is_val(split_h, every) else "train"].append(text)
            return [(split, c) for split, ts in by_split.items() for c in text_batches(ts, chunk_bytes)]

        docs = iter_documents(source, domains, removed)
        docs = docs if max_docs is None else itertools.islice(docs, max_docs)
        # Workers are forked: "spawn" would re-run the caller's script in each worker, and flat scripts like
        # train.py have no `if __name__ == "__main__"` guard. No fork (Windows): one process.
        if "fork" not in multiprocessing.get_all_start_methods():
            num_proc = 1
        threads = max(1, (os.cpu_count() or 1) // num_proc)
        pool = multiprocessing.get_context("fork").Pool(num_proc, _init_worker, (tokenizer_path, threads, phrases)) \
            if num_proc > 1 else None
        if pool is None:
            _init_worker(tokenizer_path, threads, phrases)
        pmap = pool.map if pool else (lambda f, xs: list(map(f, xs)))
        bar = tqdm(desc=f"data {source}", unit="B", unit_scale=True, disable=not verbose)
        try:
            raw = text_batches(docs, chunk_bytes)
            while True:
                group = list(itertools.islice(raw, 2 * num_proc))  # bounded memory, however big the source
                final = not group
                kept = []
                for chunk, features in zip(group, pmap(_clean_chunk, group)):
                    n_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in chunk)  # (raw: lone surrogates)
                    read[0], read[1] = read[0] + len(chunk), read[1] + n_bytes
                    bar.update(n_bytes)
                    pages = [(raw, text, cut) for raw, (text, _, _, _, cut, _) in zip(chunk, features)
                             if isinstance(raw, HTML)]
                    if pages:  # the bytes of a page that were not its text
                        removed.setdefault("HTML markup", [0, 0])[1] += sum(
                            len(raw.encode("utf-8", "surrogatepass")) - len(text.encode("utf-8")) - cut
                            for raw, text, cut in pages)
                    kept += dedup_and_filter(features)
                kept = quality_filter(line_filter(kept, final), final)
                for split, tokens, n_docs, n_bytes in pmap(_encode_chunk, split_jobs(kept)):
                    writers[split].add(tokens, n_docs, n_bytes)
                if final:
                    break
        finally:
            bar.close()
            if pool:
                pool.terminate()
        for step in ("URL: blocklisted", "URL: older version"):  # (pages read, and left out before the pipeline)
            read[0], read[1] = read[0] + removed.get(step, [0, 0])[0], read[1] + removed.get(step, [0, 0])[1]
        if read[0] == 0:
            raise ValueError(f"source {source!r} has no documents")
        splits = {s: w.close() for s, w in writers.items()}
        val_docs = splits["val"]["docs"]   # (before the token filter)
        if token_kl and splits["train"]["docs"] >= MIN_KL_DOCS:
            splits, removed["token outliers"] = drop_token_outliers(build, splits, tok, token_kl, shard_tokens)
        steps = ["URL", "HTML markup", "empty", "exact duplicate", "heuristic", "near duplicate", "line duplicates",
                 "quality", "token outliers"]  # (in order)
        meta = dict(version=VERSION, config=config, fingerprint=tok.fingerprint(), vocab_size=tok.n_words,
                    bos_id=tok.bos_id, **splits,
                    read=dict(docs=read[0], bytes=read[1]),
                    removed={s: dict(docs=d, bytes=b) for s, (d, b) in
                             sorted(removed.items(), key=lambda kv: steps.index(kv[0].split(":")[0]))},
                    seconds=round(time.time() - t0, 1))
        problem = None
        if meta["train"]["docs"] == 0:
            problem = (f"no document survived filtering into the train split (read {read[0]}, removed "
                       f"{meta['removed']}, {meta['val']['docs']} went to val)")
        elif token_kl and "token outliers" not in removed:
            problem = (f"token_kl measures documents against the spread of the train split's, and "
                       f"{meta['train']['docs']} are too few for that (it needs {MIN_KL_DOCS}): more documents, "
                       "or no token_kl")
        elif every and meta["val"]["docs"] == 0:
            problem = (f"no document fell into the val split (each of the {meta['train']['docs']} kept had a chance "
                       f"of 1 in {every}, by its hash): a larger val_fraction, or more documents" if not val_docs else
                       f"token_kl={token_kl} took every one of the {val_docs} val documents: a larger value, or more "
                       "documents")
        if problem:
            raise ValueError(f"source {source!r}: {problem}")
        blob = json.dumps(meta, indent=1).encode()   # (one that cannot be written: refused before the old files go)
    except BaseException:  # (a refusal, a bad file in the source, Ctrl-C: the old dataset stays as it was)
        shutil.rmtree(out_dir if made else build, ignore_errors=True)   # (a folder it made: gone too)
        raise
    if os.path.exists(meta_path):  # the old dataset goes, meta.json first (a folder holds shards only with it)
        os.remove(meta_path)
    for name in os.listdir(out_dir):  # (the loader must never mix another build's shards in)
        if re.fullmatch(r"\.?(train|val)_\d{3,}\.bin(\.tmp\d*)?", name):   # (and a killed write's temporary)
            os.remove(os.path.join(out_dir, name))
    for name in meta["train"]["shards"] + meta["val"]["shards"]:
        os.replace(os.path.join(build, name), os.path.join(out_dir, name))
    os.rmdir(build)
    atomic_write(meta_path, lambda f: f.write(blob))
    if verbose:
        print(f"{'step':<28} {'docs':>9} {'MB':>9}")
        print(f"{'read':<28} {read[0]:>9,} {read[1] / 1e6:>9.2f}")
        for step, r in meta["removed"].items():
            print(f"{'- ' + step:<28} {r['docs']:>9,} {r['bytes'] / 1e6:>9.2f}")
        for s in ("train", "val"):
            m = meta[s]
            print(f"{'= ' + s:<28} {m['docs']:>9,} {m['bytes'] / 1e6:>9.2f}   {m['tokens']:,} tokens, "
                  f"{len(m['shards'])} shard(s)")
        print(f"data: wrote {out_dir} in {meta['seconds']} s")
    return meta


# -----------------------------------------------------------------------------
# 9. The packed loader

def same_data(key, saved, mine):
    """Whether a loader state's value of key describes this loader's data. A content of None is unknown (a folder
    of an older data.py, or a state of an older train.py): not compared."""
    return saved == mine or key == "content" and (saved is None or mine is None)


class PackedLoader:
    """Endless (x, y, doc_ids) batches of (B, T) int64 CPU tensors from out_dir/{split}_NNN.bin (rules: module
    docstring). Deterministic in (seed, rank, world_size); state_dict() holds the position for exact resume."""

    block = 1 << 20  # windows per shuffle block

    def __init__(self, data_dir, split, batch_size, seq_len, rank=0, world_size=1, seed=0, fingerprint=None):
        for name, value, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("world_size", world_size, 1),
                                 ("rank", rank, 0), ("seed", seed, 0)):
            if not isinstance(value, numbers.Integral) or value < low:  # (numpy ints too)
                raise ValueError(f"PackedLoader: {name}={value!r}, must be an integer >= {low}")
        if not 0 <= rank < world_size:
            raise ValueError(f"PackedLoader: rank {rank} is not one of the {world_size} processes")
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{meta_path} not found: run prepare_data / `python data.py` first "
                                    "(a folder without meta.json is incomplete)")
        meta = check_meta(meta_path, ("fingerprint", "vocab_size", "bos_id"))
        if not meta.get(split, {}).get("shards"):
            raise ValueError(f"{data_dir}: no {split!r} shards in meta.json" +
                             (" (made with --val_fraction 0?)" if split == "val" else ""))
        self.shards, self.paths = [], [os.path.join(data_dir, name) for name in meta[split]["shards"]]
        for name in meta[split]["shards"]:
            header, tokens = read_shard(os.path.join(data_dir, name))
            want = fingerprint or meta["fingerprint"]
            if header["fingerprint"] != want:
                raise ValueError(f"{os.path.join(data_dir, name)}: made with tokenizer {header['fingerprint']}, "
                                 f"expected {want}; re-run data.py (prepare_data) with this tokenizer")
            if (header["vocab_size"], header["bos_id"]) != (meta["vocab_size"], meta["bos_id"]):
                raise ValueError(f"{os.path.join(data_dir, name)}: damaged header (vocab size {header['vocab_size']}"
                                 f", <|begin_of_text|> {header['bos_id']}; meta.json: {meta['vocab_size']}, "
                                 f"{meta['bos_id']})")
            self.shards.append(tokens)
        self.data_dir, self.bos_id, self.vocab_size = data_dir, meta["bos_id"], meta["vocab_size"]
        self.fingerprint = meta["fingerprint"]
        # what the shards hold, from the CRC-32s data.py wrote (None for a folder of an older data.py): a resumed
        # run must read the same tokens, not just as many (two folders of a mix could hold equal counts). The same
        # source and settings make the same shards; the same tokens cut into shards of another size do not match
        crcs = meta[split].get("crc32")
        self.content = f"{zlib.crc32(json.dumps(crcs).encode()):08x}" if crcs else None
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # stream offset of each shard
        self.n_tokens = int(self.starts[-1])
        self.n_windows = (self.n_tokens - 1) // seq_len  # the last target needs one token after the window
        if self.n_windows < 1:
            more = "a larger --val_fraction in data.py" if split == "val" else "more data"
            raise ValueError(f"{data_dir}: {split} has {self.n_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}: "
                             f"a smaller seq_len, or {more}")
        # (numpy integers made plain: the state they go into is saved as JSON and loaded weights-only)
        self.B, self.T, self.rank, self.world, self.seed = map(int, (batch_size, seq_len, rank, world_size, seed))
        self.batch = 0  # batches this rank has returned
        self._cache = {}

    def _perm(self, epoch, blk, n):
        """The random order of the n windows of block blk in epoch `epoch` (blk=-1: the order of the blocks)."""
        key = (epoch, blk)
        if key not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[key] = np.random.default_rng([self.seed, epoch, blk + 1]).permutation(n)
        return self._cache[key]

    def window(self, g):
        """Global position g (0, 1, 2, ... over all epochs) -> index of the window to read."""
        epoch, i = divmod(g, self.n_windows)
        n_full, rest = divmod(self.n_windows, self.block)
        b, j = divmod(i, self.block)
        blk = self._perm(epoch, -1, n_full)[b] if b < n_full else n_full  # the partial block comes last
        size = self.block if blk < n_full else rest
        return int(blk * self.block + self._perm(epoch, blk, size)[j])

    def tokens(self, start, stop):
        """stream[start:stop] across shard boundaries."""
        out, k = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            end = min(stop, int(self.starts[k + 1]))
            out.append(self.shards[k][start - self.starts[k]: end - self.starts[k]])
            start, k = end, k + 1
        return np.concatenate(out) if len(out) > 1 else out[0]

    def next_batch(self):
        g0 = (self.batch * self.world + self.rank) * self.B  # this rank's rows of the global batch
        batch = self.read(range(g0, g0 + self.B))
        self.batch += 1
        return batch

    def read(self, positions):
        """(x, y, doc_ids), one row for each global position (see window()): (len(positions), T) each."""
        T = self.T
        windows = [self.window(int(g)) for g in positions]
        rows = [self.tokens(w * T, w * T + T + 1) for w in windows]
        buf = torch.from_numpy(np.stack(rows).astype(np.int64))  # (rows, T+1)
        if int(buf.max()) >= self.vocab_size:  # a damaged shard (no tokenizer makes such ids): name it here
            row, col = map(int, (buf >= self.vocab_size).nonzero()[0])
            path = self.paths[int(np.searchsorted(self.starts, windows[row] * T + col, side="right")) - 1]
            raise ValueError(f"{path}: token id {int(buf[row, col])} is not below the tokenizer's {self.vocab_size} "
                             "ids: the shard is damaged")
        x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()  # (rows, T) each
        doc_ids = torch.cumsum(x == self.bos_id, dim=1)           # (rows, T): +1 at each <|begin_of_text|>
        doc_ids -= doc_ids[:, :1].clone()                         # the window's first document is 0
        return x, y, doc_ids

    def __iter__(self):  # `for x, y, doc_ids in loader:` (endless: the caller decides when to stop)
        while True:
            yield self.next_batch()

    def state_dict(self):
        return dict(windows=self.batch * self.world * self.B, seed=self.seed, seq_len=self.T,
                    n_tokens=self.n_tokens, content=self.content)

    def load_state_dict(self, sd):
        if "windows" not in sd:
            raise ValueError(f"loader state is of a data mix of {len(sd.get('sources', []))} folders, this loader "
                             "reads one: cannot resume exactly")
        for k, mine in dict(seed=self.seed, seq_len=self.T, n_tokens=self.n_tokens, content=self.content).items():
            if not same_data(k, sd.get(k, mine), mine):
                raise ValueError(f"loader state has {k}={sd[k]}, this loader {k}={mine}: "
                                 "not the same data or settings, cannot resume exactly")
        global_batch = self.world * self.B
        if sd["windows"] % global_batch:
            raise ValueError(f"loader state is at window {sd['windows']}, not a multiple of the global batch "
                             f"{global_batch} (batch_size x world_size): cannot resume exactly")
        self.batch = sd["windows"] // global_batch


# -----------------------------------------------------------------------------
# 10. The data mix: several sources in given shares of the tokens

class MixedLoader:
    """Batches from several PackedLoaders (one per source folder, built with the same batch size, seq_len, rank,
    world_size and seed) in given shares of the tokens: Llama 3's data mix (section 3.1.2: ~50% general knowledge,
    25% math and reasoning, 17% code, 8% multilingual) and its annealing on upsampled high-quality sources (3.4.3).
    Global row n (n = 0, 1, 2, ... over all batches) comes from one source, drawn with probability its weight by a
    generator seeded with (seed, n // chunk): every rank draws the same rows and takes its own, as PackedLoader
    does. Each source reads its own shuffled windows in order, every rank counting how many the mix has taken from
    it, so a small source of high weight is read for several epochs and a large one of low weight in part. The
    state is the number of rows served and each source's count: as PackedLoader's, it does not depend on how the
    global batch is split into ranks and micro-batches. A state may be loaded with other weights (Llama 3 changed
    its mix while training): the rows from there on are drawn by the new ones, each source going on where it was.
    A weight may be 0: that source is never drawn nor read, its count kept (a later state may give it a weight), and
    the rows are those of the mix without it (the same draws among the others)."""

    chunk = 1 << 16  # rows whose sources are drawn at once

    def __init__(self, loaders, weights, seed=0):
        if len(loaders) != len(weights) or not loaders:
            raise ValueError(f"MixedLoader: {len(loaders)} loaders and {len(weights)} weights")
        if not all(0 <= w < math.inf for w in weights) or not 0 < sum(weights) < math.inf:  # (1e308 + 1e308: inf)
            raise ValueError(f"MixedLoader: weights {list(weights)} must all be finite and >= 0, and one > 0")
        if not isinstance(seed, numbers.Integral) or seed < 0:  # (numpy ints too: made plain below, as PackedLoader's)
            raise ValueError(f"MixedLoader: seed={seed!r}, must be an integer >= 0")
        if len({(ld.B, ld.T, ld.rank, ld.world, ld.seed) for ld in loaders}) > 1:
            raise ValueError("MixedLoader: the loaders differ in batch_size, seq_len, rank, world_size or seed")
        tokens = {(ld.fingerprint, ld.vocab_size, ld.bos_id) for ld in loaders}
        if len(tokens) > 1:  # the same ids must mean the same text in every row
            raise ValueError(f"MixedLoader: the folders were made with different tokenizers: "
                             f"{', '.join(f'{ld.data_dir} {ld.fingerprint}' for ld in loaders)}")
        self.loaders, self.seed = loaders, int(seed)
        self.p = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.rows, self.taken = 0, [0] * len(loaders)  # global rows served; windows taken from each source
        self._drawn = (None, None)                     # (chunk number, its rows' sources)

    def sources(self, start, stop):
        """The source of each global row in [start, stop)."""
        out = []
        for c in range(start // self.chunk, (stop - 1) // self.chunk + 1):
            if self._drawn[0] != c:  # ("mix" in ASCII keeps these draws apart from PackedLoader's shuffles)
                rng = np.random.default_rng([self.seed, 0x6D6978, c])
                live = np.flatnonzero(self.p)  # (weight > 0: a 0 is never drawn, the others as if it were not there)
                self._drawn = (c, rng.choice(live, self.chunk, p=self.p[live]))
            out.append(self._drawn[1][max(start - c * self.chunk, 0): stop - c * self.chunk])
        return np.concatenate(out)

    def next_batch(self):
        first = self.loaders[0]
        B, rows = first.B, first.B * first.world
        source = self.sources(self.rows, self.rows + rows)  # of each row of this global batch
        position = np.zeros(rows, dtype=np.int64)           # of each row in its source's own order
        for s in range(len(self.loaders)):
            of_s = np.flatnonzero(source == s)
            position[of_s] = self.taken[s] + np.arange(len(of_s))
            self.taken[s] += len(of_s)
        self.rows += rows
        parts = [self.loaders[source[i]].read([position[i]]) for i in range(first.rank * B, first.rank * B + B)]
        return tuple(torch.cat(column) for column in zip(*parts))  # (x, y, doc_ids), (B, T) each

    def state_dict(self):
        return dict(rows=self.rows, taken=list(self.taken), seed=self.seed, loader_seed=self.loaders[0].seed,
                    weights=self.p.tolist(),
                    sources=[dict(n_tokens=ld.n_tokens, seq_len=ld.T, content=ld.content) for ld in self.loaders])

    def load_state_dict(self, sd):
        """A state of this mix's folders, or of its first ones: folders added on resume (a new source, or one to
        evaluate) start at their beginning, the others go on where they were. One folder's state (PackedLoader's,
        a run without a mix) is a mix of that one folder."""
        if "windows" in sd:   # (PackedLoader's global position is the count of windows taken from its folder)
            sd = dict(rows=sd["windows"], taken=[sd["windows"]], seed=self.seed, loader_seed=sd["seed"],
                      sources=[{k: sd.get(k) for k in ("n_tokens", "seq_len", "content")}])
        # each folder's windows' order: the seed of the mix's loaders, not the mix's own (a state of an older
        # data.py has none: not compared)
        if sd.get("loader_seed", self.loaders[0].seed) != self.loaders[0].seed:
            raise ValueError(f"loader state has seed={sd['loader_seed']}, this mix's folders seed="
                             f"{self.loaders[0].seed}: cannot resume exactly")
        mine = self.state_dict()
        if len(sd["sources"]) > len(mine["sources"]):
            raise ValueError(f"loader state has {len(sd['sources'])} folders, this mix {len(mine['sources'])}: a "
                             "resume may add folders after the state's, not drop any (give one a share of 0)")
        described = all(same_data(key, theirs.get(key), value)   # each folder, in order
                        for theirs, ours in zip(sd["sources"], mine["sources"]) for key, value in ours.items())
        for k, ok in (("seed", sd["seed"] == mine["seed"]), ("sources", described)):
            if not ok:
                raise ValueError(f"loader state has {k}={sd[k]}, this loader {k}={mine[k]}: not the same folders "
                                 "in the same order (new ones after them) with the same seed, cannot resume exactly")
        self.rows, self.taken = sd["rows"], list(sd["taken"]) + [0] * (len(self.loaders) - len(sd["taken"]))


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    p = argparse.ArgumentParser(description="text sources -> clean/dedup/filter -> token shards")
    p.add_argument("--source", default="stdlib", help="stdlib | PATH (a file or folder of .txt, .md, .jsonl[.gz], "
                   ".parquet, .html, .warc[.gz], .wet[.gz]) | hf:NAME[:CONFIG]")
    p.add_argument("--tokenizer", required=True, help="tok.model from tokenizer.py")
    p.add_argument("--out", required=True, help="output folder, e.g. data/NAME")
    p.add_argument("--val_fraction", type=float, default=0.02,
                   help="share of documents held out for eval: 1 in round(1/f), by hash (0.3 -> 1 in 3)")
    p.add_argument("--num_proc", type=int, default=None, help="tokenizer processes (default: cores, max 8)")
    p.add_argument("--shard_tokens", type=int, default=1 << 26, help="tokens per shard (2^26 = 256 MB)")
    p.add_argument("--max_docs", type=int, default=None, help="read at most this many documents")
    p.add_argument("--quality_model", default=None, help="checkpoint dir: label by its bits/byte, filter")
    p.add_argument("--quality_drop", type=float, default=0.1, help="share of the labelled sample called junk")
    p.add_argument("--line_dedup", type=int, default=0, help="remove lines seen more than this many times in a bucket "
                   f"of {LINE_BUCKET:,} documents (Llama 3: 6; for web text, not code); 0: off")
    p.add_argument("--blocklist", default=None, help="a file of domains (one per line) whose WARC/WET pages are left "
                   "out: Llama 3's safety filter, e.g. a UT1 list as FineWeb used")
    p.add_argument("--dirty_words", default=None, help="a file of words and phrases (one per line, e.g. the LDNOOBW "
                   f"list C4 used): a document with {MIN_DIRTY}+ of them, over 1 in {round(1 / MAX_DIRTY)} of its "
                   "words, goes")
    p.add_argument("--token_kl", type=float, default=0, help="Llama 3's token-distribution KL filter: a document "
                   "further from the corpus's token frequencies than documents of its length by over this many "
                   "robust standard deviations goes (5 is a start); 0: off")
    a = p.parse_args()
    if a.quality_drop != p.get_default("quality_drop") and not a.quality_model:
        p.error("--quality_drop goes with --quality_model: it is the share of the sample that model's filter drops")
    try:
        prepare_data(a.source, a.tokenizer, a.out, val_fraction=a.val_fraction, num_proc=a.num_proc,
                     shard_tokens=a.shard_tokens, max_docs=a.max_docs, quality_model=a.quality_model,
                     quality_drop=a.quality_drop, line_dedup=a.line_dedup, blocklist=a.blocklist,
                     dirty_words=a.dirty_words, token_kl=a.token_kl)
    except (ValueError, FileNotFoundError, ImportError) as e:  # a mistyped path or flag, a damaged file: one line
        sys.exit(str(e))
