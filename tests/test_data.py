"""Tests for data.py: sources, cleaning, dedup, filters, shards, the packed loader, prepare_data end to end.
Hermetic: every corpus, tokenizer and shard is made here in tmp_path. Run: python -m pytest -q tests/test_data.py"""
import ast
import gzip
import io
import itertools
import json
import os
import pickle
import re
import stringprep
import sys
import unicodedata
import zlib

import numpy as np
import pytest
import torch

import data
from tokenizer import Tokenizer, stdlib_sources

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or has had "
         "not first one their its new after who they two have but been other when during time into all can more "
         "city river house music state world year school people number name part team film game water land song "
         "king war church book line small large north south early later known called used made found played "
         "built became").split()


def prose(rng, n_words):
    """Random English-looking text: sentences of real words."""
    words = rng.choice(WORDS, n_words)
    sentences = [" ".join(words[i:i + 12]).capitalize() + "." for i in range(0, n_words, 12)]
    return " ".join(sentences)


# ----------------------------------------------------------------------------- sources and cleaning

def test_clean_text():
    assert data.clean_text("Cafe\u0301  \r\n\r\n\r\n\r\n\r\nx\x00\ufeff\t \n") == "Caf\u00e9\n\n\nx"
    assert data.clean_text("\n\n  indented code\n    more  \n\n") == "  indented code\n    more"
    half_emoji = json.loads('"ok \\ud83d!"')  # valid JSON, but no UTF-8 for it: it would fail at every encode
    assert data.clean_text(half_emoji) == "ok \ufffd!"
    parted = data.clean_text("Cafe\x00\u0301 menu")  # the control goes first, then the accent joins its letter
    assert parted == "Caf\u00e9 menu" and unicodedata.is_normalized("NFC", parted)
    assert data.clean_text("a\rb\r\nc\x0b\x0c\x85\x9fd") == "a\nb\ncd"   # old Mac and DOS newlines; C0 and C1 controls
    assert data.clean_text("x\u00b2 \ufb01le \u2126") == "x\u00b2 \ufb01le \u03a9"  # NFC, not NFKC: ², ﬁ kept


def test_jsonl_bad_lines(tmp_path, capsys):
    good = tmp_path / "a.jsonl.gz"
    with gzip.open(good, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"id": 7}) + "\n" + json.dumps(["x"]) + "\n"
                + json.dumps({"text": "two"}) + "\n")
    assert list(data.iter_documents(str(good))) == ["one", "two"]
    err = capsys.readouterr().err
    assert "a.jsonl.gz: skipped 2 line(s)" in err and "first at line 3" in err
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + '{"text": "cut off')
    with pytest.raises(ValueError, match=r"b\.jsonl:2: not valid JSON"):
        list(data.iter_documents(str(bad)))
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')  # Latin-1
    with pytest.raises(ValueError, match=r"b\.jsonl:2: not UTF-8"):
        list(data.iter_documents(str(bad)))
    cut = tmp_path / "c.jsonl.gz"
    cut.write_bytes(good.read_bytes()[:-12])
    with pytest.raises(ValueError, match=r"c\.jsonl\.gz: unreadable after line \d+"):
        list(data.iter_documents(str(cut)))
    cut.write_bytes(b'{"text": "not gzipped"}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl\.gz: unreadable after line 0"):
        list(data.iter_documents(str(cut)))
    with gzip.open(cut, "wt", encoding="utf-8") as f:  # a damaged deflate block: zlib's own error, named
        f.write("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(200)))
    raw = bytearray(cut.read_bytes())
    raw[200] ^= 0xFF
    cut.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"c\.jsonl\.gz: unreadable after line \d+"):
        list(data.iter_documents(str(cut)))


def test_folder_source(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.md").write_text("# a")
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "c1"}\n{"text": "c2"}\n')
    (tmp_path / "notes.csv").write_text("ignored")
    assert list(data.iter_documents(str(tmp_path))) == ["# a", "bee", "c1", "c2"]  # sorted paths
    (tmp_path / "z.txt").write_bytes(b"\xff\xfe latin-1?")
    with pytest.raises(ValueError, match=r"z\.txt: not UTF-8"):
        list(data.iter_documents(str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="nope"):
        list(data.iter_documents(str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        list(data.iter_documents(str(tmp_path / "empty")))


def test_stdlib_documents_add_docstrings():
    path, code = next(stdlib_sources())
    docs = list(itertools.islice(data.stdlib_documents(), 2))
    assert docs[0] == code  # the module's source, then its docstrings as an English document
    assert ast.get_docstring(ast.parse(code)) in docs[1] and "def " not in docs[1]


def test_a_modules_docstrings_take_its_codes_split(tmp_path):
    """The docstrings are in the code word for word: each split by its own hash, 19 modules of the default build
    had one in train and the other in val (review, helper). Both are Parts of the module: one split hash."""
    tok_path = str(tmp_path / "tok.model")
    Tokenizer.train(["def f(x):\n    return x  # a tiny corpus\n" * 20], 256 + 256 + 8).save(tok_path)
    data._init_worker(tok_path, threads=1)
    docs = list(itertools.islice(data.stdlib_documents(), 40))
    assert all(isinstance(d, data.Part) for d in docs) and pickle.loads(pickle.dumps(docs[1])).of == docs[1].of
    split_hashes = {}
    for doc, (_, rule, _, _, _, split_h) in zip(docs, data._clean_chunk(docs)):
        if rule != "empty":
            split_hashes.setdefault(doc.of, set()).add(split_h)
    assert all(len(hs) == 1 for hs in split_hashes.values())
    assert sum(a.of == b.of for a, b in zip(docs, docs[1:])) >= 10   # (modules with docstrings: two documents)
    plain = data._clean_chunk(["just a document"])[0]
    assert plain[5] == plain[2] == data.doc_hash("just a document")   # others: by their own text


# ----------------------------------------------------------------------------- web pages

PAGE = """<!DOCTYPE html><html class="sidebar-visible"><head><title>Site | Title</title><style>p {color: red}</style>
<script>var s = "<p>not text</p>";</script></head>
<body><header><h1>Site name</h1></header><nav><ul><li><a href=/>Home</a><li><a href=/blog>Blog</a></ul></nav>
<div class="cookie-banner">We use cookies. <button>OK</button></div>
<article><h1>Title &amp; more</h1><div class="modal">Sign up now!</div>
<h2 id=more><a href="#more">A heading that links to itself</a></h2>
<p>First   paragraph with a <a href=x>link</a>
 and <b>bold</b>.<br>Second line.</p>
<ul class="tags"><li><a href=/t/1>python</a></li><li><a href=/t/2>html</a></li></ul>
<pre><code>def f(x):
    return x  # indented</code></pre>
<p>Math: <math alttext="x^2"><mi>x</mi><mn>2</mn></math> and <img src=half.png alt="\\frac{1}{2}"> here.</p>
<span style="display: none">hidden text</span><div hidden>also hidden</div><div aria-hidden="true">and this</div>
<table><tr><th>a<th>b<tr><td>1<td>2</table>
<p>Unclosed paragraph<p>next one</p>
<div class="share-buttons"><div><a href=t>Tweet</a></div> Share this</div>
</article><aside>Related posts</aside><footer>(c) 2024 Site</footer></body></html>"""


def test_html_to_text():
    """The main text in reading order, plain: boilerplate, hidden elements and link lists out; code keeps its
    spaces; image alt text and MathML's TeX in; table cells on their row's line."""
    assert data.clean_text(data.HTML(PAGE)) == (
        "Title & more\n\nA heading that links to itself\n\nFirst paragraph with a link and bold.\nSecond line.\n\n"
        "def f(x):\n    return x  # indented\n\nMath: x^2 and \\frac{1}{2} here.\n\na b\n1 2\n\n"
        "Unclosed paragraph\n\nnext one")
    assert "<article>" in data.clean_text(PAGE)  # a plain str is text, not markup
    assert data.html_to_text("<p>kept<![foo bar]>lost") == "kept"  # html.parser gives up here: the text so far stays
    assert data.html_to_text("<p>no end <div class=menu>menu <b>never closed") == "no end"
    assert data.html_to_text("<p>Main text.</p><!-- cut inside a comment: <div>old</div> <p>x") == "Main text."
    # a <form> may wrap a whole page (ASP.NET); code keeps its links and blocks; classes are words, ids are not
    assert data.html_to_text("<body><form id=form1><h1>Report</h1><p>Approved.</p></form>") == "Report\n\nApproved."
    code = '<pre>struct A&lt;T = <a href=/g>Global</a>&gt;<div class="where">where\n    T: <a href=/c>Clone</a>,</div>{'
    assert data.html_to_text(code + " }</pre>") == "struct A<T = Global>\nwhere\n    T: Clone,\n{ }"
    content = '<section id=navigation><h2 id=sharing-data>Sharing data</h2><div class="post has-sidebar"><p>Text.</div>'
    assert data.html_to_text(content + "</section>") == "Sharing data\n\nText."
    # hidden elements, also those whose end tag may be left out
    hidden = ('<ul><li hidden>gone<li>one<li aria-hidden="TRUE">gone</ul><p style="visibility: hidden">gone<p>two'
              '<p class=cookie-notice>gone</p><table><tr><td style="DISPLAY:NONE">gone<td>three</table>')
    assert data.html_to_text(hidden) == "one\n\ntwo\n\nthree"
    for page, shown in (  # they end where a browser ends them: not at a <br> or an inner list; at their parent's end
            ("<li hidden>gone<br>gone too</li><li>shown", "shown"),
            ("<ul><li hidden>gone<ul><li>nested, gone</ul>gone</li><li>shown</ul>", "shown"),
            ("<ul class=menu><li class=menu-item>gone<ul class=sub-menu><li>gone</ul>gone</ul><p>shown", "shown"),
            ("<table><tr hidden><td>gone<td>gone</tr><tr><td>shown</table>", "shown"),
            ("<table><tr><td hidden><table><tr><td>gone</table></td><td>shown</table>", "shown"),
            ("<dl><dd hidden><p>gone</p></dd><dt>shown</dl>", "shown"),
            ("<form><p hidden>gone</form>shown", "shown"), ("<ul><li hidden>gone</ul>shown", "shown")):
        assert data.html_to_text(page) == shown, page
    # the charset: the HTTP header's, else the page's <meta>, else UTF-8; bytes that do not decode: U+FFFD
    latin = b'<meta charset="iso-8859-1"><p>caf\xe9</p>'
    assert data.decode_html(latin).endswith("caf\u00e9</p>")
    assert data.decode_html(latin, "utf-8").endswith("caf\ufffd</p>")
    for label in ("no-such-codec", "undefined", "idna"):  # unknown, or a codec that raises even with "replace"
        assert data.decode_html(f"<meta charset={label}><p>".encode() + b"\xc3\xa9\xff").endswith("<p>\u00e9\ufffd")
    assert data.decode_html("<p>bom</p>".encode("utf-16"), "latin-1") == "<p>bom</p>"  # (with a BOM) the BOM wins
    # no label at all: UTF-8, or windows-1252 when most of the non-ASCII is no UTF-8 (an old page of legacy bytes)
    assert data.decode_html("<p>caf\u00e9 na\u00efve \u201cquoted\u201d".encode("cp1252")).endswith(
        "caf\u00e9 na\u00efve \u201cquoted\u201d")
    # one bad byte
    assert data.decode_html("<p>\u00e9t\u00e9 \u00e0".encode() + b"\xff") == "<p>\u00e9t\u00e9 \u00e0\ufffd"
    assert data.decode_html(b"<p>caf\xe9", "latin-1") == "<p>caf\u00e9"   # (a Python spelling, no WHATWG label)
    page = "<p>Don\ufffdt stop: caf\u00e9 \u2014 \ufffd\ufffd".encode()  # U+FFFD the page holds is no decoding error
    assert data.decode_html(page) == page.decode()
    russian = "<p>\u0422\u0435\u0430\u0442\u0440 \u0438 \u0443\u043b\u0438\u0446\u0430".encode("cp1251")
    assert data.decode_html(russian) == russian.decode("utf-8", "replace")   # words of legacy bytes: no Latin page


def warc_record(kind, url, date="2024-01-01T00:00:00Z", block=b"", http=None):
    """One WARC/1.0 record; http: the status line and headers of a response, written before the block."""
    if http is not None:
        block = ("\r\n".join(http) + "\r\n\r\n").encode() + block
    content_type = "application/http; msgtype=response" if http is not None else "text/plain"
    return (f"WARC/1.0\r\nWARC-Type: {kind}\r\nWARC-Target-URI: {url}\r\nWARC-Date: {date}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(block)}\r\n\r\n").encode() + block + b"\r\n\r\n"


def page(url, date, html, status="200 OK", content_type="text/html; charset=utf-8", *headers):
    return warc_record("response", url, date, html, [f"HTTP/1.1 {status}", f"Content-Type: {content_type}", *headers])


def write_warc(path, records):
    """Common Crawl's layout: each record gzipped on its own (.warc.gz), or the records as they are (.warc)."""
    path.write_bytes(b"".join(gzip.compress(r) for r in records) if path.suffix == ".gz" else b"".join(records))


def test_warc_pages_and_url_dedup(tmp_path, capsys):
    lf_only = b"HTTP/1.1 200 OK\nContent-Type: text/html\n\n<p>x5, its HTTP header in LF lines</p>"
    write_warc(tmp_path / "a.warc.gz", [
        warc_record("warcinfo", ""),
        warc_record("request", "http://x.org/1", block=b"GET /1 HTTP/1.1\r\n\r\n"),
        page("http://x.org/1", "2024-05-01T00:00:00Z", b"<p>x1, the May version</p>"),
        page("http://x.org/404", "2024-05-01T00:00:00Z", b"<p>not found</p>", "404 Not Found"),
        page("http://x.org/logo", "2024-05-01T00:00:00Z", b"\x89PNG...", "200 OK", "image/png"),
        page("http://x.org/gz", "2024-05-01T00:00:00Z", b"\x1f\x8b...", "200 OK", "text/html",
             "Content-Encoding: gzip"),
        page("http://x.org/chunks", "2024-05-01T00:00:00Z", b"9\r\n<p>x</p>\r\n0\r\n\r\n", "200 OK", "text/html",
             "Transfer-Encoding: chunked"),
        page("http://x.org/latin", "2024-05-01T00:00:00Z", b"<p>caf\xe9</p>", "200 OK", "text/html; charset = latin1"),
        page("http://x.org/odd", "2024-05-01T00:00:00Z", b"<p>\xc3\xa9, charset undefined</p>", "200 OK",
             "text/html; charset=undefined"),  # (a misconfigured server: read as UTF-8)
        page("http://x.org/4", "2024-06-01T00:00:00.900Z", b"<p>x4, at 0.9 s</p>"),
        warc_record("response", "http://x.org/5", block=lf_only).replace(b"text/plain", b"Application/HTTP"),
        warc_record("metadata", "http://x.org/1", block=b"fetchTimeMs: 12\r\n"),
    ])
    write_warc(tmp_path / "b.warc", [
        page("http://x.org/1", "2024-01-01T00:00:00Z", b"<p>x1, the January version</p>"),  # older: not read
        page("<http://x.org/2>", "2024-01-01T00:00:00Z", b"<p>x2 in January</p>"),   # WARC/1.0's <URI> form
        page("http://x.org/2", "2024-02-01T00:00:00Z", b"<p>x2 in February</p>"),
        page("http://x.org/3", "2024-03-01T00:00:00Z", b"<p>x3, first</p>"),
        page("http://x.org/3", "2024-03-01T00:00:00Z", b"<p>x3, a copy of the same date</p>"),  # a tie: the first
        page("http://x.org/4", "2024-06-01T00:00:00Z", b"<p>x4, at 0 s</p>"),  # older by 0.9 s
    ])
    write_warc(tmp_path / "c.warc.wet.gz", [  # Common Crawl's WET files: the text of each page
        warc_record("conversion", "http://y.org/", block="y, as text (WET) \u00e9".encode())])
    docs = list(data.iter_documents(str(tmp_path)))
    assert [type(d) for d in docs] == [data.HTML] * 7 + [str]  # WET text is text
    assert [data.clean_text(d) for d in docs] == [
        "x1, the May version", "caf\u00e9", "\u00e9, charset undefined", "x4, at 0.9 s",
        "x5, its HTTP header in LF lines", "x2 in February", "x3, first", "y, as text (WET) \u00e9"]
    assert "URL: older version: 4 of the pages of 3 WARC file(s) left out" in capsys.readouterr().err
    removed = {}  # (prepare_data's table: what each step removed, [documents, bytes])
    assert len(list(data.iter_documents(str(tmp_path), removed=removed))) == 8 and not capsys.readouterr().err
    older = [b"<p>x1, the January version</p>", b"<p>x2 in January</p>", b"<p>x3, a copy of the same date</p>",
             b"<p>x4, at 0 s</p>"]
    assert removed == {"URL: older version": [4, sum(map(len, older))]}


def test_blocklist(corpus, tmp_path, capsys):
    """Llama 3's safety filter by domain: pages of a listed domain or of its subdomains are left out, before URL
    dedup; the list is part of the cache's settings; a bad list or a source without URLs is refused."""
    _, docs, tok_path = corpus
    blocklist = tmp_path / "adult.txt"
    blocklist.write_text("\ufeff# domains (UT1's format)\nadult.example\n\n*.Casino.Example.  # a wildcard\n"
                         "b\u00fccher.example\n", encoding="utf-8")  # (a byte-order mark first, as some editors write)
    domains = data.read_blocklist(str(blocklist))
    assert domains == {"adult.example", "casino.example", "xn--bcher-kva.example"}
    urls = ["http://adult.example/", "https://WWW.Adult.Example.:8080/a?b", "http://notadult.example/",
            "http://casino.example/x", "http://ok.org/adult.example", "http://[::1", "http://xn--bcher-kva.example/",
            "http://B\u00fccher.example/"]
    assert [data.blocked(u, domains) for u in urls] == [1, 1, 0, 1, 0, 0, 1, 1]
    src = tmp_path / "crawl"
    src.mkdir()
    write_warc(src / "a.warc.gz", [page(u, "2024-01-01T00:00:00Z", f"<p>{docs[30 + i]}</p>".encode())
                                   for i, u in enumerate(urls[:5])])
    assert len(list(data.iter_documents(str(src), data.read_blocklist(str(blocklist))))) == 2
    assert "URL: blocklisted: 3 of the pages of 1 WARC file(s) left out" in capsys.readouterr().err
    out = str(tmp_path / "out")
    meta = data.prepare_data(str(src), tok_path, out, num_proc=1, blocklist=str(blocklist), val_fraction=0,
                             verbose=False)
    blocked_bytes = sum(len(f"<p>{docs[30 + i]}</p>".encode()) for i in (0, 1, 3))
    assert meta["removed"]["URL: blocklisted"] == dict(docs=3, bytes=blocked_bytes) and meta["train"]["docs"] == 2
    assert meta["read"]["docs"] == 5 and meta["config"]["blocklist"][0] == str(blocklist)
    assert data.prepare_data(str(src), tok_path, out, num_proc=1, val_fraction=0, verbose=False)["read"][
        "docs"] == 5  # rebuilt
    blocklist.write_text("casino.example\n")  # another list: the cache is rebuilt
    assert data.prepare_data(str(src), tok_path, out, num_proc=1, blocklist=str(blocklist), val_fraction=0,
                             verbose=False)["train"]["docs"] == 4
    for line in ("adult.example casino.example", "http://adult.example/", "adult.example/path", "adult.example:443",
                 "*.", "\u200b", "\u00ad."):   # (the last two: what IDNA ignores, so no domain: it blocked URLs
        # of no host)
        blocklist.write_text(f"ok.example\n{line}\n")  # two words, or a line of UT1's `urls` files: nothing matches
        with pytest.raises(ValueError, match=r"adult\.txt:2: not a domain"):
            data.prepare_data(str(src), tok_path, out, num_proc=1, blocklist=str(blocklist), verbose=False)
    with pytest.raises(FileNotFoundError, match="blocklist .*typo.txt: no such file"):
        data.prepare_data(str(src), tok_path, out, num_proc=1, blocklist=str(tmp_path / "typo.txt"), verbose=False)
    with pytest.raises(FileNotFoundError, match="a folder: of a UT1 category, give its `domains` file"):
        data.prepare_data(str(src), tok_path, out, num_proc=1, blocklist=str(src), verbose=False)
    blocklist.write_text("adult.example\n")
    with pytest.raises(ValueError, match="leaves out pages by their URL, and source .* has no .warc"):
        data.prepare_data(str(tmp_path / "adult.txt"), tok_path, out, num_proc=1, blocklist=str(blocklist))
    assert os.path.exists(os.path.join(out, "meta.json"))  # (refused before the old cache went)
    # the tokenizer learns from the pages the shards will hold: tokenizer.py takes the list too
    import subprocess
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tokenizer.py")
    write_warc(src / "a.warc.gz", [page("http://adult.example/", "2024-01-01T00:00:00Z", b"<p>" + b"zqxj " * 500),
                                   page("http://ok.org/", "2024-01-01T00:00:00Z", f"<p>{docs[40]}</p>".encode())])
    tok = str(tmp_path / "web.model")
    for extra, learned in (([], True), (["--blocklist", str(blocklist)], False)):
        subprocess.run([sys.executable, script, "--source", str(src), "--vocab_size", "560", "--out", tok, *extra],
                       capture_output=True, text=True, check=True)
        assert (len(Tokenizer.load(tok).encode(" zqxj")) == 1) == learned
    r = subprocess.run([sys.executable, script, "--source", str(tmp_path / "adult.txt"), "--blocklist",
                        str(blocklist), "--out", tok], capture_output=True, text=True)
    assert r.returncode == 1 and "has no .warc" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_train_source_with_a_blocklist(corpus, tmp_path):
    """train.py --source --blocklist: the tokenizer and shards it builds leave out the pages of listed domains, as
    tokenizer.py and data.py do; a --data folder made without that list is refused, and so is a list without a
    --source (nothing would use it) or for a source with no WARC files."""
    import subprocess
    _, docs, _ = corpus
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "crawl").mkdir()
    write_warc(tmp_path / "crawl" / "a.warc", [page("http://www.adult.example/", "2024-01-01T00:00:00Z",
                                                    b"<p>" + b"zqxj " * 500)] +
               [page(f"http://ok.org/{i}", "2024-01-01T00:00:00Z", f"<p>{d}</p>".encode()) for i, d in enumerate(docs)])
    (tmp_path / "list.txt").write_text("adult.example\n")
    tiny = ["--dim", "32", "--n_layers", "1", "--n_heads", "2", "--n_kv_heads", "1", "--seq_len", "16",
            "--max_steps", "1", "--eval_tokens", "64", "--sample_tokens", "0", "--vocab_size", "600"]

    def train(name, *extra):
        return subprocess.run([sys.executable, os.path.join(root, "train.py"), "--source", str(tmp_path / "crawl"),
                               "--data", str(tmp_path / name), "--tokenizer", str(tmp_path / name / "tok.model"),
                               "--out_dir", str(tmp_path / "out" / name), *tiny, *extra], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    for name, extra, learned in (("all", [], True), ("listed", ["--blocklist", "list.txt"], False)):
        r = train(name, *extra)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert (len(Tokenizer.load(str(tmp_path / name / "tok.model")).encode(" zqxj")) == 1) == learned
        meta = json.loads((tmp_path / name / "meta.json").read_text())
        assert ("URL: blocklisted" in meta["removed"]) == (not learned) and meta["train"]["docs"] > 100
    os.symlink("list.txt", tmp_path / "link.txt")  # the same list by another path: the folder is the same
    assert train("listed", "--blocklist", "link.txt").returncode == 0
    r = train("reused", "--blocklist", "list.txt", "--tokenizer", str(tmp_path / "all" / "tok.model"))
    assert r.returncode == 0 and "is used as it is: the list leaves pages out of the shards only" in r.stdout, r.stderr
    (tmp_path / "bad.txt").write_text("http://adult.example/\n")  # a line of UT1's `urls` files, not a domain
    for name, extra, code, what in (
            ("new", ["--blocklist", "bad.txt", "--tokenizer", str(tmp_path / "all" / "tok.model")], 1,
             "bad.txt:1: not a domain"),  # (read before anything is built, on every rank)
            ("all", ["--blocklist", "list.txt"], 1, "was not made with --blocklist list.txt as it is now"),
            ("new", ["--blocklist", "typo.txt"], 1, "blocklist typo.txt: no such file"),
            ("new", ["--blocklist", "list.txt", "--source", "list.txt"], 1, "has no .warc"),
            ("new", ["--blocklist", "list.txt", "--source", ""], 2, "--blocklist goes with --source")):
        r = train(name, *extra)
        assert r.returncode == code and what in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "new").exists()


def test_warc_bad_files(tmp_path):
    records = [page(f"http://x.org/{i}", "2024-01-01T00:00:00Z", b"<p>%d</p>" % i) for i in range(3)]
    cut = tmp_path / "cut.warc"
    write_warc(cut, records)
    cut.write_bytes(cut.read_bytes()[:len(records[0]) + len(records[1]) - 10])
    with pytest.raises(ValueError, match=r"cut\.warc: record 2: cut \(\d+ of \d+ bytes\)"):
        list(data.iter_documents(str(cut)))
    cut.write_bytes(records[0] + records[1][:30])
    with pytest.raises(ValueError, match=r"cut\.warc: record 2: cut inside its header"):
        list(data.iter_documents(str(cut)))
    cut.write_bytes(records[0] + records[1].replace(b"Content-Length", b"Content-Lenght"))
    with pytest.raises(ValueError, match=r"cut\.warc: record 2: no Content-Length"):
        list(data.iter_documents(str(cut)))
    for size in (b"99999999999", "\u00b2".encode()):  # (no 10 GB read is attempted; a superscript is no digit)
        cut.write_bytes(records[0] + re.sub(rb"Content-Length: \d+", b"Content-Length: " + size, records[1]))
        with pytest.raises(ValueError, match=r"cut\.warc: record 2: Content-Length '.*' is not a size up to"):
            list(data.iter_documents(str(cut)))
    cut.write_bytes(records[0].replace(b"Content-Length: ", b"Content-Length: 1") + records[1])  # too short: 1
    with pytest.raises(ValueError, match=r"cut\.warc: record \d: .*; or record 1's Content-Length is wrong|cut \("):
        list(data.iter_documents(str(cut)))
    foreign = tmp_path / "foreign.warc"
    foreign.write_bytes(records[0] + b"<html>a page saved as .warc</html>\r\n")
    with pytest.raises(ValueError, match=r"foreign\.warc: record 2: not a WARC record"):
        list(data.iter_documents(str(foreign)))
    damaged = tmp_path / "damaged.warc.gz"
    write_warc(damaged, records)
    damaged.write_bytes(damaged.read_bytes()[:-8])  # the last member's CRC and size cut off
    with pytest.raises(ValueError, match=r"damaged\.warc\.gz: unreadable after record \d"):
        list(data.iter_documents(str(damaged)))


def test_personal_data_rule():
    """Llama 3 drops pages with high volumes of PII: e-mail and public IP addresses dense in a document."""
    rng = np.random.default_rng(0)
    assert data.personal_data("mail bob@corp.com or ana@corp.com from 8.8.8.8, not 10.0.0.1") == 3
    assert data.personal_data("x = a @ b.T; y = a@b.T; print(f'{s}@{t}'); 1.2.3.400; 127.0.0.1; 192.0.2.1") == 0
    assert data.personal_data("s = q@k.transpose(-2, -1); h = x@w1.weight.T; oid 1.3.6.1.2.1.1.5.0") == 0
    assert data.personal_data("a.b@mail.example.co.uk, x@y.io") == 2
    assert data.personal_data("y = x@W.to(device); z = h@self.wo(x)") == 0   # (a method call, not a domain)
    assert data.personal_data("first.last@mail.example.org (work), a@b.co.") == 2
    contacts = " ".join(f"{prose(rng, 12)} Contact: person{i}@example.com." for i in range(10))  # 10 in ~150 words
    assert data.heuristic_reject(contacts) == "personal data"
    assert data.heuristic_reject(prose(rng, 200) + " Write to ana@corp.com or bob@corp.com.") is None
    servers = " ".join(f"{prose(rng, 12)} Host 93.184.{i}.34 is up." for i in range(10))
    assert data.heuristic_reject(servers) == "personal data"
    assert data.heuristic_reject(servers.replace("93.184.", "192.168.")) is None  # private addresses are no one's
    few = " ".join(f"{w} x{i}@y.org" for i, w in enumerate("one two three four".split()))  # dense, but only 4
    assert data.heuristic_reject(few + " " + prose(rng, 10)) is None
    six = " ".join(f"{prose(rng, 50)} Mail a{i}@corp.com." for i in range(6))  # 6 in 312 words: under 1 in 50
    assert data.personal_data(six) == 6 and data.heuristic_reject(six) is None
    assert data.heuristic_reject(six + " Or a6@corp.com.") == "personal data"  # 7 in 315 words: over
    assert data.personal_data("100.64.0.1 169.254.1.1 224.0.0.1 8.8.4.4") == 1  # shared, link-local, multicast


def test_dirty_words(corpus, tmp_path):
    """--dirty_words (Llama 3's dirty-word counting, C4's list format): listed words and phrases counted as words,
    case-insensitively; a document goes with MIN_DIRTY or more over MAX_DIRTY of its words; the table counts it; a
    new list is a new cache; a line that holds no word, or a list of nothing, is refused naming the file."""
    rng = np.random.default_rng(0)
    listed = tmp_path / "words.txt"
    listed.write_text("# a test list\nzorp\n\nblorf gak\nS&M\ncafe\u0301\n")   # (the last one decomposed, NFD)
    phrases = data.read_word_list(str(listed))
    assert phrases == {(b"zorp",), (b"blorf", b"gak"), (b"s", b"m"), ("caf\u00e9".encode(),)}   # NFC, as texts are
    assert data.listed_words("Zorp, ZORP! blorf  gak; blorf only; s&m, zorpy", phrases) == (4, 9)
    dense = " ".join(f"{prose(rng, 30)} Zorp." for _ in range(3))           # 3 in ~93 words: over 1 in 100
    assert data.heuristic_reject(dense, phrases) == "dirty words"
    assert data.heuristic_reject(dense) is None                              # (no list: no rule)
    assert data.heuristic_reject(dense + prose(rng, 300), phrases) is None   # 3 in ~393 words: under
    assert data.heuristic_reject("Zorp and zorp. " + prose(rng, 20), phrases) is None   # 2: under MIN_DIRTY
    root, docs, tok_path = corpus
    src = tmp_path / "src"
    src.mkdir()
    for i, text in enumerate(docs[:40] + [dense, dense.replace("Zorp", "Blorf gak")]):
        (src / f"{i:03d}.txt").write_text(text)
    meta = data.prepare_data(str(src), tok_path, str(tmp_path / "out"), val_fraction=0.1, num_proc=2,
                             dirty_words=str(listed), verbose=False)
    assert meta["removed"]["heuristic: dirty words"]["docs"] == 2
    assert meta["train"]["docs"] + meta["val"]["docs"] == 40
    listed.write_text("zorp\n")      # another list: the folder is made again, the phrase kept now
    meta = data.prepare_data(str(src), tok_path, str(tmp_path / "out"), val_fraction=0.1, num_proc=1,
                             dirty_words=str(listed), verbose=False)
    assert meta["removed"]["heuristic: dirty words"]["docs"] == 1
    for text, what in (("zorp\n$$$\n", "words.txt:2: no word in '$$$'"), ("# nothing\n\n", "no words listed")):
        listed.write_text(text)
        with pytest.raises(ValueError, match=re.escape(what)):
            data.prepare_data(str(src), tok_path, str(tmp_path / "out"), dirty_words=str(listed), verbose=False)


def test_prepare_data_from_web_pages(corpus, tmp_path):
    """Pages through the whole pipeline: their text, not their markup, is in the shards, the markup's bytes are
    in the table, and the shards are the same for any num_proc (pages travel to the workers as HTML)."""
    _, docs, tok_path = corpus
    src = tmp_path / "web"
    src.mkdir()
    texts = docs[30:54]  # (none that cleaning changes)
    for i in range(12):
        (src / f"p{i:02d}.html").write_text(f"<html><head><title>Page {i}</title></head><body><nav><a href=/>Home"
                                            f"</a></nav><p>{texts[i]}</p></body></html>")
    write_warc(src / "crawl.warc.gz", [page(f"http://x.org/{i}", "2024-01-01T00:00:00Z",
                                            f"<div class=menu>Menu</div><p>{texts[12 + i]}</p>".encode())
                                       for i in range(12)])
    metas = [data.prepare_data(str(src), tok_path, str(tmp_path / f"out{n}"), val_fraction=0.1, num_proc=n,
                               verbose=False) for n in (1, 2)]
    assert metas[0]["read"]["docs"] == 24 and metas[0]["train"]["docs"] + metas[0]["val"]["docs"] == 24
    markup = sum(len(p.read_bytes()) for p in src.glob("*.html")) - sum(len(t.encode()) for t in texts[:12])
    assert metas[0]["removed"]["HTML markup"]["docs"] == 0 and metas[0]["removed"]["HTML markup"]["bytes"] > markup
    assert metas[0]["train"]["bytes"] + metas[0]["val"]["bytes"] == sum(len(t.encode()) for t in texts)
    names = metas[0]["train"]["shards"] + metas[0]["val"]["shards"]
    shards = [[data.read_shard(str(tmp_path / f"out{n}" / name))[1] for name in names] for n in (1, 2)]
    assert len(shards[0]) == len(shards[1]) and all(np.array_equal(a, b) for a, b in zip(*shards))
    text = Tokenizer.load(tok_path).decode(np.concatenate(shards[0]).tolist())
    assert texts[1] in text and texts[13] in text and not {"Home", "Menu", "Page", "<p>"} & set(text.split())


# ----------------------------------------------------------------------------- web pages as browsers read them

CYR = "Привет, мир — тест".encode("cp1251")


@pytest.mark.parametrize("html", [
    "<div>hello <span hidden><pre>x</span> world</div>",  # (in a <p>, the <pre> ends the p and the span: shown)
    "<p>hello <button><pre>x</button> world</p>",
    "<b>hello <span class=share><pre>x</b> world",
])
def test_unclosed_pre_inside_a_skipped_element_does_not_split_its_paragraph(html):
    """A <pre> opened in a dropped element held no text: its end flushed the paragraph around it in two."""
    assert data.html_to_text(html) == "hello world"


@pytest.mark.parametrize("raw", [
    b'<!--><meta charset="windows-1251"><body><p>' + CYR,               # '<!-->' is a whole (empty) comment
    b"<head><script>var s = '<!--';</script><meta charset=\"windows-1251\"></head><body><p>" + CYR,  # script text
])
def test_unclosed_comment_rule_does_not_swallow_the_meta(raw):
    """An unclosed comment runs to the end, but '<!-->' is a whole one and a '<!--' in a script is script."""
    assert data.decode_html(raw).endswith("Привет, мир — тест")


def test_unclosed_link_ends_with_its_parent():
    """An unclosed <a href> counted the rest of the page as link text, and the link-share filter dropped it all."""
    assert data.html_to_text("<div><a href=/x>Read more</div><p>A long paragraph that matters.</p>") == \
        "A long paragraph that matters."


def test_unclosed_pre_ended_by_its_cell_keeps_its_whitespace():
    # </td> ends the unclosed <pre> (end_element sets pre False) without flushing its block first:
    # the code is flushed later with pre False, collapsed, and run into the next cell ('a b next').
    out = data.html_to_text("<table><tr><td><pre>a\n    b</td><td>next</td></tr></table>")
    assert "a\n    b" in out, out


def test_body_inside_a_head_comment_does_not_hide_the_meta():
    # BODY is searched before COMMENT is removed: '<body' in a comment cuts the head before the <meta>.
    raw = b'<html><head><!-- <body> --><meta charset="windows-1251"></head><body><p>' + CYR
    assert data.decode_html(raw).endswith("Привет, мир — тест")


def test_meta_after_body_is_read_as_browsers_read_it():
    # Browsers' prescan (first 1024 bytes) and the tree builder's "in body" meta both honour it; the old code did.
    raw = b'<html><body><meta charset="windows-1251"><p>' + CYR
    assert data.decode_html(raw).endswith("Привет, мир — тест")


def test_latin1_and_ascii_labels_are_windows_1252(tmp_path):
    """WHATWG Encoding: 'iso-8859-1', 'latin1', 'us-ascii', 'ascii' are labels of windows-1252. Python's latin-1
    turns 0x80-0x9F into C1 controls, which clean_text then deletes: smart quotes, dashes, the euro vanish."""
    body = b"<p>\x93Don\x92t\x94 \x96 2010\x962015, 5\x80</p>"
    want = "\u201cDon\u2019t\u201d \u2013 2010\u20132015, 5\u20ac"
    assert data.html_to_text(data.decode_html(b'<meta charset="iso-8859-1">' + body)) == want
    assert data.html_to_text(data.decode_html(body, "us-ascii")) == want
    # through a WARC record whose HTTP header says ISO-8859-1 (the commonest mislabel on the web)
    write_warc(tmp_path / "a.warc", [page("http://x.org/", "2024-01-01T00:00:00Z", body, "200 OK",
                                          "text/html; charset=ISO-8859-1")])
    assert [data.clean_text(d) for d in data.iter_documents(str(tmp_path / "a.warc"))] == [want]


def test_legacy_labels_python_lacks_or_maps_to_a_subset():
    """WHATWG maps windows-874/tis-620 -> windows-874, gb2312 -> GBK (gb18030 decoder), euc-kr -> windows-949,
    shift_jis -> Shift_JIS as Windows-31J, x-sjis, x-mac-roman...; Python knows some labels not at all (decoded
    as UTF-8: a Thai page becomes all U+FFFD) and others as the strict subset (GBK / UHC / NEC characters lost)."""
    assert data.decode_html(b"\xa1\xa2", "windows-874") == "\u0e01\u0e02"              # Thai ko kai, kho khai
    assert data.decode_html(b"\x81\x40", "gb2312") == "\u4e02"                         # a GBK character
    assert data.decode_html(b"\x81\x41", "euc-kr") == "\uac02"                         # a UHC (cp949) syllable
    assert data.decode_html(b"\x87\x40", "shift_jis") == "\u2460"                      # NEC circled 1
    assert data.decode_html(b'<meta charset="x-sjis">\x82\xa0').endswith("\u3042")      # hiragana a


def test_meta_utf16_means_utf8():
    """HTML §13.2.3.2 prescan: a <meta> that declares UTF-16 is read as UTF-8 (an ASCII-readable meta cannot be in
    UTF-16); here the whole page turns into CJK-looking garbage."""
    raw = b'<meta http-equiv="Content-Type" content="text/html; charset=utf-16"><p>caf\xc3\xa9</p>'
    assert data.html_to_text(data.decode_html(raw)) == "caf\u00e9"


def test_unknown_http_charset_falls_back_to_meta():
    """WHATWG encoding sniffing: a transport-layer label that names no encoding is ignored and the <meta> prescan
    decides; the code reads the page as UTF-8 and ignores the page's own declaration."""
    raw = b'<meta charset="windows-1251"><p>\xcf\xf0\xe8\xe2\xe5\xf2</p>'
    for label in ("none", "utf8mb4", "x-unknown", "undefined", "base64"):   # (the last two: Python codecs, no page's)
        assert data.html_to_text(data.decode_html(raw, label)) == "\u041f\u0440\u0438\u0432\u0435\u0442", label


def test_block_elements_missing_from_BLOCK_run_words_together():
    """CSS UA stylesheet (HTML §15.3): center, form, fieldset, legend, dialog, ... are display: block; the extractor
    treats them as inline, so neighbouring blocks' words are glued ('onetwo')."""
    assert data.html_to_text("<center>one</center><center>two</center>") == "one\ntwo"
    assert data.html_to_text("<p>Intro</p>text<form>Name</form>end") in ("Intro\n\ntext\nName\nend",
                                                                       "Intro\n\ntext\n\nName\n\nend")
    assert "Lx" not in data.html_to_text("<fieldset><legend>Legend</legend>x</fieldset>")


def test_pre_ends_with_its_parent():
    """HTML tree construction: '</div>' pops every element up to the div, <pre> included. The extractor stays in
    <pre> mode for the rest of the page: whitespace kept raw, and the link-share filter off (menus kept)."""
    html = ("<div><pre>x = 1</div><p>normal   text\n   wrapped</p>"
            "<div><a href=/a>Home</a> <a href=/b>Blog</a> <a href=/c>About</a></div>")
    assert data.html_to_text(html) == "x = 1\n\nnormal text wrapped"


def test_blocklist_idna2008_deviation_characters():
    """host_form uses Python's 'idna' codec, IDNA 2003 (nameprep maps ß -> ss, ς -> σ); URLs in crawls carry
    UTS #46 non-transitional / IDNA 2008 punycode (what browsers and crawlers emit): 'straße.example' is
    'xn--strae-oqa.example', so a list and a URL spelling the same domain in the two forms do not meet."""
    assert data.host_form("stra\u00dfe.example") == "xn--strae-oqa.example"
    domains = {data.host_form("stra\u00dfe.example")}
    assert data.blocked("http://xn--strae-oqa.example/", domains)
    assert data.blocked("http://www.stra\u00dfe.example/", {data.host_form("xn--strae-oqa.example")})


def test_meta_charset_prescan_skips_comments_and_late_meta_still_counts():
    """HTML §13.2.3.2 prescan skips comments ('<!--' to '-->'); the tree builder's 'change the encoding' (§13.2.3.4)
    honours a <meta charset> in <head> found after the prescan's window. The regex takes a commented-out meta, and
    misses a real one after 4,096 bytes of inline script."""
    cyr = b"<p>\xcf\xf0\xe8\xe2\xe5\xf2</p>"
    old = b'<!-- <meta charset="utf-8"> (old template) --><meta charset="windows-1251">'
    assert data.html_to_text(data.decode_html(old + cyr)) == "\u041f\u0440\u0438\u0432\u0435\u0442"
    late = b"<head><script>var x = '" + b"x" * 5000 + b"';</script><meta charset=windows-1251></head>"
    assert data.html_to_text(data.decode_html(late + cyr)) == "\u041f\u0440\u0438\u0432\u0435\u0442"


def test_labels_browsers_lack_are_no_label():
    """WHATWG Encoding: its label table is every encoding a browser knows; any other label is read as none (the
    <meta>, else UTF-8). codec_of took any Python codec that reads ASCII as itself: utf-7, unicode_escape, utf-32,
    latin_1, cp850 decoded pages as no browser does."""
    cyr = b'<meta charset="windows-1251"><p>' + CYR
    for label in ("utf-7", "unicode_escape", "raw_unicode_escape", "utf-32", "latin_1", "utf_8", "cp850", "rot13",
                  "hex", "base64", "zlib", "x-unknown"):
        assert data.codec_of(label) is None, label
        assert data.decode_html(cyr, label).endswith("Привет, мир — тест"), label  # HTTP's
        assert data.decode_html(f"<meta charset={label}><p>caf\u00e9".encode()).endswith("caf\u00e9"), label
    for label, codec in data.WHATWG_LABELS.items():  # every other codec reads markup as ASCII
        assert codec == "replacement" or codec.startswith("utf-16") or b"<p>a</p>".decode(codec) == "<p>a</p>", label
    assert data.decode_html("<p>\u00e9".encode("utf-16-le"), "UTF-16") == "<p>\u00e9"  # (UTF-16LE to a browser)


def test_replacement_labels_leave_no_text():
    """WHATWG maps iso-2022-kr, hz-gb-2312, iso-2022-cn(-ext) to the "replacement" encoding: a browser shows one
    U+FFFD, not the page (7-bit encodings whose shifts can hide markup). iso-2022-kr and hz were decoded by Python's
    codecs, iso-2022-cn as UTF-8: the shifted bytes' ASCII soup became text."""
    raw = "<p>\uc548\ub155</p>".encode("iso2022_kr")
    for label in ("iso-2022-kr", "csiso2022kr", "hz-gb-2312", "iso-2022-cn", "iso-2022-cn-ext", "replacement"):
        assert data.decode_html(raw, label) == "", label
        assert data.decode_html(f"<meta charset={label}>".encode() + raw) == "", label
    assert data.decode_html(b"\xef\xbb\xbf<p>x", "iso-2022-kr") == "<p>x"  # a byte-order mark outranks the label


def test_host_form_drops_what_idna_ignores():
    """UTS #46 maps its "ignored" code points (soft hyphen, zero-width space, word joiner, BOM, variation selectors)
    to nothing; host_form kept them, so 'ex\\u00adample.com' in a link did not meet 'example.com' on a blocklist.
    Stringprep's B.1 ("mapped to nothing" in IDNA 2003) is a part of that set, but for U+1806 (valid in IDNA 2008)
    and the joiners U+200C/U+200D, which UTS #46 non-transitional keeps ("deviation" characters)."""
    for c in "\u00ad\u034f\u180b\u200b\u2060\u2064\ufe0f\ufeff\U000e0100":
        assert data.host_form(f"ex{c}ample.com") == "example.com", hex(ord(c))
    assert data.blocked("http://b\u00fc\u00adcher.de/", {data.host_form("xn--bcher-kva.de")})
    b1 = {chr(c) for c in range(0x10000) if stringprep.in_table_b1(chr(c))}
    assert {c for c in b1 if data.host_form(f"a{c}b") == "ab"} == b1 - {"\u1806", "\u200c", "\u200d"}
    assert data.host_form("a\u200db.com") == "xn--ab-m1t.com"


def test_blocklist_lines_no_host_can_match_are_refused(tmp_path):
    """read_blocklist: "a line that is not one domain -> ValueError naming file:line". An adblock-style line
    ('||ads.example^') or one with '%', '?', '#' or '|' holds characters no URL's host has (WHATWG's forbidden
    domain code points): it was read as a domain, and blocked nothing."""
    blocklist = tmp_path / "list.txt"
    for line in ("||ads.example^", "ads.example^", "ads%2eexample", "ads.example?x", "a\\b.example", "[ads.example]"):
        blocklist.write_text(f"ok.example\n{line}\n")
        with pytest.raises(ValueError, match=r"list\.txt:2: not a domain"):
            data.read_blocklist(str(blocklist))
    blocklist.write_text("ok.example\nb\u00fccher.example\n1.2.3.4\nmy_host.example\n")  # (these stay domains)
    assert data.read_blocklist(str(blocklist)) == {"ok.example", "xn--bcher-kva.example", "1.2.3.4", "my_host.example"}


def test_a_blocklist_of_no_domains_is_refused(tmp_path):
    """An empty blocklist (a download that failed, the wrong file of a UT1 category) blocked nothing, silently; a
    --dirty_words list of no words is refused by name, and so is this now."""
    blocklist = tmp_path / "list.txt"
    for text in ("", "# UT1 adult domains\n\n", "\ufeff\n"):
        blocklist.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=r"list\.txt: no domains listed"):
            data.read_blocklist(str(blocklist))


def test_skipped_element_ends_at_its_parents_end_tag():
    """HTML tree construction ('any other end tag' / '</div>'): an end tag pops the elements open inside it, so an
    unclosed <span class=share-count> ends at its parent's </div>. The extractor keeps skipping to the end of the
    page: one unclosed counter in a toolbar loses the whole article."""
    html = "<div class=post><span class=share-count>3</div><article><p>Main text of the article.</p></article>"
    assert data.html_to_text(html) == "Main text of the article."


def test_a_dropped_block_still_parts_the_text_around_it():
    """A block's text stands on its own lines, also when the block between is dropped: an ad or share box in a post's
    bare text ran the words on both sides together ('partSecond')."""
    for html in ("<div>First part<div class=share>Tweet</div>Second part</div>",
                 "<div>First part<section class=ads>Buy</section>Second part</div>",
                 "<td>First part<p class=cookie>OK</p>Second part</td>",
                 "<div>First part<nav>Home</nav>Second part</div>", "First part<aside>Ad</aside>Second part",
                 "<p>First part<header>Site</header>Second part", "<li>First part<footer>(c)</footer>Second part"):
        assert data.html_to_text(html).split() == ["First", "part", "Second", "part"], html


def test_a_dropped_span_left_open_ends_with_its_paragraph():
    """HTML's implied ends ('<p>' closes an open <p>, '<li>' an <li>, '<td>' a cell) close the <span>s left open in
    them too. The extractor ended an item only when it was the innermost element: an unclosed <span class=share-count>
    kept the next paragraphs, items and cells skipped, up to the end of the element around them."""
    for html, shown in (("<p>Intro.<span class=share-count>3<p>Next paragraph.<p>And another.",
                         "Intro.\n\nNext paragraph.\n\nAnd another."),
                        ("<ul><li>one<span hidden>x<li>two<li>three</ul>", "one\ntwo\nthree"),
                        ("<table><tr><td>a<span class=share>3<td>b<tr><td>c</table>", "a b\nc"),
                        ("<p>a<span hidden>x<p>b<span class=ads>y</span>c", "a\n\nbc")):
        assert data.html_to_text(html) == shown, html


def test_crlf_page_gives_the_text_of_its_lf_twin():
    """HTML's input stream reads CR LF and a lone CR as LF (HTML §13.2.3.5). The extractor kept them: a <pre> of a
    page saved with CRLF lines began with a blank line its LF twin lacks (so the two were no exact duplicates)."""
    lines = ["<p>Intro text.</p>", "<pre>", "def f(x):", "    return x", "</pre>", "<p>After.</p>"]
    want = "Intro text.\n\ndef f(x):\n    return x\n\nAfter."
    for nl in ("\n", "\r\n", "\r"):
        assert data.clean_text(data.HTML(nl.join(lines))) == want, repr(nl)


# ----------------------------------------------------------------------------- dedup and filters

def test_minhash_dedup_planted():
    rng = np.random.default_rng(0)
    originals = [prose(rng, 400) for _ in range(30)]
    near = []
    for text in originals[:10]:  # change 1 word in 100: Jaccard of 5-gram shingles about 0.9
        words = text.split(" ")
        for j in rng.choice(len(words), len(words) // 100, replace=False):
            words[j] = "zebra"
        near.append(" ".join(words))
    dedup = data.MinHashDedup()
    assert not any(dedup.is_duplicate(dedup.signature(t)) for t in originals)  # distinct documents all kept
    assert all(dedup.is_duplicate(dedup.signature(t)) for t in near)            # planted near-duplicates all caught
    # the signature estimates Jaccard: about 0.9 for the near pairs, about 0 for distinct documents
    sims = [np.mean(dedup.signature(a) == dedup.signature(b)) for a, b in zip(originals, near)]
    assert min(sims) > 0.8
    assert np.mean(dedup.signature(originals[0]) == dedup.signature(originals[1])) < 0.1


def test_minhash_shingles_are_ordered_word_5grams():
    """Shingles are word 5-grams, in order, of lower-cased words: with every 5th word changed two documents share no
    5-gram (no signature entry agrees), with every 6th they share 1 in 11 (some agree); 4- or 6-gram shingles, or
    word order lost in the n-gram hash, fail here. A text of fewer than 5 words is hashed whole, not left blank."""
    dedup, rng = data.MinHashDedup(), np.random.default_rng(0)
    a = list(rng.choice(WORDS, 300))
    sig = dedup.signature(" ".join(a))
    for k, agree in ((5, False), (6, True)):
        b = [f"q{i}" if i % k == k - 1 else w for i, w in enumerate(a)]   # unique words: no gram across them
        assert (np.mean(dedup.signature(" ".join(b)) == sig) > 0) == agree, k
    assert (dedup.signature("one two three four five") != dedup.signature("five four three two one")).all()
    assert (dedup.signature("One two, three four five!") == dedup.signature("one two three four five")).all()
    assert (dedup.signature("short text") != dedup.signature("other words")).all()


def test_minhash_last_band_makes_a_candidate():
    """A near copy that shares only band 19 (entries 114-119) with a kept document is compared with it (bands that
    overlapped, or a band left out, missed it: every other band holds a changed entry)."""
    dedup = data.MinHashDedup()
    kept = np.random.default_rng(1).integers(0, 2**32, 120, dtype=np.uint64).astype(np.uint32)
    copy = kept.copy()
    copy[0:114:6] += 1   # one entry in each of bands 0-18: 101/120 = 0.84 agree
    assert not dedup.is_duplicate(kept) and dedup.is_duplicate(copy)


def test_minhash_compares_every_document_that_shares_a_band():
    """A band shared by chance with an earlier, dissimilar document must not hide the near duplicate that shares it
    too (each band bucket kept only its first document: the copy below was then compared with that one alone)."""
    dedup, rng = data.MinHashDedup(), np.random.default_rng(0)
    first = rng.integers(0, 2**32, 120, dtype=np.uint64).astype(np.uint32)
    kept = rng.integers(0, 2**32, 120, dtype=np.uint64).astype(np.uint32)
    kept[:6] = first[:6]  # band 0 the same as `first`'s, the rest unrelated: not a duplicate, kept
    copy = kept.copy()
    copy[6::6] += 1  # one entry changed in each of bands 1-19: 101/120 = 0.84 agree, only band 0 still matches
    assert not dedup.is_duplicate(first) and not dedup.is_duplicate(kept)
    assert dedup.is_duplicate(copy)


def test_a_rejected_document_does_not_take_its_clean_near_copy(corpus, tmp_path):
    """The heuristics run before near-dedup: a document with spam lines appended is dropped for them, and the
    clean document it nearly copies stays (it used to be dropped as that document's near duplicate)."""
    root, docs, tok_path = corpus
    clean = max(docs, key=len)
    spam = clean + "\n" + "\n".join(["Click here to buy cheap watches now!"] * 60)  # most of it repeated lines,
    assert data.heuristic_reject(spam) == "repeated lines" and data.heuristic_reject(clean) is None  # few new
    dedup = data.MinHashDedup()                                                                      # 5-grams
    assert np.mean(dedup.signature(spam) == dedup.signature(clean)) >= dedup.threshold  # near duplicates
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in [spam, clean]))
    meta = data.prepare_data(str(tmp_path / "docs.jsonl"), tok_path, str(tmp_path / "out"), val_fraction=0,
                             num_proc=1, verbose=False)
    assert meta["train"]["docs"] == 1 and "near duplicate" not in meta["removed"]


def test_removals_are_listed_in_pipeline_order(corpus, tmp_path):
    root, docs, tok_path = corpus
    clean = max(docs, key=len)  # "short" goes at the heuristics, then the near copy (one word changed) after them
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in
                                                 ["short", clean, clean.replace(" ", "  ", 1) + " x"] + docs[:3]))
    meta = data.prepare_data(str(tmp_path / "docs.jsonl"), tok_path, str(tmp_path / "out"), val_fraction=0,
                             num_proc=1, verbose=False)
    assert list(meta["removed"]) == ["heuristic: too short", "near duplicate"]
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": clean}))  # one document, in train: no val, and says so
    assert not data.is_val(data.doc_hash(data.clean_text(clean)), 50)
    with pytest.raises(ValueError, match=r"no document fell into the val split \(each of the 1 kept had a chance of "
                                         r"1 in 50"):
        data.prepare_data(str(tmp_path / "one.jsonl"), tok_path, str(tmp_path / "one"), verbose=False)
    assert not (tmp_path / "one").exists()  # (the folder it made, and the train shard it wrote, went with it)
    assert data.is_val(data.doc_hash(data.clean_text(clean)), 2)  # at val_fraction 0.5 it is val, and train has none
    (tmp_path / "one").mkdir()   # (a folder that was there stays)
    with pytest.raises(ValueError, match="no document survived filtering into the train split .* 1 went to val"):
        data.prepare_data(str(tmp_path / "one.jsonl"), tok_path, str(tmp_path / "one"), val_fraction=0.5,
                          verbose=False)
    assert os.listdir(tmp_path / "one") == []
    with pytest.raises(FileNotFoundError, match="nothing.model: no tokenizer there"):
        data.prepare_data(str(tmp_path / "one.jsonl"), str(tmp_path / "nothing.model"), str(tmp_path / "two"))


def test_val_split_is_the_same_whatever_the_other_documents(corpus, tmp_path):
    """A document's split depends on its text alone: with a third of the others gone and the rest in reverse order,
    the val documents left are the same (a position-based split would have shifted them all)."""
    root, docs, tok_path = corpus
    tok = Tokenizer.load(tok_path)
    for name, texts in (("all", docs), ("fewer", [d for i, d in enumerate(docs) if i % 3][::-1])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in texts))
        data.prepare_data(str(tmp_path / f"{name}.jsonl"), tok_path, str(tmp_path / name), val_fraction=0.1,
                          num_proc=1, verbose=False)
    val, fewer = (set(read_docs(str(tmp_path / name), "val", tok)) for name in ("all", "fewer"))
    kept = {data.clean_text(d) for i, d in enumerate(docs) if i % 3}
    assert fewer == val & kept and len(fewer) >= 3


def test_shard_writer_cuts_the_same_however_documents_arrive(tmp_path):
    """Shards are the same for any --num_proc: a chunk boundary at exactly shard_tokens changes no cut."""
    def shard_sizes(out, *chunks):
        os.makedirs(out)
        w = data.ShardWriter(str(out), "train", 10, 100, BOS, "abc")
        for c in chunks:
            w.add(np.array(c, dtype=np.uint32), c.count(BOS), 0)
        return [data.read_shard(os.path.join(out, n))[0]["n_tokens"] for n in w.close()["shards"]]
    a, b, c = [BOS] + [5] * 4, [BOS] + [6] * 4, [BOS, 7, 7]
    assert shard_sizes(tmp_path / "1", a + b + c) == shard_sizes(tmp_path / "2", a + b, c) == [10, 3]
    huge = [BOS] + [8] * 14  # one document over the budget: a shard of its own, the documents after it cut as usual
    assert shard_sizes(tmp_path / "3", huge + a + b + c) == shard_sizes(tmp_path / "4", huge, a + b + c) == [15, 10, 3]


def test_heuristic_filters():
    rng = np.random.default_rng(0)
    assert data.heuristic_reject(prose(rng, 100)) is None
    code = "def f(x):\n    '''Add one.'''\n    return x + 1\n\n\nclass A:\n    pass\n" * 3
    assert data.heuristic_reject(code) is None  # short repeated lines like "pass" are fine
    assert data.heuristic_reject("too short") == "too short"
    assert data.heuristic_reject("0123 4567 8901 2345 " * 20) == "few letters"
    assert data.heuristic_reject("<<>>{{}}##!! abcdef " * 20) == "many symbols"
    spam = prose(rng, 30) + "\n" + "Click here to buy cheap watches now!\n" * 20
    assert data.heuristic_reject(spam) == "repeated lines"
    # each rule at its edge (a threshold moved by one, or measured against the wrong count, fails here)
    edge = ("abcdefg " * 20)[:64]   # MIN_CHARS
    assert data.heuristic_reject(edge) is None and data.heuristic_reject(edge[:-1]) == "too short"
    assert data.heuristic_reject("ab 1234567890 " * 20) == "few letters"   # 14% letters: by characters, not words
    assert data.heuristic_reject("abcd 123456 " * 20) is None              # 33%
    line = "word " * 24
    assert data.heuristic_reject(f"{line}\n{line}\n{prose(rng, 8)}") == "repeated lines"   # twice is repeated
    assert data.heuristic_reject(f"{line}\n{line.upper()}\n{prose(rng, 8)}") is None
    five = " ".join(f"{prose(rng, 11)} Mail a{i}@corp.com." for i in range(5))   # 5 in ~65 words: the least counted
    assert data.personal_data(five) == 5 and data.heuristic_reject(five) == "personal data"


def test_heuristic_rules_at_their_exact_thresholds():
    """Each ratio exactly at its threshold is kept and one character (or word) past it goes: a comparison made
    inclusive, a threshold moved a little, or a ratio taken over another count (words, non-space characters) fails."""
    reject = data.heuristic_reject
    mb = "abcdefg " * 125_000   # 1,000,000 characters: MAX_CHARS
    assert reject(mb) is None and reject(mb + "x") == "too long"
    quarter = "abc 1234567 " * 10   # 30 letters of 120 characters: MIN_ALPHA exactly
    assert reject(quarter) is None and reject(quarter[1:]) == "few letters"   # 29 of 119
    symbolic = "{{}} abcde" * 10     # 40 symbols of 100 characters (44% of those not spaces): MAX_SYMBOL exactly
    assert reject(symbolic) is None and reject(symbolic + "{") == "many symbols"
    twice = "abcdefghij klmnopqrs"   # 20 characters twice in 80: MAX_DUP_LINE_CHARS exactly
    rest = "Only this last line is new, so it says"
    assert len(rest) == 38 and reject(f"{twice}\n{twice}\n{rest}") is None
    assert reject(f"{twice}\n{twice}\n{rest[:-1]}") == "repeated lines"
    new = "\nThe rest of the text says something new."   # lines of 10 characters may repeat (`}`, `pass`), 11 not
    assert reject("\n".join(["abcdefghij"] * 8) + new) is None
    assert reject("\n".join(["abcdefghij."] * 8) + new) == "repeated lines"
    mails = [f"a{i}@corp.com" for i in range(6)]   # 6 addresses in 300 words (as split by spaces): MAX_PII exactly
    assert reject(" ".join(["river"] * 294 + mails)) is None
    assert reject(" ".join(["river"] * 293 + mails)) == "personal data"
    phrases = {(b"zorp",)}   # 3 listed words in 300 words (words(): "well-known" is two): MAX_DIRTY exactly
    assert reject(" ".join(["well-known"] * 148 + ["river"] + ["zorp"] * 3), phrases) is None
    assert reject(" ".join(["well-known"] * 148 + ["zorp"] * 3), phrases) == "dirty words"


def test_ascii_fast_paths_count_as_the_regexes_do():
    """words, letters and symbols take bytes.translate for ASCII text: the same results as the regexes."""
    rng = np.random.default_rng(0)
    ascii_chars = [chr(c) for c in range(128)]
    texts = ["".join(rng.choice(ascii_chars, 300)) for _ in range(20)] + [prose(rng, 50), "def f(x_1):\n\treturn x_1"]
    for text in texts + [t + " é ß ١٢ 中文" for t in texts[-3:]]:
        assert data.words(text) == [w.encode("utf-8") for w in data.WORD.findall(text.lower())]
        assert data.letters(text) == len(text) - len(data.LETTERS.sub("", text))
        assert data.symbols(text) == len(text) - len(data.SYMBOLS.sub("", text))


def test_words_and_letters_of_scripts_with_combining_marks():
    """Vowel signs (Devanagari, Tamil) and vowel marks (Arabic) are combining marks: part of their word and letters,
    not symbols. With `re`'s \\w, which leaves marks out, हिन्दी was three words and a third of the characters
    symbols: vowelled Arabic went as "many symbols" and MinHash saw letters, not words."""
    texts = {
        "hindi": "भारत दक्षिण एशिया का एक विशाल देश है। यहाँ अनेक भाषाएँ बोली जाती हैं और हर राज्य की अपनी संस्कृति, "
                 "भोजन और त्योहार हैं। हिन्दी और अंग्रेज़ी केंद्र सरकार के कामकाज की भाषाएँ हैं।",
        "tamil": "தமிழ் மொழி உலகின் மிகப் பழமையான மொழிகளில் ஒன்றாகும். இது இந்தியா, இலங்கை, சிங்கப்பூர் ஆகிய "
                 "நாடுகளில் பேசப்படுகிறது.",
        "arabic": "اللُّغَةُ العَرَبِيَّةُ هِيَ أَكْثَرُ اللُّغَاتِ السَّامِيَّةِ تَحَدُّثًا، وَإِحْدَى أَكْثَرِ اللُّغَاتِ "
                  "انْتِشَارًا فِي العَالَمِ، يَتَحَدَّثُهَا مَلايِينُ النَّاسِ.",
    }
    for name, text in texts.items():
        assert data.heuristic_reject(text) is None, name
        assert len(data.word_hashes(text)) == len(text.split()), name   # one word between spaces, as written
        assert data.letters(text) > 0.75 * len(text), name                # (`re`: 0.47-0.51)
    assert data.letters("हिन्दी") == 6 and len(data.word_hashes("हिन्दी")) == 1


def test_token_kl_is_each_documents_divergence():
    """token_kl, for a whole shard at once, against the definition computed document by document."""
    rng = np.random.default_rng(0)
    bos, vocab = 9, 10
    docs = [rng.integers(0, 9, int(rng.integers(1, 40))) for _ in range(20)]
    shard = np.concatenate([np.r_[bos, d] for d in docs]).astype(np.uint32)
    q = rng.random(vocab) + 0.1
    log_q = np.log2(q / q.sum())
    kl, n = data.token_kl(shard, bos, log_q)
    for d, got, length in zip(docs, kl, n):
        counts = np.bincount(d, minlength=vocab)
        p = counts[counts > 0] / len(d)
        assert length == len(d) and abs(got - (p * (np.log2(p) - log_q[counts > 0])).sum()) < 1e-12


def test_token_kl_filter_removes_outliers_only(corpus, tmp_path):
    """token_kl=5: documents whose tokens are far from the corpus's for their length go (here: Chinese, and
    spam made of words the tokenizer never saw, among English-like prose); the shards, cut small so that documents
    move across them, are then those of the prose alone, to the byte, and the table counts the two."""
    rng = np.random.default_rng(1)
    _, docs, tok_path = corpus
    outliers = ["长江和黄河是中国的两条重要河流，流经许多省份。" * 8,
                " ".join(rng.choice(["viagra", "casino", "jackpot", "bonus", "crypto"], 120))]
    src, plain = tmp_path / "src", tmp_path / "plain"
    src.mkdir(), plain.mkdir()
    for i, text in enumerate(docs[:60] + outliers + docs[60:]):
        (src / f"{i:03d}.txt").write_text(text)
    for i, text in enumerate(docs):
        (plain / f"{i:03d}.txt").write_text(text)
    kw = dict(val_fraction=0.1, shard_tokens=2000, verbose=False)
    meta = data.prepare_data(str(src), tok_path, str(tmp_path / "a"), token_kl=5, **kw)
    ref = data.prepare_data(str(plain), tok_path, str(tmp_path / "b"), **kw)
    assert meta["removed"]["token outliers"] == {"docs": 2, "bytes": sum(len(t.encode()) for t in outliers)}
    assert len(ref["train"]["shards"]) > 3
    for split in ("train", "val"):
        assert {k: meta[split][k] for k in ("docs", "tokens", "bytes", "shards", "crc32")} == \
            {k: ref[split][k] for k in ("docs", "tokens", "bytes", "shards", "crc32")}
    assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(tmp_path / "b"))   # no old shard left behind
    for bad in (-1, float("inf"), "5", True):
        with pytest.raises(ValueError, match="token_kl"):
            data.prepare_data(str(plain), tok_path, str(tmp_path / "c"), token_kl=bad, verbose=False)
    # refused: too few documents to measure a spread by, and a filter that takes the whole val split (the message
    # names the filter, not the hash split); neither leaves shards behind
    few = tmp_path / "few"
    few.mkdir()
    for i, text in enumerate(docs[:10]):
        (few / f"{i:03d}.txt").write_text(text)
    with pytest.raises(ValueError, match="10 are too few for that"):
        data.prepare_data(str(few), tok_path, str(tmp_path / "c"), token_kl=5, verbose=False)
    val_page = next(p for p in (outliers[0] + f" {i}" for i in range(1000))
                    if data.is_val(data.doc_hash(data.clean_text(p)), 10))
    in_train = [d for d in docs if not data.is_val(data.doc_hash(data.clean_text(d)), 10)]
    for i, text in enumerate(in_train + [val_page]):
        (few / f"{i:03d}.txt").write_text(text)
    with pytest.raises(ValueError, match="token_kl=5 took every one of the 1 val documents"):
        data.prepare_data(str(few), tok_path, str(tmp_path / "c"), token_kl=5, val_fraction=0.1, verbose=False)
    assert not (tmp_path / "c").exists()   # (the folder the refused build made went too)


def test_lines_of_repeated_content(corpus, tmp_path):
    """Llama 3's line-level duplicated n-gram coverage: a long line that mostly repeats its own 5-grams (log output
    run together) goes, counted in bytes; real prose that repeats itself (the Rust book's most repetitive long
    line) and a short spam line stay; the line's document goes on without it."""
    log = " ".join(f"ERROR: mirror {i % 3} did not answer in time, retrying the download." for i in range(8))
    prose_line = ("In this example, string1 is valid until the end of the outer scope, string2 is valid until the "
                  "end of the inner scope, and result references something that is valid until the end of the "
                  "inner scope. Run this code, and you will see that the borrow checker approves; it will compile "
                  "and print the longest string.")
    short = " ".join(["retrying the download now"] * 9)  # 36 words: under LONG_LINE_WORDS, whatever it repeats
    assert len(log.split()) >= data.LONG_LINE_WORDS <= len(prose_line.split()) and len(short.split()) < 50
    text = f"A first line.\n{log}\n\n\n{prose_line}\n{short}"
    out, cut = data.repeated_content(text)
    assert out == f"A first line.\n\n\n{prose_line}\n{short}" and cut == len(log) + 1
    assert data.repeated_content(prose_line) == (prose_line, 0)
    assert data.repeated_content(" ".join("a" * 50)) == ("", 99)  # the shortest line of 50 words
    table = "HEX = [" + ", ".join("1" if chr(c) in "0123456789abcdef" else "0" for c in range(128)) + "]"
    code = f"def is_hex(c):\n    return HEX[ord(c)]\n{table}\nMETHODS = [" + ", ".join(["'GET'"] * 60) + "]"
    assert data.repeated_content(code) == (code, 0)  # tables in code repeat themselves: not cut out of a program
    said = "the worker could not open its configuration file at the default path because the disk is full"
    twice = f"{said}; so we waited for an operator who cleared space; meanwhile requests queued and the dashboard " \
            f"showed stale numbers; {said}."  # 52 words, two thirds in one sentence said twice
    assert data.repeated_content(twice) == ("", len(twice))
    assert data.repeated_content(" ".join(["ab"] * 49)) == (" ".join(["ab"] * 49), 0)  # 49 words: not long
    _, docs, tok_path = corpus
    (tmp_path / "src.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in [docs[0] + "\n" + log] +
                                                 docs[1:20]))
    meta = data.prepare_data(str(tmp_path / "src.jsonl"), tok_path, str(tmp_path / "out"), val_fraction=0,
                             num_proc=1, verbose=False)
    assert meta["removed"]["heuristic: repeated content"] == dict(docs=0, bytes=len(log) + 1)
    assert read_docs(tmp_path / "out", "train", Tokenizer.load(tok_path))[0] == data.clean_text(docs[0])


def test_repeated_content_at_its_thresholds():
    """A line of 50 four-letter words: 30 of them in a 15-word phrase said twice is MAX_LINE_DUP_5GRAMS exactly (kept),
    32 is over (cut); a 4-word phrase repeated with a new word after it each time repeats no 5-gram (kept); a line
    that repeats itself goes when over two thirds of its visible characters are letters (7 in 10), not at two thirds."""
    four = ["".join(w) for w in itertools.product("bcdfghjk", "aeiou", "lmnr", "stvz")]   # distinct 4-letter words
    rng = np.random.default_rng(0)
    new = iter(rng.permutation(four)[:400])
    for m, kept in ((15, True), (16, False)):
        phrase, rest = [next(new) for _ in range(m)], [next(new) for _ in range(50 - 2 * m)]
        half = len(rest) // 2
        line = " ".join(phrase + rest[:half] + phrase + rest[half:])
        assert data.repeated_content(line) == ((line, 0) if kept else ("", len(line))), m
    line = " ".join(w for _ in range(10) for w in ["fail", "disk", "read", "slow", next(new)])
    assert data.repeated_content(line) == (line, 0)
    for token, kept in (("abcdefg123", False), ("ab1", True)):
        line = " ".join([token] * 50)
        assert data.repeated_content(line) == ((line, 0) if kept else ("", len(line))), token


def junk(rng, n_words):
    """Keyword spam and random strings: what a quality filter should drop."""
    spam = "buy cheap casino bonus click free win viagra deal offer now lol xxx".split()
    return " ".join(rng.choice(spam) if rng.random() < 0.6 else
                    "".join(rng.choice(list("qxzjkvw0123456789"), 7)) for _ in range(n_words))


def test_quality_classifier_separates_planted_sets():
    rng = np.random.default_rng(0)
    good = [prose(rng, 80) for _ in range(120)]
    bad = [junk(rng, 80) for _ in range(120)]
    vocab = set(WORDS)

    def labeller(texts):  # stands in for an LM's bits per byte: share of known words
        return [np.mean([w.strip(".").lower() in vocab for w in t.split()]) for t in texts]

    texts = good[:60] + bad[:60]
    clf = data.train_quality_filter(texts, labeller, drop=0.5)
    p_good, p_bad = clf.score(good[60:]), clf.score(bad[60:])  # held-out documents
    assert (p_good >= 0.5).all() and (p_bad < 0.5).all()
    assert p_good.min() > p_bad.max()


def test_quality_filter_drops_about_its_share():
    """Documents of every grade between prose and spam, the spammiest 10% of the sample labelled junk: the
    classifier, trained on a 10% minority, puts few documents below p(good) 0.5 (0.75% of the unseen ones here:
    so --quality_drop 0.1 dropped almost nothing, review, helper); its threshold, the score below which the
    sample's 10% lie, drops about that share (fewer of the unseen documents: it fits its sample)."""
    rng, vocab = np.random.default_rng(0), set(WORDS)

    def graded():
        spam = rng.random()   # this document's share of spam words
        return " ".join(junk(rng, 1) if rng.random() < spam else rng.choice(WORDS) for _ in range(60))
    docs = [graded() for _ in range(800)]
    clf = data.train_quality_filter(docs[:400], lambda ts: [np.mean([w in vocab for w in t.split()]) for t in ts],
                                    drop=0.1)
    assert (clf.score(docs[:400]) < clf.threshold).sum() == 40
    assert 0.04 < (clf.score(docs[400:]) < clf.threshold).mean() < 0.2
    clf = data.train_quality_filter(docs[:180], lambda ts: [np.mean([w in vocab for w in t.split()]) for t in ts],
                                    drop=0.35)   # (review, helper) 0.35 * 180 is 62.99999999999999: 62 were junk
    assert (clf.score(docs[:180]) < clf.threshold).sum() == 63


def test_a_nan_quality_score_is_an_error():
    """(review, helper) A labeller that scored a document NaN (a model with NaN weights; a 0/0) had it labelled
    good: NaN sorts above every score. It is no score (the worst is -inf): an error naming the document. So is a
    count of scores that is not one per document (labels went to the wrong documents, or to none)."""
    rng = np.random.default_rng(0)
    texts = [prose(rng, 40) for _ in range(9)] + ["the one a broken labeller scores NaN"]
    with pytest.raises(ValueError, match=r"scored 1 of the 10 sampled documents NaN, the first #9 \('the one a broken"):
        data.train_quality_filter(texts, lambda ts: [np.nan if "broken" in t else 1.0 for t in ts], drop=0.2)
    for wrong in (lambda ts: [1.0] * (len(ts) - 1), lambda ts: [[1.0, 2.0]] * len(ts)):  # (one lost; two each)
        with pytest.raises(ValueError, match="scores of shape .* for 10 documents: one score per document"):
            data.train_quality_filter(texts, wrong, drop=0.2)


# ----------------------------------------------------------------------------- shards and the loader

BOS = 0


def synthetic_stream(n_docs, rng):
    """Token = stream position + 1, except <|begin_of_text|> = 0 at each document start: every window
    tells where it was cut from."""
    lengths = rng.integers(1, 40, n_docs)
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    tokens = np.arange(1, starts[-1] + lengths[-1] + 2, dtype=np.uint32)
    tokens[starts] = BOS
    return tokens, starts


def write_split(out_dir, split, tokens, shard_tokens, fingerprint="f00d", vocab_size=1 << 31):
    """Write a stream as shards + meta.json with data.ShardWriter, as prepare_data does."""
    w = data.ShardWriter(str(out_dir), split, shard_tokens, vocab_size, BOS, fingerprint)
    w.add(tokens, int((tokens == BOS).sum()), 0)
    meta = {"fingerprint": fingerprint, "vocab_size": vocab_size, "bos_id": BOS, split: w.close()}
    (out_dir / "meta.json").write_text(json.dumps(meta))
    return meta


@pytest.fixture
def stream(tmp_path):
    tokens, starts = synthetic_stream(300, np.random.default_rng(1))
    meta = write_split(tmp_path, "train", tokens, shard_tokens=1000)
    assert len(meta["train"]["shards"]) > 3
    return tmp_path, tokens, starts


def window_start(x_row):
    """Stream position of a synthetic window's first token."""
    k = int(np.flatnonzero(x_row != BOS)[0])
    return int(x_row[k]) - 1 - k


def test_shard_roundtrip_and_bad_files(tmp_path):
    toks = np.array([BOS, 5, 6, BOS, 7], dtype=np.uint32)
    path = str(tmp_path / "s.bin")
    data.write_shard(path, toks, 100, BOS, "abc")
    header, mm = data.read_shard(path)
    assert header == dict(vocab_size=100, bos_id=BOS, n_docs=2, n_tokens=5, fingerprint="abc")
    np.testing.assert_array_equal(mm, toks)
    raw = open(path, "rb").read()
    (tmp_path / "cut.bin").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match=r"cut\.bin: truncated"):
        data.read_shard(str(tmp_path / "cut.bin"))
    (tmp_path / "foreign.bin").write_bytes(np.arange(100, dtype=np.uint16).tobytes())
    with pytest.raises(ValueError, match=r"foreign\.bin: not a nanollama3 token shard"):
        data.read_shard(str(tmp_path / "foreign.bin"))
    (tmp_path / "v9.bin").write_bytes(raw[:8] + (9).to_bytes(4, "little") + raw[12:])
    with pytest.raises(ValueError, match="version 9"):
        data.read_shard(str(tmp_path / "v9.bin"))
    (tmp_path / "empty.bin").write_bytes(data.HEADER.pack(data.MAGIC, data.VERSION, 100, BOS, 0, 0, b"abc"))
    with pytest.raises(ValueError, match=r"empty\.bin: has no tokens"):
        data.read_shard(str(tmp_path / "empty.bin"))
    (tmp_path / "fp.bin").write_bytes(raw[:32] + b"\xff" + raw[33:])  # a flipped bit in the fingerprint
    with pytest.raises(ValueError, match=r"fp\.bin: damaged header"):
        data.read_shard(str(tmp_path / "fp.bin"))
    (tmp_path / "nobos.bin").write_bytes(raw[:64] + (5).to_bytes(4, "little") + raw[68:])  # the first token no BOS
    with pytest.raises(ValueError, match=r"nobos\.bin: does not start with <\|begin_of_text\|> \(id 0\)"):
        data.read_shard(str(tmp_path / "nobos.bin"))
    (tmp_path / "bos.bin").write_bytes(data.HEADER.pack(data.MAGIC, data.VERSION, 100, 100, 1, 1, b"abc") +
                                       (100).to_bytes(4, "little"))  # <|begin_of_text|> id not below the vocabulary
    with pytest.raises(ValueError, match=r"bos\.bin: damaged header \(vocab size 100, <\|begin_of_text\|> id 100\)"):
        data.read_shard(str(tmp_path / "bos.bin"))
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # atomic write leaves no temp file


def test_loader_refuses_other_tokenizer_and_missing_meta(stream, tmp_path_factory):
    out, tokens, _ = stream
    data.PackedLoader(str(out), "train", 2, 16, fingerprint="f00d")
    with pytest.raises(ValueError, match=r"train_000\.bin: made with tokenizer f00d, expected beef"):
        data.PackedLoader(str(out), "train", 2, 16, fingerprint="beef")
    with pytest.raises(FileNotFoundError, match="meta.json"):
        data.PackedLoader(str(tmp_path_factory.mktemp("empty")), "train", 2, 16)
    last = out / f"train_{len(json.loads((out / 'meta.json').read_text())['train']['shards']) - 1:03d}.bin"
    raw = last.read_bytes()  # the last shard's vocabulary size damaged (the loader used to take it from there)
    last.write_bytes(raw[:12] + (1 << 30).to_bytes(4, "little") + raw[16:])  # (it blamed an intact shard's ids)
    with pytest.raises(ValueError, match=rf"{last.name}: damaged header \(vocab size 1073741824"):
        data.PackedLoader(str(out), "train", 2, 16)
    last.write_bytes(raw)
    os.truncate(out / "train_001.bin", 100)
    with pytest.raises(ValueError, match=r"train_001\.bin: truncated"):
        data.PackedLoader(str(out), "train", 2, 16)
    meta = json.loads((out / "meta.json").read_text())
    with pytest.raises(ValueError, match=r"no 'val' shards in meta\.json \(made with --val_fraction 0\?\)"):
        data.PackedLoader(str(out), "val", 2, 16)
    (out / "meta.json").write_text(json.dumps(dict(meta, bos_id=1)))   # not the shards' <|begin_of_text|>
    with pytest.raises(ValueError, match=r"train_000\.bin: damaged header \(.*<\|begin_of_text\|> 0; meta\.json: "):
        data.PackedLoader(str(out), "train", 2, 16)
    (out / "meta.json").write_text('{"version": 1, "con')  # cut short
    with pytest.raises(ValueError, match=r"meta\.json: unreadable"):
        data.PackedLoader(str(out), "train", 2, 16)


@pytest.mark.parametrize("kwargs, what", [(dict(seq_len=0), "seq_len=0"), (dict(batch_size=0), "batch_size=0"),
                                          (dict(rank=2, world_size=2), "rank 2 is not one of the 2 processes"),
                                          (dict(seed=-1), "seed=-1"), (dict(rank=1.5, world_size=2), "rank=1.5")])
def test_loader_arguments_are_checked(stream, kwargs, what):
    args = dict(batch_size=2, seq_len=16) | kwargs
    with pytest.raises(ValueError, match=what):
        data.PackedLoader(str(stream[0]), "train", **args)
    data.PackedLoader(str(stream[0]), "train", np.int64(2), np.int64(16))  # numpy integers are integers


def test_windows_and_doc_ids(stream):
    out, tokens, starts = stream
    T = 32
    loader = data.PackedLoader(str(out), "train", 4, T)
    doc_of = np.searchsorted(starts, np.arange(len(tokens)), side="right") - 1  # reference: doc of each position
    shard_ends = set(np.cumsum([len(s) for s in loader.shards]).tolist())
    straddles = 0
    for _ in range(20):
        x, y, doc_ids = loader.next_batch()
        assert x.shape == y.shape == doc_ids.shape == (4, T) and x.dtype == y.dtype == doc_ids.dtype == torch.int64
        for r in range(4):
            p = window_start(x[r].numpy())
            assert p % T == 0
            np.testing.assert_array_equal(x[r].numpy(), tokens[p:p + T])
            np.testing.assert_array_equal(y[r].numpy(), tokens[p + 1:p + T + 1])  # y at a boundary: BOS
            # doc_ids: same id <=> same document, and a new id exactly at each <|begin_of_text|>
            np.testing.assert_array_equal(doc_ids[r].numpy(), doc_of[p:p + T] - doc_of[p])
            straddles += any(p < e < p + T for e in shard_ends)
    assert straddles > 0  # windows are packed across shard boundaries


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_token_once_per_epoch_across_ranks(stream, world_size):
    out, tokens, _ = stream
    B, T = 3, 16
    n_windows = (len(tokens) - 1) // T
    loaders = [data.PackedLoader(str(out), "train", B, T, rank, world_size, seed=5) for rank in range(world_size)]
    for ld in loaders:
        ld.block = 7  # several shuffle blocks and a partial one, as on a large data set
    seen = []
    for b in range(-(-n_windows // (B * world_size))):
        for rank, ld in enumerate(loaders):
            x, _, _ = ld.next_batch()
            for i in range(B):
                if (b * world_size + rank) * B + i < n_windows:  # rows of the next epoch are left out
                    seen.append(window_start(x[i].numpy()))
    assert sorted(seen) == [w * T for w in range(n_windows)]  # each window once: every token once as input
    assert seen != sorted(seen)                               # and shuffled
    # every token but the last < T + 1 is in some window: the loader's epoch is all (len - 1) // T windows (the line
    # here was n_windows * T >= len(tokens) - T - 1, true of the test's own n_windows whatever the loader did)
    assert all(ld.n_windows == n_windows for ld in loaders) and len(tokens) - (max(seen) + T + 1) < T + 1


def test_loader_determinism_and_epochs(stream):
    out, tokens, _ = stream
    n_windows = (len(tokens) - 1) // 8

    def order(seed, n):
        ld = data.PackedLoader(str(out), "train", 1, 8, seed=seed)
        return [window_start(ld.next_batch()[0][0].numpy()) for _ in range(n)]
    a = order(0, 2 * n_windows)
    assert a == order(0, 2 * n_windows)
    assert a[:n_windows] != order(1, n_windows)  # another seed, another order
    assert a[:n_windows] != a[n_windows:] and sorted(a[:n_windows]) == sorted(a[n_windows:])  # reshuffled epoch
    batches = zip(range(3), data.PackedLoader(str(out), "train", 1, 8, seed=0))  # iterating: the same batches
    assert [window_start(x[0].numpy()) for _, (x, y, doc_ids) in batches] == a[:3]
    # in shuffle blocks (as on a large data set): the blocks' order and each block's own order are drawn, each
    # block's its own, and drawn again each epoch
    ld, k = data.PackedLoader(str(out), "train", 1, 8, seed=0), n_windows // 7   # k full blocks, then a partial one
    ld.block = 7
    epochs = [[[ld.window(e * n_windows + 7 * b + j) for j in range(7)] for b in range(k)] for e in (0, 1)]
    assert all(len({w // 7 for w in block}) == 1 for blocks in epochs for block in blocks)
    order = [[b[0] // 7 for b in blocks] for blocks in epochs]                       # the blocks' order
    assert sorted(order[0]) == list(range(k)) != order[0] != order[1]
    assert len({tuple(w % 7 for w in block) for block in epochs[0]}) > k // 2        # each block's own order


def test_resume_exact(stream):
    out, _, _ = stream
    ref = data.PackedLoader(str(out), "train", 2, 16, rank=1, world_size=2, seed=3)
    for _ in range(7):
        ref.next_batch()
    sd = ref.state_dict()
    expected = [ref.next_batch() for _ in range(30)]  # crosses into the next epoch
    resumed = data.PackedLoader(str(out), "train", 2, 16, rank=1, world_size=2, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(sd)))  # the state survives a JSON / checkpoint round trip
    for want in expected:
        for a, b in zip(want, resumed.next_batch()):
            assert torch.equal(a, b)
    # the same global batch on one rank with twice the rows continues the same global order
    single = data.PackedLoader(str(out), "train", 4, 16, seed=3)
    single.load_state_dict(sd)
    x, _, _ = single.next_batch()
    assert torch.equal(x[2:], expected[0][0])
    with pytest.raises(ValueError, match="seq_len"):
        data.PackedLoader(str(out), "train", 2, 32, seed=3).load_state_dict(sd)
    with pytest.raises(ValueError, match="loader state has seed=3, this loader seed=4"):   # another window order
        data.PackedLoader(str(out), "train", 2, 16, rank=1, world_size=2, seed=4).load_state_dict(sd)
    with pytest.raises(ValueError, match="global batch"):
        data.PackedLoader(str(out), "train", 3, 16, seed=3).load_state_dict(sd)


OTHER = 1 << 20  # the second source's tokens are its stream positions + 1 + OTHER


@pytest.fixture
def two_sources(stream, tmp_path_factory):
    """The stream fixture's folder, and a second one of another length whose tokens tell them apart."""
    out_b = tmp_path_factory.mktemp("b")
    tokens, _ = synthetic_stream(40, np.random.default_rng(2))
    write_split(out_b, "train", np.where(tokens == BOS, BOS, tokens + OTHER).astype(np.uint32), shard_tokens=300)
    return str(stream[0]), str(out_b)


def mixed(folders, weights, B, T, rank=0, world_size=1, seed=4):
    loaders = [data.PackedLoader(f, "train", B, T, rank, world_size, seed) for f in folders]
    return data.MixedLoader(loaders, weights, seed)


def test_mixed_loader_shares_and_each_sources_order(two_sources):
    T, B, n = 8, 6, 400
    ld = mixed(two_sources, [3, 1], B, T)  # weights are shares: 3:1 is 0.75 / 0.25
    starts = {0: [], 1: []}
    for _ in range(n):
        x, y, doc_ids = ld.next_batch()
        assert x.shape == y.shape == doc_ids.shape == (B, T)
        assert torch.equal(x[:, 1:], y[:, :-1]) and (doc_ids[:, 0] == 0).all()
        for row in x.numpy():
            s = int(row.max() > OTHER)
            starts[s].append(window_start(row % OTHER))
    share = len(starts[1]) / (n * B)
    assert abs(share - 0.25) < 0.03  # 2400 rows: the binomial's sd is 0.009
    for s, folder in enumerate(two_sources):  # each source in its own loader's order, across epochs
        alone = data.PackedLoader(folder, "train", 1, T, seed=4)
        assert starts[s] == [window_start(alone.next_batch()[0][0].numpy() % OTHER) for _ in starts[s]]
    small = data.PackedLoader(two_sources[1], "train", 1, T)
    assert len(starts[1]) > 3 * small.n_windows  # the small source is read for several epochs


def test_mixed_loader_resumes_with_folders_added(two_sources):
    """A resume may add folders after the checkpoint's (a new source, or one to evaluate): the old ones go on where
    they were, a new one starts at its beginning. One folder's state (PackedLoader's, a run without a mix) is that
    of a mix of its folder alone (it was refused)."""
    T = 8
    alone = data.PackedLoader(two_sources[0], "train", 4, T, seed=4)
    for _ in range(3):
        alone.next_batch()
    sd = json.loads(json.dumps(alone.state_dict()))
    ld = mixed(two_sources, [0.5, 0.5], 4, T)
    ld.load_state_dict(sd)
    assert ld.rows == 12 and ld.taken == [12, 0]
    own = [data.PackedLoader(f, "train", 1, T, seed=4) for f in two_sources]   # each folder in its own order
    seen = [0, 0]
    for _ in range(20):
        for row in ld.next_batch()[0]:
            s = int(row.max() >= OTHER)
            assert torch.equal(row, own[s].read([(12 if s == 0 else 0) + seen[s]])[0][0]), (s, seen)
            seen[s] += 1
    assert min(seen) > 10 and ld.taken == [12 + seen[0], seen[1]]
    grown = mixed(two_sources + two_sources[:1], [1, 1, 1], 4, T)   # a mix's state, a third folder after its two
    grown.load_state_dict(json.loads(json.dumps(ld.state_dict())))
    assert grown.rows == ld.rows and grown.taken == ld.taken + [0]
    with pytest.raises(ValueError, match="loader state has 2 folders, this mix 1: a resume may add folders"):
        mixed(two_sources[:1], [1], 4, T).load_state_dict(ld.state_dict())   # fewer folders than the state
    with pytest.raises(ValueError, match="seed=5, this mix's folders seed=4"):   # (the mix's own seed is 0 here)
        data.MixedLoader([data.PackedLoader(f, "train", 4, T, seed=4) for f in two_sources], [1, 1], 0) \
            .load_state_dict(data.PackedLoader(two_sources[0], "train", 4, T, seed=5).state_dict())


def test_mixed_loader_refuses_a_state_of_folders_read_in_another_order(two_sources):
    """The mix's own seed draws the rows' folders; its loaders' seed orders each folder's windows. A state whose
    loaders had another seed is refused, as one folder's state of another seed is (it was taken, and each folder
    then served other windows than the run it resumed would have)."""
    T = 8
    ref = data.MixedLoader([data.PackedLoader(f, "train", 4, T, seed=4) for f in two_sources], [1, 1], 0)
    for _ in range(3):
        ref.next_batch()
    sd = json.loads(json.dumps(ref.state_dict()))
    same = data.MixedLoader([data.PackedLoader(f, "train", 4, T, seed=4) for f in two_sources], [1, 1], 0)
    same.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(ref.next_batch(), same.next_batch()))
    other = data.MixedLoader([data.PackedLoader(f, "train", 4, T, seed=5) for f in two_sources], [1, 1], 0)
    with pytest.raises(ValueError, match="seed=4, this mix's folders seed=5"):
        other.load_state_dict(sd)
    del sd["loader_seed"]   # a state saved before it was kept: its folders' seed unknown, resumed as before
    other.load_state_dict(sd)


def test_mixed_loader_ranks_resume_and_refusals(two_sources, tmp_path):
    T = 8
    one = mixed(two_sources, [0.5, 0.5], 4, T)
    ranks = [mixed(two_sources, [0.5, 0.5], 2, T, rank, 2) for rank in range(2)]
    for _ in range(5):  # two ranks take the rows of one process's global batch, in halves
        x = one.next_batch()[0]
        assert torch.equal(torch.cat([r.next_batch()[0] for r in ranks]), x)
    sd = json.loads(json.dumps(ranks[1].state_dict()))  # the state survives a JSON / checkpoint round trip
    sources_next = [ld.read([sd["taken"][s]])[0] for s, ld in enumerate(ranks[1].loaders)]  # (x, y, doc_ids)
    expected = [ranks[1].next_batch() for _ in range(40)]
    resumed = mixed(two_sources, [0.5, 0.5], 2, T, 1, 2)
    resumed.load_state_dict(sd)
    for want in expected:
        assert all(torch.equal(a, b) for a, b in zip(want, resumed.next_batch()))
    # the same rows however the global batch is split: a global batch of 8 rows in one process, or of 4 in four
    # processes of 1, go on from that state (gradient accumulation, or a restart on another number of GPUs)
    single = mixed(two_sources, [0.5, 0.5], 8, T)
    quarters = [mixed(two_sources, [0.5, 0.5], 1, T, rank, 4) for rank in range(4)]
    for ld in [single, *quarters]:
        ld.load_state_dict(sd)
    x = single.next_batch()[0]
    assert torch.equal(x[2:4], expected[0][0]) and torch.equal(x[6:8], expected[1][0])
    for half in (x[:4], x[4:]):
        assert torch.equal(torch.cat([ld.next_batch()[0] for ld in quarters]), half)
    # other shares from a state (Llama 3 changed its mix while training): each source goes on in its own order,
    # and the rows from there on follow the new shares
    upsampled = mixed(two_sources, [1, 3], 4, T)  # (one process: every row of the global batch is its own)
    upsampled.load_state_dict(sd)
    counts = [0, 0]
    for _ in range(600):
        for row in upsampled.next_batch()[0]:
            s = int(row.max() >= OTHER)
            counts[s] += 1
            if counts[s] == 1:  # the first row of each source after the resume: where that source was
                assert torch.equal(row, sources_next[s][0]), s
    assert abs(counts[1] / sum(counts) - 0.75) < 0.03  # 2400 rows: the binomial's sd is 0.009
    with pytest.raises(ValueError, match="sources"):  # the folders swapped
        mixed(two_sources[::-1], [0.5, 0.5], 2, T, 1, 2).load_state_dict(sd)
    # two folders of as many tokens, swapped: told apart by what they hold (their shards' CRC-32s), not by size
    tokens = np.concatenate([data.read_shard(os.path.join(two_sources[0], name))[1] for name in
                             json.loads(open(os.path.join(two_sources[0], "meta.json")).read())["train"]["shards"]])
    (tmp_path / "like").mkdir()
    write_split(tmp_path / "like", "train", np.where(tokens == BOS, BOS, tokens + 2 * OTHER).astype(np.uint32), 1000)
    like = [two_sources[0], str(tmp_path / "like")]
    state = mixed(like, [0.5, 0.5], 2, T).state_dict()
    assert state["sources"][0]["n_tokens"] == state["sources"][1]["n_tokens"]
    with pytest.raises(ValueError, match="sources"):
        mixed(like[::-1], [0.5, 0.5], 2, T).load_state_dict(state)
    with pytest.raises(ValueError, match="content"):
        data.PackedLoader(like[1], "train", 2, T).load_state_dict(data.PackedLoader(like[0], "train", 2, T)
                                                                  .state_dict())
    for source in state["sources"]:  # a state saved before sources had a content: resumed as before
        del source["content"]
    mixed(like[::-1], [0.5, 0.5], 2, T).load_state_dict(state)
    old = data.PackedLoader(like[1], "train", 2, T).state_dict()
    old["content"] = None  # a folder of an older data.py (no CRC-32s), given them since: resumed
    data.PackedLoader(like[1], "train", 2, T).load_state_dict(old)
    with pytest.raises(ValueError, match="loader state is of a data mix of 2 folders, this loader reads one"):
        data.PackedLoader(two_sources[0], "train", 2, T, seed=4).load_state_dict(sd)
    with pytest.raises(ValueError, match="sources"):   # one folder's state is the first folder's, not another's
        mixed(two_sources[::-1], [0.5, 0.5], 2, T, seed=0).load_state_dict(
            data.PackedLoader(two_sources[0], "train", 2, T).state_dict())
    for weights in ([0, 0], [1, -1], [1, float("inf")]):  # (a 0 is a source never drawn: test below)
        with pytest.raises(ValueError, match="must all be finite and >= 0, and one > 0"):
            mixed(two_sources, weights, 2, T)
    with pytest.raises(ValueError, match="differ in"):
        data.MixedLoader([data.PackedLoader(f, "train", 2, T, seed=s) for s, f in enumerate(two_sources)], [1, 1])
    tokens, _ = synthetic_stream(40, np.random.default_rng(3))  # a folder made with another tokenizer
    (tmp_path / "other").mkdir()
    write_split(tmp_path / "other", "train", tokens, shard_tokens=300, fingerprint="beef")
    with pytest.raises(ValueError, match=f"different tokenizers: {two_sources[0]} f00d, {tmp_path / 'other'} beef"):
        mixed([two_sources[0], str(tmp_path / "other")], [1, 1], 2, T)
    # one source: the PackedLoader's own batches
    alone, single = data.PackedLoader(two_sources[0], "train", 3, T, seed=4), mixed(two_sources[:1], [1], 3, T)
    for _ in range(5):
        assert all(torch.equal(a, b) for a, b in zip(alone.next_batch(), single.next_batch()))


def test_mixed_loader_seed_is_checked_and_its_state_plain(two_sources):
    """The mix's seed as PackedLoader's: a numpy integer is an integer, made plain in the state (json cannot write an
    np.int64, nor does torch.load(weights_only=True) read one back: the checkpoint could not be resumed), and a
    negative or non-integer seed is refused when the mix is made, not by numpy at its first batch."""
    loaders = [data.PackedLoader(f, "train", 2, 8, seed=4) for f in two_sources]
    ld = data.MixedLoader(loaders, [1, 1], np.int64(4))
    ld.next_batch()
    sd = ld.state_dict()
    assert json.loads(json.dumps(sd)) == sd
    for seed in (-1, 1.5, None):
        with pytest.raises(ValueError, match=f"MixedLoader: seed={seed!r}, must be an integer >= 0"):
            data.MixedLoader(loaders, [1, 1], seed)


def test_mixed_loader_zero_weight_is_never_read_and_keeps_its_place(two_sources, monkeypatch):
    """A weight of 0 (an eval-only folder, or one dropped on resume): no row of it is drawn and its loader is never
    read, the rows are those of the mix without it, and its count stays in the state, so that a later resume with
    a weight > 0 goes on where it was."""
    T, B = 8, 4
    a, b = two_sources
    with_zero, without = mixed([a, b, a], [3, 1, 0], B, T), mixed([a, b], [3, 1], B, T)  # (the third: a's folder)

    def refuse(positions):
        raise AssertionError("a source of weight 0 was read")
    monkeypatch.setattr(with_zero.loaders[2], "read", refuse)
    for _ in range(200):  # 800 rows
        assert all(torch.equal(p, q) for p, q in zip(with_zero.next_batch(), without.next_batch()))
    assert with_zero.state_dict()["taken"] == [*without.state_dict()["taken"], 0]
    # dropped on resume: 0 rows of it, its count kept; given a weight again: it goes on from that count
    even = mixed(two_sources, [1, 1], B, T)
    for _ in range(10):
        even.next_batch()
    sd = even.state_dict()
    assert sd["taken"][1] > 0
    after = even.loaders[1].read([sd["taken"][1]])[0][0]  # the row source 1 would give next
    dropped = mixed(two_sources, [1, 0], B, T)
    dropped.load_state_dict(sd)
    monkeypatch.setattr(dropped.loaders[1], "read", refuse)
    for _ in range(50):
        assert (dropped.next_batch()[0] < OTHER).all()  # (source 1's tokens are above OTHER)
    sd = dropped.state_dict()
    assert sd["taken"][1] == even.state_dict()["taken"][1] and sd["rows"] == 60 * B
    back = mixed(two_sources, [1, 1], B, T)
    back.load_state_dict(sd)
    first = next(row for _ in range(20) for row in back.next_batch()[0] if row.max() >= OTHER)
    assert torch.equal(first, after)


def test_mixed_loader_draws_across_chunks(two_sources, monkeypatch):
    """The sources of rows are drawn a chunk at a time: any range of rows, and batches that straddle chunks, get
    the same draws."""
    monkeypatch.setattr(data.MixedLoader, "chunk", 5)  # a global batch of 4 rows straddles chunks
    ld = mixed(two_sources, [1, 1], 4, 8)
    drawn = ld.sources(0, 40)
    assert drawn.shape == (40,) and set(drawn.tolist()) == {0, 1}
    assert np.array_equal(ld.sources(3, 12), drawn[3:12])  # any range: the same draws
    assert len({tuple(drawn[i:i + 5]) for i in range(0, 40, 5)}) > 1  # each chunk its own draws
    assert not np.array_equal(mixed(two_sources, [1, 1], 4, 8, seed=5).sources(0, 40), drawn)  # and the seed's
    sources = [int(row.max() > OTHER) for _ in range(10) for row in ld.next_batch()[0].numpy()]
    assert sources == drawn.tolist()


# ----------------------------------------------------------------------------- prepare_data end to end

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of documents with planted duplicates and junk, and a tokenizer trained on it."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    docs = [prose(rng, int(rng.integers(30, 300))) for _ in range(150)]
    docs[10] = "Caf\u0065\u0301 au lait, " + docs[10]          # NFC normalisation changes it
    docs[21] = docs[21] + " <|eot_id|> and <|begin_of_text|> typed as text"  # plain text, never control tokens
    planted = [docs[3], docs[4] + "\n", "tiny", "$$$ %%% ^^^ &&& " * 10]  # exact dup, dup after cleaning, junk
    with open(root / "docs.jsonl", "w") as f:
        for d in docs + planted:
            f.write(json.dumps({"text": d}) + "\n")
    tok_path = str(root / "tok.model")
    Tokenizer.train(docs, 256 + 256 + 64).save(tok_path)
    return root, docs, tok_path


def read_docs(out_dir, split, tok):
    """Decode a split's shards back into documents (split at <|begin_of_text|>)."""
    meta = json.loads(open(os.path.join(out_dir, "meta.json")).read())
    stream = np.concatenate([data.read_shard(os.path.join(out_dir, s))[1] for s in meta[split]["shards"]])
    starts = list(np.flatnonzero(stream == tok.bos_id)) + [len(stream)]
    return [tok.decode(stream[a + 1:b].tolist()) for a, b in zip(starts[:-1], starts[1:])]


def test_line_dedup_removes_lines_repeated_too_often():
    boiler = "Accept our cookies to continue reading"
    texts = [f"Story {i} begins here.\n{boiler}\n\n\n\nIt ends {i}." for i in range(7)] + \
        [boiler, f"  {boiler}  \nunique"]  # the line 9 times (stripped), 7 of them in stories
    out, n_bytes = data.drop_repeated_lines(texts, 6)
    assert out[:7] == [f"Story {i} begins here.\n\n\nIt ends {i}." for i in range(7)]  # (blank runs closed up)
    assert out[7:] == ["", "unique"]  # nothing left of the bare boilerplate
    assert n_bytes == sum(len(t.encode()) for t in texts) - sum(len(t.encode()) for t in out)
    assert data.drop_repeated_lines(texts, 9) == (texts, 0)  # 9 is not more than 9
    unique = [f"line {i}\n\n\nend {i}" for i in range(9)]
    assert data.drop_repeated_lines(unique, 1) == (unique, 0)  # blank lines are never counted
    menu = ["Home", "About", "Contact"]   # 7 times in one document: repeats inside a document count, 7 > 6
    page = "\n".join(menu * 7) + "\n\nThe page's own text."
    assert data.drop_repeated_lines([page], 6) == (["The page's own text."], len(page) - 20)
    assert data.drop_repeated_lines([page], 7) == ([page], 0)   # 7 is not more than 7


def test_prepare_data_line_dedup_by_bucket(corpus, tmp_path, monkeypatch):
    """--line_dedup 6 in prepare_data: two boilerplate lines of 13 and 9 documents go from every one of them; what
    is left goes through the heuristics again (a short rest goes) and a blank rest goes; the counting is per bucket
    of LINE_BUCKET kept documents, which is part of the cache's key."""
    _, docs, tok_path = corpus
    boiler = "Subscribe to our newsletter for more stories like this one, every single week of the year"
    other = "Share this article with your friends and family on every social network that you use"
    texts = [d + "\n" + boiler for d in docs[:12]] + ["\u00a0\u00a0\n" + boiler] + \
        [d + "\n" + other for d in docs[12:20]] + ["ok\n" + other] + docs[20:40]
    (tmp_path / "src.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = Tokenizer.load(tok_path)

    def run(out):
        meta = data.prepare_data(str(tmp_path / "src.jsonl"), tok_path, str(tmp_path / out), val_fraction=0.1,
                                 num_proc=1, line_dedup=6, verbose=False)
        val = read_docs(tmp_path / out, "val", tok)
        return meta, read_docs(tmp_path / out, "train", tok) + val, {d.split("\n")[0] for d in val}
    meta, kept, val = run("all")
    assert not any(boiler in d or other in d for d in kept) and len(kept) == len(texts) - 2 and "ok" not in kept
    assert meta["removed"]["line duplicates"]["docs"] == 1  # the one with no-break spaces left
    assert meta["removed"]["heuristic: too short"]["docs"] == 1  # "ok"
    assert meta["config"]["line_dedup"] == 6 and meta["config"]["line_bucket"] == data.LINE_BUCKET
    monkeypatch.setattr(data, "LINE_BUCKET", 5)  # in buckets of 5 documents: at most 5 copies in each, all kept
    firsts = {d.split("\n")[0] for d in kept}  # (each document's first line names it)
    meta, kept, val_5 = run("all")  # (the same folder: another bucket size rebuilds it)
    assert (sum(boiler in d for d in kept), sum(other in d for d in kept)) == (13, 9)
    assert meta["removed"]["line duplicates"] == dict(docs=0, bytes=0)
    # a document's split is decided before line dedup: with its lines or without, the same documents are val
    assert val_5 & firsts == val and len(val) >= 2
    with pytest.raises(ValueError, match="line_dedup=-1"):
        data.prepare_data(str(tmp_path / "src.jsonl"), tok_path, str(tmp_path / "x"), line_dedup=-1)


def test_line_dedup_drops_the_documents_it_makes_equal(corpus, tmp_path):
    """Two pages of one body under two site footers are no near duplicates (the footers are most of their words);
    line dedup takes both footers away and leaves one text twice: the second goes as an exact duplicate, else it
    trained twice or (as here, split by their hashes before) sat in train and in val (review, helper)."""
    _, docs, tok_path = corpus
    rng = np.random.default_rng(5)
    footer_a = "Copyright Example Media Group all rights reserved read our privacy policy and terms of use " \
               "before you subscribe to the weekly newsletter of the example site"
    footer_b = "This page was served by the northern mirror of the archive please report broken links to the " \
               "webmaster and visit the help desk for any question about your account"
    for _ in range(200):   # a body whose two pages fall on both sides of the split (1 in 2 at val_fraction 0.5)
        body = prose(rng, 40)
        a, b = body + "\n" + footer_a, body + "\n" + footer_b
        if data.is_val(data.doc_hash(a), 2) != data.is_val(data.doc_hash(b), 2):
            break
    others = [d + "\n" + (footer_a, footer_b)[i % 2] for i, d in enumerate(docs[:16])]  # 8 pages of each footer
    (tmp_path / "src.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in others + [a, b]))
    meta = data.prepare_data(str(tmp_path / "src.jsonl"), tok_path, str(tmp_path / "out"), val_fraction=0.5,
                             num_proc=1, line_dedup=6, verbose=False)
    tok = Tokenizer.load(tok_path)
    kept = read_docs(tmp_path / "out", "train", tok) + read_docs(tmp_path / "out", "val", tok)
    assert kept.count(body) == 1 and len(kept) == len(set(kept)) == 17
    assert meta["removed"]["exact duplicate"]["docs"] == 1


def test_prepare_data_end_to_end(corpus, tmp_path, capsys):
    root, docs, tok_path = corpus
    tok = Tokenizer.load(tok_path)
    out = str(tmp_path / "shards")
    meta = data.prepare_data(str(root / "docs.jsonl"), tok_path, out, val_fraction=0.1, num_proc=1,
                             shard_tokens=2000)
    printed = capsys.readouterr().out
    assert "exact duplicate" in printed and "heuristic" in printed
    assert meta["removed"]["exact duplicate"]["docs"] == 2
    assert meta["removed"]["heuristic: too short"]["docs"] == 1
    assert meta["removed"]["heuristic: few letters"]["docs"] == 1
    cleaned = [data.clean_text(d) for d in docs]
    val, train = read_docs(out, "val", tok), read_docs(out, "train", tok)
    in_val = [data.is_val(data.doc_hash(d), 10) for d in cleaned]
    assert val == [d for d, v in zip(cleaned, in_val) if v] and train == [d for d, v in zip(cleaned, in_val) if not v]
    assert 8 <= len(val) <= 22 and "Caf\u00e9 au lait" in cleaned[10]  # (1 in 10 of 150 by hash: 15 +- 3.7)
    stream = np.concatenate([data.read_shard(os.path.join(out, f))[1] for f in meta["train"]["shards"]])
    assert stream.tolist() == [t for d in train for t in tok.encode(d, bos=True)]  # the ids of Tokenizer.encode
    assert "<|eot_id|> and <|begin_of_text|> typed as text" in cleaned[21] and cleaned[21] in train + val
    for split, got in (("train", train), ("val", val)):
        m = meta[split]
        assert m["docs"] == len(got) and m["bytes"] == sum(len(d.encode()) for d in got)
        assert m["tokens"] == sum(len(tok.encode(d)) + 1 for d in got)
    assert len(meta["train"]["shards"]) > 1 and meta["fingerprint"] == tok.fingerprint()
    for split in ("train", "val"):  # each shard's CRC-32, for train.py to check the files against
        files = [open(os.path.join(out, name), "rb").read() for name in meta[split]["shards"]]
        assert meta[split]["crc32"] == [zlib.crc32(b) for b in files]
    # cached: the same call does no work; other settings rebuild and leave no stale shard behind
    mtime = os.path.getmtime(os.path.join(out, "meta.json"))
    assert data.prepare_data(str(root / "docs.jsonl"), tok_path, out, val_fraction=0.1, num_proc=1,
                             shard_tokens=2000) == meta
    assert os.path.getmtime(os.path.join(out, "meta.json")) == mtime
    # a shard damaged since (its CRC-32 differs), or a meta.json without CRC-32s (an older data.py): rebuilt
    timeless = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    shard = os.path.join(out, meta["train"]["shards"][1])
    blob = bytearray(open(shard, "rb").read())
    blob[-5] ^= 1
    open(shard, "wb").write(bytes(blob))
    assert timeless(data.prepare_data(str(root / "docs.jsonl"), tok_path, out, val_fraction=0.1, num_proc=1,
                                      shard_tokens=2000, verbose=False)) == timeless(meta)
    assert zlib.crc32(open(shard, "rb").read()) == meta["train"]["crc32"][1]
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump({**meta, "train": {k: v for k, v in meta["train"].items() if k != "crc32"}}, f)
    meta = data.prepare_data(str(root / "docs.jsonl"), tok_path, out, val_fraction=0.1, num_proc=1,
                             shard_tokens=2000, verbose=False)
    assert "crc32" in meta["train"]
    # a --quality_model that is no model: refused before the folder's files go
    with pytest.raises(ValueError, match="typo: no such folder"):
        data.prepare_data(str(root / "docs.jsonl"), tok_path, out, num_proc=1, quality_model=str(tmp_path / "typo"))
    assert data.read_meta(os.path.join(out, "meta.json")) == meta
    mtime = os.path.getmtime(os.path.join(out, "meta.json"))
    os.utime(root / "docs.jsonl", ns=(0, 0))  # the source edited (as far as size and time tell): rebuilt
    assert data.prepare_data(str(root / "docs.jsonl"), tok_path, out, val_fraction=0.1, num_proc=1,
                             shard_tokens=2000, verbose=False)["config"] != meta["config"]
    assert os.path.getmtime(os.path.join(out, "meta.json")) != mtime
    stale = dict(meta, config=dict(meta["config"], pipeline=data.PIPELINE - 1))  # made by an older pipeline
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(stale, f)
    assert data.prepare_data(str(root / "docs.jsonl"), tok_path, out, val_fraction=0.1, num_proc=1,
                             shard_tokens=2000, verbose=False)["config"]["pipeline"] == data.PIPELINE  # rebuilt
    (tmp_path / "shards" / "meta.json").write_text('{"version": 1, "con')  # a damaged cache: rebuilt, not a crash
    assert data.prepare_data(str(root / "docs.jsonl"), tok_path, out, val_fraction=0.1, num_proc=1,
                             shard_tokens=2000, verbose=False)["train"] == meta["train"]
    meta2 = data.prepare_data(str(root / "docs.jsonl"), tok_path, out, val_fraction=0.1, num_proc=2,
                              chunk_bytes=5000)  # many chunks: the workers' results must come back in order
    assert len(meta2["train"]["shards"]) == 1
    assert sorted(os.listdir(out)) == ["meta.json", "train_000.bin", "val_000.bin"]
    assert read_docs(out, "train", tok) == train  # 2 processes: the same tokens
    loader = data.PackedLoader(out, "val", 2, 8, fingerprint=tok.fingerprint())
    x, y, doc_ids = loader.next_batch()
    assert (x < tok.n_words).all()


def test_prepare_data_quality_filter_and_empty(corpus, tmp_path):
    root, docs, tok_path = corpus
    rng = np.random.default_rng(1)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    names = rng.permutation(150)  # good and junk interleaved: the first documents are the labelled sample
    for i, d in zip(names, docs[:100] + [junk(rng, 60) for _ in range(50)]):
        (mixed / f"{i:03d}.txt").write_text(d)
    vocab = set(WORDS)

    def labeller(texts):
        return [np.mean([w.strip(".").lower() in vocab for w in t.split()]) for t in texts]

    for chunk_bytes in (1 << 22, 3000):  # (in chunks of 3000 bytes the sample waits for several chunks: none lost)
        meta = data.prepare_data(str(mixed), tok_path, str(tmp_path / "q"), val_fraction=0, num_proc=1,
                                 labeller=labeller, quality_sample=60, quality_drop=0.35, chunk_bytes=chunk_bytes,
                                 verbose=False)  # 21/60 junk
        assert meta["removed"]["quality"]["docs"] == 50 and meta["train"]["docs"] == 100
    # labels go by rank: no junk at drop 0 (the lowest score was junk at any drop), and scores that all tie do
    # not make every document junk (all of them were, and nothing survived)
    meta = data.prepare_data(str(mixed), tok_path, str(tmp_path / "q"), val_fraction=0, num_proc=1,
                             labeller=labeller, quality_sample=60, quality_drop=0, verbose=False)
    assert "quality" not in meta["removed"] and meta["train"]["docs"] == 150
    meta = data.prepare_data(str(mixed), tok_path, str(tmp_path / "q"), val_fraction=0, num_proc=1,
                             labeller=lambda texts: [1.0] * len(texts), quality_sample=60, verbose=False)
    assert meta["train"]["docs"] > 0
    with pytest.raises(ValueError, match=r"quality_drop=1: the fraction of the sample labelled junk"):
        data.prepare_data(str(mixed), tok_path, str(tmp_path / "q"), labeller=labeller, quality_drop=1)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no documents"):
        data.prepare_data(str(empty), tok_path, str(tmp_path / "e"), verbose=False)


@pytest.fixture
def one_thread():
    """Tiny models run 10-40x faster on one thread when other jobs share the cores (no OpenMP spin-waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_checkpoint_labeller_prefers_what_the_model_learned(corpus, tmp_path, one_thread):
    """A tiny model trained on prose: the labeller scores held-out prose above junk, in bits per byte, and
    prepare_data(quality_model=...) uses it to drop the junk."""
    from model import ModelArgs, Transformer, save_model
    root, docs, tok_path = corpus
    tok = Tokenizer.load(tok_path)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=32,
                     max_seq_len=64, rope_theta=10000.0)
    model = Transformer(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stream = torch.tensor([t for d in docs[:100] for t in tok.encode(d, bos=True)])
    for step in range(60):
        i = torch.randint(0, len(stream) - 65, (8,))
        batch = torch.stack([stream[j:j + 65] for j in i.tolist()])  # (8, 65)
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = tmp_path / "ckpt"
    save_model(model, ckpt, tokenizer_path=tok_path)
    label = data.checkpoint_labeller(str(ckpt))
    rng = np.random.default_rng(2)
    good, bad = docs[100:130], [junk(rng, 60) for _ in range(30)]
    s_good, s_bad = label(good), label(bad)
    assert s_good.min() > s_bad.max()
    # the score is minus bits per byte of the first max_seq_len + 1 tokens
    ids = tok.encode(good[0], bos=True)[:65]
    with torch.no_grad():
        nats = model.eval()(torch.tensor(ids[:-1])[None], torch.tensor(ids[1:])[None]).item() * 64
    assert s_good[0] == pytest.approx(-nats / np.log(2) / len(tok.decode_bytes(ids[1:])), rel=1e-4)

    mixed = tmp_path / "mixed.jsonl"
    order = rng.permutation(60)
    mixed.write_text("".join(json.dumps({"text": (good + bad)[i]}) + "\n" for i in order))
    meta = data.prepare_data(str(mixed), tok_path, str(tmp_path / "q"), val_fraction=0, num_proc=1,
                             quality_model=str(ckpt), quality_sample=60, quality_drop=0.5, verbose=False)
    assert meta["removed"]["quality"]["docs"] == 30 and meta["train"]["docs"] == 30
    again = lambda: data.prepare_data(str(mixed), tok_path, str(tmp_path / "q"), val_fraction=0, num_proc=1,  # noqa
                                      quality_model=str(ckpt), quality_sample=60, quality_drop=0.5, verbose=False)
    assert again() == meta   # cached
    os.utime(ckpt / "consolidated.00.pth", ns=(0, 0))   # the model retrained in place (as size and time tell): rebuilt
    rebuilt = again()
    assert rebuilt["config"]["quality_model"] != meta["config"]["quality_model"]
    assert rebuilt["train"] == meta["train"]


def test_model_stamp_covers_a_hugging_face_downloads_tokenizer(tmp_path):
    """(review, helper) model_stamp (prepare_data's check that the --quality_model is the one its cache was built with)
    stamped the folder's own files only: a Hugging Face download's tokenizer is original/tokenizer.model (what
    model.tokenizer_path reads), so replacing it kept the old cache, filtered with the other tokenizer's ids."""
    hf = tmp_path / "hf"
    (hf / "original").mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    (hf / "original" / "tokenizer.model").write_text("a")
    before = data.model_stamp(str(hf))
    (hf / "original" / "tokenizer.model").write_text("another")
    assert data.model_stamp(str(hf)) != before
    (hf / "tokenizer.model").write_text("b")   # one in the folder is the one read: original/'s is not used then
    before = data.model_stamp(str(hf))
    os.utime(hf / "original" / "tokenizer.model", ns=(0, 0))
    assert data.model_stamp(str(hf)) == before


def test_prepare_data_failing_half_way_keeps_the_old_dataset(corpus, tmp_path):
    """A build refused half-way (a file of the source found bad when read, shards already written) leaves the
    old dataset's files as they were. A lone surrogate in a JSON string is cleaned (U+FFFD), not a crash; a
    meta.json that is JSON but no object is a damaged cache, rebuilt."""
    root, docs, tok_path = corpus
    src, out = tmp_path / "src", str(tmp_path / "out")
    src.mkdir()
    for i, d in enumerate(docs[:60]):
        (src / f"{i:03d}.txt").write_text(d)
    build = lambda: data.prepare_data(str(src), tok_path, out, val_fraction=0.1, num_proc=1,  # noqa: E731
                                      shard_tokens=300, chunk_bytes=2000, verbose=False)
    meta = build()
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    assert len(meta["train"]["shards"]) > 3
    (src / "999.txt").write_bytes(b"good text, then \xff\xfe bytes")   # read last, after shards were written
    with pytest.raises(ValueError, match=r"999.txt: not UTF-8"):
        build()
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == before
    (src / "999.txt").unlink()
    for bad in ("null", "[]"):
        with open(os.path.join(out, "meta.json"), "w") as f:
            f.write(bad)
        assert build()["train"] == meta["train"]
    (src / "999.jsonl").write_text(json.dumps({"text": docs[60] + " a lone surrogate \ud800 here"}) + "\n")
    meta = data.prepare_data(str(src), tok_path, out, val_fraction=0, num_proc=1, verbose=False)
    assert meta["train"]["docs"] == 61 and sorted(os.listdir(out)) == ["meta.json", "train_000.bin"]
    assert any("a lone surrogate \ufffd here" in d for d in read_docs(out, "train", Tokenizer.load(tok_path)))


def test_a_build_stopped_while_its_shards_move_in_leaves_no_meta_json(corpus, tmp_path, monkeypatch):
    """The new shards replace the old ones after the old meta.json is gone, and the new one is written last: a build
    stopped half-way through the moves leaves a folder without meta.json (refused by the loader, rebuilt by the next
    call), never a meta.json beside shards it does not describe."""
    root, docs, tok_path = corpus
    src, out = tmp_path / "src", str(tmp_path / "out")
    src.mkdir()
    for i, d in enumerate(docs[:40]):
        (src / f"{i:03d}.txt").write_text(d)
    build = lambda **kw: data.prepare_data(str(src), tok_path, out, num_proc=1, shard_tokens=500,  # noqa: E731
                                           verbose=False, **kw)
    meta = build(val_fraction=0.1)
    assert len(meta["train"]["shards"]) > 2
    replace = os.replace

    def stopped(a, b):
        if os.path.basename(os.path.dirname(a)) == "building" and b == os.path.join(out, "train_001.bin"):
            raise KeyboardInterrupt
        replace(a, b)
    monkeypatch.setattr(os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        build(val_fraction=0.2)
    assert os.path.exists(os.path.join(out, "train_000.bin")) and not os.path.exists(os.path.join(out, "meta.json"))
    with pytest.raises(FileNotFoundError, match="meta.json"):
        data.PackedLoader(out, "train", 2, 8)
    monkeypatch.setattr(os, "replace", replace)
    assert build(val_fraction=0.2)["config"]["val_fraction"] == 0.2 and "building" not in os.listdir(out)


def test_check_folder_notes_and_refusals(tmp_path):
    """train.py's check of a --data folder (its refusals of another source or blocklist run in test_train.py): a
    source edited since is a warning, a meta.json of an older data.py (no CRC-32s) a note, one without its config
    or with a split that is no object refused by name."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("a document")
    meta = {"config": {"source": str(docs), "source_stamp": data.source_stamp(str(docs))},
            "train": {"crc32": [], "tokens": 0}, "val": {"tokens": 0, "bytes": 0}}   # (what train.py reads)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert data.check_folder(str(tmp_path), f"{docs}/") == (meta, [])
    os.utime(docs / "a.txt", ns=(0, 0))
    (tmp_path / "meta.json").write_text(json.dumps(dict(meta, train={"tokens": 0})))
    warning, note = data.check_folder(str(tmp_path))[1]
    assert warning.startswith(f"warning: {docs}'s files changed"), warning
    assert note.startswith(f"note: {tmp_path}/meta.json has no CRC-32s"), note
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(ValueError, match=r"meta.json: not a meta.json of data.py \(KeyError: 'config'\)"):
        data.check_folder(str(tmp_path))
    (tmp_path / "meta.json").write_text(json.dumps(dict(meta, val=[3])))  # (by hand: a traceback, in the loader)
    with pytest.raises(ValueError, match=r'not a meta.json of data.py \(TypeError: its "val" is \[3\], not what '
                                         r'data.py writes there\)'):
        data.check_folder(str(tmp_path))


def test_a_hand_edited_meta_json_is_refused_by_key(corpus, tmp_path):
    """(review, helper) A meta.json edited by hand ("train": [], "source": null, no "fingerprint", a shard named by a
    number) crashed check_folder, PackedLoader and prepare_data's reuse check with a bare KeyError or TypeError, or
    was half-read (a split without its token count, reused). Now check_folder and PackedLoader name the file and the
    key; prepare_data takes it for a damaged cache, and rebuilds it as it does an unreadable one."""
    root, docs, tok_path = corpus
    out = str(tmp_path / "out")
    build = lambda: data.prepare_data(str(root / "docs.jsonl"), tok_path, out, val_fraction=0.1, num_proc=1,  # noqa
                                      verbose=False)
    meta, path = build(), os.path.join(out, "meta.json")
    for edit, key in ((dict(train=[]), "train"), (dict(config=dict(meta["config"], source=None)), "config.source"),
                      (dict(fingerprint=None), "fingerprint"), (dict(vocab_size="600"), "vocab_size"),
                      (dict(vocab_size=True), "vocab_size"),   # (a bool is an int to isinstance: no vocabulary size)
                      (dict(train=dict(meta["train"], shards=[0])), "train.shards"),
                      (dict(train=dict(meta["train"], crc32=7)), "train.crc32"),
                      (dict(config=dict(meta["config"], blocklist=["x"])), "config.blocklist")):
        with open(path, "w") as f:
            json.dump(dict(meta, **edit), f)
        for read in (lambda: data.check_folder(out), lambda: data.PackedLoader(out, "train", 2, 8)):
            with pytest.raises(ValueError, match=rf'meta\.json: not a meta\.json of data\.py \(TypeError: its "{key}"'):
                read()
    for gone, read in (("fingerprint", lambda: data.PackedLoader(out, "train", 2, 8)),
                       ("config", lambda: data.check_folder(out)), ("val", lambda: data.check_folder(out))):
        with open(path, "w") as f:
            json.dump({k: v for k, v in meta.items() if k != gone}, f)
        with pytest.raises(ValueError, match=rf"meta\.json: not a meta\.json of data\.py \(KeyError: '{gone}"):
            read()
    for edit in (dict(train=[]), dict(train=dict(meta["train"], crc32=7)), dict(val=dict(meta["val"], tokens=None))):
        with open(path, "w") as f:
            json.dump(dict(meta, **edit), f)
        assert build()["val"] == meta["val"]   # rebuilt (a reused one had no val token count)


def test_optional_sources(tmp_path, monkeypatch, corpus, capsys):
    """parquet and hf: are real code paths; here they run on local stand-ins (no network in tests)."""
    class FakeDatasets:  # the slice of the `datasets` API iter_documents uses
        @staticmethod
        def load_dataset(name, config, split, streaming):
            assert (name, config, split, streaming) == ("org/web", "sample", "train", True)
            return iter([{"text": "first"}, {"text": None}, {"url": "x"}, {"text": "second"}])
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    assert list(data.iter_documents("hf:org/web:sample")) == ["first", "second"]  # rows without text: counted
    assert "hf:org/web:sample: skipped 2 record(s) without a string 'text'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ImportError, match="needs the datasets package"):
        list(data.iter_documents("hf:org/web"))
    with pytest.raises(ImportError, match="needs the datasets package"):  # before any folder is made
        data.prepare_data("hf:org/web", corpus[2], str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # not installed (whether it is here or not)
    with pytest.raises(ImportError, match="t.parquet: reading parquet needs pyarrow"):
        list(data.iter_documents(str(path)))
    # a corrupt JSONL line stops prepare_data with the file and line, also with worker processes
    root, docs, tok_path = corpus
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:20]) + "{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:21: not valid JSON"):
        data.prepare_data(str(bad), tok_path, str(tmp_path / "out"), num_proc=2, verbose=False)
    assert not os.path.exists(tmp_path / "out" / "meta.json")


def test_parquet_source(tmp_path, capsys):
    pyarrow = pytest.importorskip("pyarrow")  # an optional extra: a skip, shown as one, where it is missing
    import pyarrow.parquet as pq
    pq.write_table(pyarrow.table({"text": ["a", None, "b"], "id": [1, 2, 3]}), tmp_path / "t.parquet")
    assert list(data.iter_documents(str(tmp_path / "t.parquet"))) == ["a", "b"]
    assert "t.parquet: skipped 1 record(s) without a string 'text'" in capsys.readouterr().err


def test_last_window_needs_a_target_after_it(tmp_path):
    """n tokens make (n - 1) // T windows: with n a multiple of T, the last T tokens have no target for their last
    position, so they are not a window; exactly T tokens are not even one."""
    T = 8
    tokens = np.arange(1, 4 * T + 1, dtype=np.uint32)
    tokens[[0, 13]] = BOS
    write_split(tmp_path, "train", tokens, shard_tokens=1000)
    loader = data.PackedLoader(str(tmp_path), "train", 1, T)
    assert loader.n_windows == 3
    starts = []
    for _ in range(3):
        x, y, _ = loader.next_batch()
        assert x.shape == y.shape == (1, T)
        starts.append(window_start(x[0].numpy()))
    assert sorted(starts) == [0, T, 2 * T]
    write_split(tmp_path, "train", tokens[:T + 1], shard_tokens=1000)  # T + 1 tokens: one window, its target the last
    x, y, _ = data.PackedLoader(str(tmp_path), "train", 1, T).next_batch()
    assert torch.equal(y[0], torch.from_numpy(tokens[1:T + 1].astype(np.int64)))
    write_split(tmp_path, "train", tokens[:T], shard_tokens=1000)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        data.PackedLoader(str(tmp_path), "train", 1, T)


def test_minhash_threshold_is_inclusive():
    """A candidate whose signature agrees with a kept one on exactly `threshold` of its entries is a duplicate."""
    dedup = data.MinHashDedup()  # 120 entries, 20 bands of 6 rows, threshold 0.8
    a = np.random.default_rng(0).integers(0, 2**31, 120).astype(np.uint32)
    assert not dedup.is_duplicate(a)
    at, below = a.copy(), a.copy()
    at[6:30] += 1     # 96 of 120 agree: exactly 0.8; band 0 (entries 0-5) still matches, so it is a candidate
    below[6:31] += 1  # 95 of 120
    assert dedup.is_duplicate(at)
    assert not dedup.is_duplicate(below)


def test_damaged_token_ids_are_refused_naming_the_shard(tmp_path):
    """A token id no tokenizer made (a flipped high bit) stops the loader with the shard's name, not the
    embedding with an index error."""
    tokens = np.arange(1, 41, dtype=np.uint32)
    tokens[[0, 20]] = BOS
    write_split(tmp_path, "train", tokens, shard_tokens=20)  # two shards of 20 (vocabulary: 2^31 ids)
    raw = bytearray((tmp_path / "train_001.bin").read_bytes())
    raw[data.HEADER.size + 4 * 5 + 3] ^= 0x80  # the highest bit of the second shard's token 5: 26 + 2^31
    (tmp_path / "train_001.bin").write_bytes(bytes(raw))
    loader = data.PackedLoader(str(tmp_path), "train", 4, 8)  # one batch covers every window
    with pytest.raises(ValueError, match=r"train_001\.bin: token id 2147483674 is not below the tokenizer's"):
        loader.next_batch()
    tokens[[0, 20]] = BOS
    tokens[[25, 39]] = tokens[[39, 25]]   # id 40 in a window (the last token is in none): one past the last of 40 ids
    write_split(tmp_path, "train", tokens, shard_tokens=20, vocab_size=41)
    data.PackedLoader(str(tmp_path), "train", 4, 8).next_batch()
    write_split(tmp_path, "train", tokens, shard_tokens=20, vocab_size=40)
    with pytest.raises(ValueError, match=r"train_001\.bin: token id 40 is not below the tokenizer's 40 ids"):
        data.PackedLoader(str(tmp_path), "train", 4, 8).next_batch()


def test_padded_shard_is_refused(tmp_path):
    path = str(tmp_path / "s.bin")
    data.write_shard(path, np.array([BOS, 5, 6], dtype=np.uint32), 100, BOS, "abc")
    with open(path, "ab") as f:
        f.write(np.array([7], dtype="<u4").tobytes())  # a token the header does not count
    with pytest.raises(ValueError, match=r"s\.bin: truncated or padded: header says 3 tokens"):
        data.read_shard(path)


def test_cli_mistyped_paths_are_one_line(corpus, tmp_path):
    """`python data.py` with a --source, --tokenizer or --dirty_words that is not there: a one-line message naming
    it. (--help too prints, which a '%' in a flag's help breaks.)"""
    import subprocess
    root, _, tok_path = corpus
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = str(root / "docs.jsonl")
    for extra, what in ((["--source", str(tmp_path / "corpuz"), "--tokenizer", tok_path],
                         f"source {str(tmp_path / 'corpuz')!r}: not"),
                        (["--source", source, "--tokenizer", tok_path + "x"], tok_path + "x"),
                        (["--source", source, "--tokenizer", tok_path, "--dirty_words", "wordz.txt"], "wordz.txt")):
        r = subprocess.run([sys.executable, os.path.join(repo, "data.py"), *extra, "--out", str(tmp_path / "out")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and what in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, os.path.join(repo, "data.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--dirty_words" in r.stdout, r.stderr


@pytest.fixture
def two_folders(tmp_path):
    folders = []
    for i in range(2):
        d = tmp_path / f"s{i}"
        d.mkdir()
        tokens, _ = synthetic_stream(50, np.random.default_rng(i))
        write_split(d, "train", tokens, shard_tokens=300)
        folders.append(str(d))
    return folders


def test_state_of_a_loader_built_with_numpy_ints_survives_json_and_weights_only_load(two_folders):
    """(a review) PackedLoader accepts numpy integers (test_loader_arguments_are_checked), but its state held
    numpy.int64 (windows, seq_len): json.dumps raised and torch.load(weights_only=True) refuses the checkpoint."""
    ld = data.PackedLoader(two_folders[0], "train", np.int64(2), np.int64(16))
    ld.next_batch()
    sd = ld.state_dict()
    json.dumps(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True) == sd
    mix = data.MixedLoader([data.PackedLoader(f, "train", np.int64(2), np.int64(16)) for f in two_folders], [1, 1])
    mix.next_batch()
    json.dumps(mix.state_dict())


def test_mixed_loader_refuses_weights_whose_sum_overflows(two_folders):
    """Each weight is finite and > 0 but their sum is inf: p = [0, 0]; accepted, then every next_batch raises
    numpy's 'Probabilities do not sum to 1'. Refused at construction like [1, inf] is."""
    loaders = [data.PackedLoader(f, "train", 2, 8) for f in two_folders]
    with pytest.raises(ValueError, match="MixedLoader"):
        data.MixedLoader(loaders, [1e308, 1e308])


def test_prepare_data_takes_numpy_integers_and_loses_nothing(corpus, tmp_path):
    """Sizes given as numpy integers (accepted as integers, as PackedLoader's are) build a folder: its meta.json
    was written only after the old dataset had gone, and json cannot write an np.int64 (a TypeError left shards
    and no meta.json)."""
    root, docs, tok_path = corpus
    out = str(tmp_path / "out")
    meta = data.prepare_data(str(root / "docs.jsonl"), tok_path, out, val_fraction=0.1, num_proc=1,
                             shard_tokens=2000, verbose=False)
    again = data.prepare_data(str(root / "docs.jsonl"), tok_path, out, val_fraction=np.float32(0.1), num_proc=1,
                              shard_tokens=np.int64(1500), max_docs=np.int64(1000), verbose=False)
    assert data.read_meta(os.path.join(out, "meta.json")) == again
    assert again["config"]["shard_tokens"] == 1500 and again["train"]["docs"] == meta["train"]["docs"]


def test_a_folder_filtered_by_a_labeller_is_not_reused_without_it(corpus, tmp_path):
    """labeller= filters the shards, but the cache key did not say so: the next call without it (the same
    settings otherwise) returned the filtered folder as up to date."""
    root, docs, tok_path = corpus
    src = tmp_path / "src"
    src.mkdir()
    for i, d in enumerate(docs[:60]):
        (src / f"{i:03d}.txt").write_text(d)
    build = lambda **kw: data.prepare_data(str(src), tok_path, str(tmp_path / "q"), val_fraction=0,  # noqa: E731
                                           num_proc=1, quality_sample=60, quality_drop=0.5, verbose=False, **kw)
    filtered = build(labeller=lambda texts: [len(t) for t in texts])
    assert filtered["removed"]["quality"]["docs"] >= 20
    reverse = build(labeller=lambda texts: [-len(t) for t in texts])   # another labeller: rebuilt (none is compared)
    assert reverse["train"]["crc32"] != filtered["train"]["crc32"]
    plain = build()
    assert "quality" not in plain["removed"] and plain["train"]["docs"] == 60


def test_prepare_data_rebuilds_for_another_tokenizer_a_missing_shard_or_a_crc_short(corpus, tmp_path):
    """The cache is reused only when its tokenizer is the one given (the tokenizer's path is not in the config: a
    folder made with another one was returned, ids of another vocabulary), and every shard meta.json lists is there
    with its CRC-32 (a missing shard was a FileNotFoundError, a CRC-32 list one short left the last shard unchecked)."""
    root, docs, tok_path = corpus
    src, out = tmp_path / "src", str(tmp_path / "out")
    src.mkdir()
    for i, d in enumerate(docs[:40]):
        (src / f"{i:03d}.txt").write_text(d)
    other = str(tmp_path / "other.model")
    Tokenizer.train(docs[:40], 256 + 256 + 8).save(other)
    build = lambda tok=tok_path: data.prepare_data(str(src), tok, out, val_fraction=0.1, num_proc=1,  # noqa: E731
                                                   shard_tokens=500, verbose=False)
    meta = build()
    train = read_docs(out, "train", Tokenizer.load(tok_path))
    assert len(meta["train"]["shards"]) > 2
    theirs = build(other)   # the same documents in the other tokenizer's ids
    assert theirs["fingerprint"] == Tokenizer.load(other).fingerprint() != meta["fingerprint"]
    assert read_docs(out, "train", Tokenizer.load(other)) == train
    timeless = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    assert timeless(build()) == timeless(meta)   # and back
    os.remove(os.path.join(out, meta["train"]["shards"][1]))
    assert timeless(build()) == timeless(meta) and os.path.exists(os.path.join(out, meta["train"]["shards"][1]))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(dict(meta, train=dict(meta["train"], crc32=meta["train"]["crc32"][:-1])), f)
    assert build()["train"]["crc32"] == meta["train"]["crc32"]


def test_prepare_data_bounds_val_fraction_and_refuses_a_source_with_no_train_documents(corpus, tmp_path):
    """val_fraction f sends 1 in round(1 / f) documents to val (0.15: 1 in 7, not int's 6), f within [0, 0.5];
    line_dedup is a count, no bool; a source none of whose documents survive is refused, its folder not made."""
    root, docs, tok_path = corpus
    src = tmp_path / "src"
    src.mkdir()
    for i, d in enumerate(docs[:60]):
        (src / f"{i:03d}.txt").write_text(d)
    out = str(tmp_path / "out")
    data.prepare_data(str(src), tok_path, out, val_fraction=0.15, num_proc=1, verbose=False)
    cleaned = [data.clean_text(d) for d in docs[:60]]
    assert read_docs(out, "val", Tokenizer.load(tok_path)) == [d for d in cleaned if data.is_val(data.doc_hash(d), 7)]
    for kw, what in ((dict(val_fraction=0.6), "val_fraction=0.6"), (dict(line_dedup=True), "line_dedup=True")):
        with pytest.raises(ValueError, match=what):
            data.prepare_data(str(src), tok_path, out, num_proc=1, verbose=False, **kw)
    with pytest.raises(FileNotFoundError, match="no tokenizer there"):  # 0.5 passes (then the tokenizer is missing)
        data.prepare_data(str(src), tok_path + "x", out, val_fraction=0.5, verbose=False)
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps({"text": f"tiny {i}"}) + "\n" for i in range(5)))
    with pytest.raises(ValueError, match="no document survived filtering into the train split"):
        data.prepare_data(str(tmp_path / "tiny.jsonl"), tok_path, str(tmp_path / "t"), num_proc=1, verbose=False)
    assert not os.path.exists(tmp_path / "t")


@pytest.mark.parametrize("name", ["max_docs", "num_proc"])
def test_zero_max_docs_or_processes_is_refused_by_name(corpus, tmp_path, name):
    """0 passed the positive-integer check as if it were None (max_docs=0 read nothing and blamed the source:
    'has no documents'; num_proc=0 took the default)."""
    root, docs, tok_path = corpus
    with pytest.raises(ValueError, match=rf"{name}=0: must be a positive integer"):
        data.prepare_data(str(root / "docs.jsonl"), tok_path, str(tmp_path / "out"), verbose=False, **{name: 0})
    assert not os.path.exists(tmp_path / "out")


def test_jsonl_with_a_byte_order_mark_reads(tmp_path):
    """A Windows editor's JSONL starts with a BOM (align.py's reader skips it): its first record is read, not
    refused as 'not valid JSON ... is the file truncated?'; CR LF line ends too."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "one"}\r\n{"text": "two"}\r\n')
    assert list(data.iter_documents(str(path))) == ["one", "two"]
    with gzip.open(tmp_path / "bom.jsonl.gz", "wb") as f:
        f.write(path.read_bytes())
    assert list(data.iter_documents(str(tmp_path / "bom.jsonl.gz"))) == ["one", "two"]


@pytest.mark.parametrize("value", ["1" * 5000, "[" * 100_000 + "]" * 100_000], ids=["5000_digits", "deep"])
def test_jsonl_line_pythons_json_cannot_hold_is_named_by_file_and_line(tmp_path, value):
    """Valid JSON that Python's json refuses (a number over 4,300 digits, arrays nested past the recursion limit)
    is an error naming file:line like any unreadable line, not a bare ValueError or RecursionError naming neither."""
    path = tmp_path / "odd.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "x", "id": ' + value + '}\n')
    with pytest.raises(ValueError, match=r"odd\.jsonl:2: "):
        list(data.iter_documents(str(path)))


def test_folder_whose_name_glob_reads_as_a_pattern(tmp_path):
    """A folder named 'corpus[2024]' is read as itself: glob took the brackets as a pattern (matching 'corpus2/'),
    so its files were not found ('no .txt ... files in this folder'), or another folder's were read."""
    folder = tmp_path / "corpus[2024]"
    folder.mkdir()
    (folder / "a.txt").write_text("mine")
    (tmp_path / "corpus2").mkdir()
    (tmp_path / "corpus2" / "b.txt").write_text("another folder's")
    assert list(data.iter_documents(str(folder))) == ["mine"]
    assert data.source_files(str(folder)) == [str(folder / "a.txt")]


def test_folder_with_symlinks_back_up_reads_each_file_once(tmp_path):
    """A symlink to a folder a file is in (a loop) is not followed: glob's '**' followed it ~40 deep, every file
    read 41 times; two such links made 2^40 paths (a hang). Other symlinked folders are still read, as before."""
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("b")
    os.symlink("..", tmp_path / "sub" / "up")
    outside = tmp_path.parent / (tmp_path.name + "_linked")
    outside.mkdir()
    (outside / "c.txt").write_text("c")
    os.symlink(outside, tmp_path / "linked")
    want = [str(tmp_path / "a.txt"), str(tmp_path / "linked" / "c.txt"), str(tmp_path / "sub" / "b.txt")]
    assert data.source_files(str(tmp_path)) == want
    os.symlink(str(tmp_path), tmp_path / "sub" / "top")  # a second loop (absolute)
    assert data.source_files(str(tmp_path)) == want
    assert list(data.iter_documents(str(tmp_path))) == ["a", "c", "b"]


def test_folder_that_cannot_be_listed_is_an_error_not_left_out(tmp_path, monkeypatch):
    """A subfolder the user may not read (another user's, mode 000) stops the read naming it: glob left it out
    without a word, and the corpus was built from part of the source."""
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "b.txt").write_text("b")
    scandir = os.scandir

    def refuse(path="."):  # (the tests may run as root, whom chmod 000 does not stop)
        if os.path.basename(os.fspath(path).rstrip(os.sep)) == "private":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.raises(PermissionError, match="private"):
        data.source_files(str(tmp_path))


def test_cli_out_that_is_a_file_is_one_line(corpus, tmp_path):
    """(review, helper) `python data.py --out FILE` (a file, not a folder) ended in a NotADirectoryError traceback."""
    import subprocess
    root, _, tok_path = corpus
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "notes.txt").write_text("mine")
    r = subprocess.run([sys.executable, os.path.join(repo, "data.py"), "--source", str(root / "docs.jsonl"),
                        "--tokenizer", tok_path, "--out", str(tmp_path / "notes.txt")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "notes.txt: a file, not a folder" in r.stderr and "Traceback" not in r.stderr, \
        r.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_quality_drop_without_quality_model_is_refused(corpus, tmp_path):
    """(review, helper) --quality_drop is the share the --quality_model filter drops: without a model it was silently
    ignored (though, being in the folder's config, it made an up-to-date folder build again)."""
    import subprocess
    root, _, tok_path = corpus
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(repo, "data.py"), "--source", str(root / "docs.jsonl"),
                        "--tokenizer", tok_path, "--out", str(tmp_path / "out"), "--quality_drop", "0.3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--quality_drop goes with --quality_model" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
