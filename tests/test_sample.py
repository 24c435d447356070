"""sample.py: sampling filters, batched generation against a no-cache reference, streaming, the CLI.

    python -m pytest -q tests/test_sample.py
"""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import model as M
import sample
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "hello world, the quick brown fox jumps over the lazy dog. 日本語 café naïve 🦙 llama. " * 20


def tiny_model(vocab_size=97, max_seq_len=64, **kw):
    m = M.Transformer(M.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                                  multiple_of=16, rope_theta=10000.0, max_seq_len=max_seq_len, **kw))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.15)  # peaked enough that greedy continuations differ from prompt to prompt
    return m


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], vocab_size=600)


def reference_continuation(m, prompt, n, stop_ids=()):
    """Greedy decoding with a full forward over the whole sequence at every step (no cache)."""
    seq, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logp = torch.log_softmax(m(torch.tensor([seq]))[0, -1], -1)
            t = int(logp.argmax())
            seq.append(t)
            logprobs.append(logp[t].item())
            if t in stop_ids:
                break
    return seq[len(prompt):], logprobs


def reference_sampled(m, prompts, n, generator, **kw):
    """n tokens per prompt drawn by sample_next (kw: temperature, top_k, top_p) from a full forward's logits at every
    step (no cache), all rows at once with `generator`: what generate and Session.stream draw with its same seed."""
    seqs = [list(p) for p in prompts]
    with torch.no_grad():
        for _ in range(n):
            logits = torch.stack([m(torch.tensor([s]))[0, -1] for s in seqs])
            for s, t in zip(seqs, sample.sample_next(logits, generator=generator, **kw).tolist()):
                s.append(t)
    return [s[len(p):] for s, p in zip(seqs, prompts)]


# ---------------------------------------------------------------------------------------------- sampling

def test_sample_next_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.9]])
    assert sample.sample_next(logits, temperature=0).tolist() == [1, 2]
    assert sample.sample_next(logits, top_k=1, generator=g).tolist() == [1, 2]
    assert sample.sample_next(logits, top_p=1e-6, generator=g).tolist() == [1, 2]
    draws = torch.stack([sample.sample_next(logits, top_k=2, generator=g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 2} and set(draws[:, 1].tolist()) == {2, 3}
    # top_p: row 0 has probs ~[.09, .67, .24, .03]; 0.7 keeps the tokens needed to pass 0.7: {1, 2}
    draws = torch.stack([sample.sample_next(logits[:1], top_p=0.7, generator=g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 2}
    # at a tie, Meta's rule (sample_top_p: drop where the mass ranked above passes p): probs exactly [.5, .25, .25]
    # and p = 0.5 keep tokens 0 and 1 (a >= there would keep token 0 alone, as Hugging Face's warper does)
    draws = torch.stack([sample.sample_next(torch.tensor([[.5, .25, .25]]).log(), top_p=0.5, generator=g)
                         for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {0, 1}
    # temperature: a high one flattens the distribution, to softmax(logits / 5) ~[.22, .33, .27, .18] (at 1: token 1
    # has .64, token 3 .03). 300 draws: each frequency's std is <= sqrt(.25 / 300) ~ .029, so 4 std is .115
    draws = torch.stack([sample.sample_next(logits[:1], temperature=5.0, generator=g) for _ in range(300)])
    freq = torch.bincount(draws[:, 0], minlength=4) / 300
    assert (freq - torch.softmax(logits[0] / 5.0, -1)).abs().max() < 0.115, freq


def test_sampling_arguments_are_checked():
    """align.py calls generate directly, past the CLI's checks: a negative temperature would favour the least likely
    tokens, top_k 0 and top_p 0 used to fail deep inside torch."""
    logits = torch.tensor([[5.0, 0.0, -5.0]])
    for kw, message in [(dict(temperature=-1.0), "temperature=-1.0: must be >= 0"),
                        (dict(temperature=float("nan")), "temperature=nan"), (dict(top_k=0), "top_k=0: must be"),
                        (dict(top_k=-1), "top_k=-1"), (dict(top_k=2.5), "top_k=2.5"),
                        (dict(top_p=0.0), r"top_p=0.0: must be within \(0, 1\]"), (dict(top_p=1.5), "top_p=1.5")]:
        with pytest.raises(ValueError, match=message):
            sample.sample_next(logits, **kw)
    m = tiny_model()
    with pytest.raises(ValueError, match="temperature=-0.5"):
        sample.generate(m, [[1, 2]], 3, temperature=-0.5)
    assert m.layers[0].attention.cache_k is None  # the cache was freed on the way out
    # a tiny temperature is greedy, not NaN: the largest logit is moved to 0 before dividing
    assert sample.sample_next(logits, temperature=1e-45).tolist() == [0]
    assert sample.sample_next(logits, top_k=np.int64(1)).tolist() == [0]  # a numpy integer is an integer
    assert sample.sample_next(logits, temperature=0, top_k=3, top_p=1.0).tolist() == [0]  # the ends of the ranges


# ---------------------------------------------------------------------------------------------- generate

def test_generate_ragged_batch_matches_reference():
    m = tiny_model()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42], [9, 8, 7, 6]]
    tokens, logprobs = sample.generate(m, prompts, max_new_tokens=8, temperature=0)
    for p, t, lp in zip(prompts, tokens, logprobs):
        ref_t, ref_lp = reference_continuation(m, p, 8)
        assert t == ref_t
        assert lp == pytest.approx(ref_lp, abs=1e-4)
    assert len({tuple(t) for t in tokens}) > 1


def test_generate_through_a_replayed_step_matches_eager_decoding(monkeypatch):
    """What generate does with a CUDA graph, on CPU: an imitation of cuda_graphed with its semantics (inputs
    copied into buffers made at capture, one warm-up call that writes the first decode position's cache slots
    with a dummy token, the same output tensor returned every time) gives eager decoding's tokens and
    log-probs, for ragged and for equal-length prompts (which then decode at per-row positions)."""
    def imitation(fn, *args):
        static = [a.clone() for a in args]
        fn(*static)  # the warm-up
        out = fn(*static).clone()

        def replay(*new):
            for buffer, value in zip(static, new):
                buffer.copy_(value)
            return out.copy_(fn(*static))
        return replay
    m = tiny_model()
    for prompts in ([[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42], [9, 8, 7, 6]], [[5, 6, 7], [9, 8, 7]]):
        eager = sample.generate(m, prompts, max_new_tokens=20, temperature=0)
        with monkeypatch.context() as patch:
            patch.setattr(sample, "GRAPH_DEVICES", ("cpu",))
            patch.setattr(sample, "cuda_graphed", imitation)
            replayed = sample.generate(m, prompts, max_new_tokens=20, temperature=0)
        assert replayed[0] == eager[0] and len({tuple(t) for t in eager[0]}) > 1
        for a, b in zip(replayed[1], eager[1]):
            assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the decode step as a CUDA graph")
def test_generate_on_cuda_replays_a_graph_that_matches_eager_decoding(monkeypatch):
    """On a GPU generate captures its decode step once and replays it for every token: the same tokens and
    log-probs as decoding eagerly (ragged prompts: the very same kernels, so equal; equal lengths, where eager
    takes the shared-position path, to 1e-4), with no fallback warning; stop tokens still end each row."""
    import warnings
    m = tiny_model().cuda()
    real, captured = sample.cuda_graphed, []
    monkeypatch.setattr(sample, "cuda_graphed", lambda *a: captured.append(1) or real(*a))
    for prompts in ([[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42], [9, 8, 7, 6]], [[5, 6, 7], [9, 8, 7]]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            graphed = sample.generate(m, prompts, max_new_tokens=20, temperature=0)
        monkeypatch.setattr(sample, "GRAPH_MIN_TOKENS", 10**9)
        eager = sample.generate(m, prompts, max_new_tokens=20, temperature=0)
        monkeypatch.setattr(sample, "GRAPH_MIN_TOKENS", 16)
        assert graphed[0] == eager[0] and len({tuple(t) for t in graphed[0]}) > 1
        exact = len({len(p) for p in prompts}) > 1
        for a, b in zip(graphed[1], eager[1]):
            assert a == (b if exact else pytest.approx(b, abs=1e-4))
    assert len(captured) == 2
    stop = {graphed[0][0][4]}
    tokens, _ = sample.generate(m, prompts, max_new_tokens=20, temperature=0, stop_ids=stop)
    assert tokens[0] == graphed[0][0][:graphed[0][0].index(graphed[0][0][4]) + 1]


def test_generate_stops_each_row_at_its_stop_token():
    m = tiny_model()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]
    free, _ = sample.generate(m, prompts, max_new_tokens=10, temperature=0)
    stop = {free[0][2]}  # row 0 hits it at its third token; the others wherever (or never)
    tokens, logprobs = sample.generate(m, prompts, max_new_tokens=10, temperature=0, stop_ids=stop)
    for row_free, row, lp in zip(free, tokens, logprobs):
        cut = next((i + 1 for i, t in enumerate(row_free) if t in stop), len(row_free))
        assert row == row_free[:cut] and len(lp) == len(row)
    assert len(tokens[0]) == 3


def test_generate_sampled_logprobs_and_seed():
    m = tiny_model()
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    a = sample.generate(m, prompts, 12, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(7))
    b = sample.generate(m, prompts, 12, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(7))
    assert a == b
    # generate's docstring: each log-prob is under the model's plain softmax at temperature 1, whatever the sampling
    # temperature; checked with a full forward, and at 0.7 too, where log_softmax(logits / T) would differ
    c = sample.generate(m, prompts, 12, temperature=0.7, top_k=20, top_p=0.9,
                        generator=torch.Generator().manual_seed(7))
    # the draws are sample_next's, with every filter given, on the logits of a full forward (same seed: same tokens)
    for got, kw in [(a, dict(temperature=1.0, top_k=20)), (c, dict(temperature=0.7, top_k=20, top_p=0.9))]:
        assert got[0] == reference_sampled(m, prompts, 12, torch.Generator().manual_seed(7), **kw)
    for p, t, lp in [*zip(prompts, *a), *zip(prompts, *c)]:
        with torch.no_grad():
            logp = torch.log_softmax(m(torch.tensor([p + t]))[0], -1)[len(p) - 1:-1]
        ref = logp.gather(-1, torch.tensor(t)[:, None]).squeeze(-1)
        assert lp == pytest.approx(ref.tolist(), abs=1e-4)


def test_generate_restores_mode_and_checks_length():
    m = tiny_model().train()
    sample.generate(m, [[1, 2]], 3)
    assert m.training and m.layers[0].attention.cache_k is None
    m.eval()
    sample.generate(m, [[1, 2]], 3)
    assert not m.training
    with pytest.raises(ValueError, match="a prompt of 60 tokens \\+ 5 new tokens exceeds the model's max_seq_len 64"):
        sample.generate(m, [[1] * 60], 5)
    with pytest.raises(ValueError, match="no empty prompt"):
        sample.generate(m, [[1], []], 5)
    with pytest.raises(ValueError, match="max_new_tokens -1 < 0"):   # (was: a KV cache message)
        sample.generate(m, [[1, 2]], -1)
    V = m.args.vocab_size   # (was: IndexError, index out of range in self, naming no id; a device assert on CUDA)
    with pytest.raises(ValueError, match=f"prompt 1 holds token id {V}, outside the model's vocabulary of {V}"):
        sample.generate(m, [[1, 2], [3, V, 4]], 3)
    with pytest.raises(ValueError, match="prompt 0 holds token id -1"):
        sample.generate(m, [[1, -1, V - 1]], 3)


# ---------------------------------------------------------------------------------------------- session, streaming

def test_session_keeps_the_conversation_in_the_cache():
    m = tiny_model().eval()
    s = sample.Session(m, 64)
    s.tokens = [1, 2, 3, 4]
    first = list(s.stream(5, temperature=0))
    s.tokens += [7, 8, 9]  # the next turn: only these and the last sampled token are fed
    second = list(s.stream(4, temperature=0))
    assert s.cached == len(s.tokens) - 1
    ref_first, _ = reference_continuation(m, [1, 2, 3, 4], 5)
    ref_second, _ = reference_continuation(m, [1, 2, 3, 4] + first + [7, 8, 9], 4)
    assert (first, second) == (ref_first, ref_second)
    stop = {second[1]}
    s.tokens, s.cached = [1, 2, 3, 4] + first + [7, 8, 9], 0
    assert list(s.stream(4, temperature=0, stop_ids=stop)) == second[:2]
    s.tokens, s.cached = list(range(60)), 0
    assert len(list(s.stream(10, temperature=0))) == 4  # the cache ends at 64


def test_session_stream_samples_as_sample_next_does():
    """stream passes its temperature, top-k, top-p and generator to sample_next: a seeded stream draws the tokens
    sample_next draws from a full forward's logits with the same seed."""
    m = tiny_model().eval()
    for kw in (dict(temperature=0.7, top_k=20, top_p=0.9), dict(temperature=1.0, top_k=5), dict(top_p=0.6)):
        s = sample.Session(m, 64)
        s.tokens = [1, 2, 3, 4]
        got = list(s.stream(12, generator=torch.Generator().manual_seed(7), **kw))
        assert got == reference_sampled(m, [[1, 2, 3, 4]], 12, torch.Generator().manual_seed(7), **kw)[0], kw


def test_print_stream_decodes_characters_split_across_tokens(tok, capsys):
    text = "日本語 café naïve 🦙"
    ids = tok.encode(text)
    assert any(len(tok.decode_bytes([i]).decode("utf-8", errors="ignore")) == 0 for i in ids)  # split bytes
    sample.print_stream(tok, iter(ids + [tok.eot_id]))
    assert capsys.readouterr().out == text + "\n"


def test_load_tokenizer(tmp_path, tok):
    tok.save(str(tmp_path / "tokenizer.model"))
    assert sample.load_tokenizer(tmp_path).encode("hello world") == tok.encode("hello world")
    (tmp_path / "hf" / "original").mkdir(parents=True)
    tok.save(str(tmp_path / "hf" / "original" / "tokenizer.model"))
    assert sample.load_tokenizer(tmp_path / "hf").n_words == tok.n_words
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no tokenizer.model"):
        sample.load_tokenizer(tmp_path / "empty")
    with pytest.raises(M.CheckpointError, match="nothing: no such folder"):
        sample.load_tokenizer(tmp_path / "hf" / "original" / "nothing")


def test_load_checkpoint_checks_the_vocabulary(tmp_path, tok):
    """The tokenizer must fill the model's vocabulary: a tokenizer.model cut at a line's end loads (Meta's format holds
    no count) and would shift every special id."""
    tok.save(str(tmp_path / "tok.model"))
    m = tiny_model(vocab_size=tok.n_words)
    M.save_model(m, tmp_path / "ckpt", tokenizer_path=tmp_path / "tok.model")
    loaded, t = sample.load_checkpoint(tmp_path / "ckpt", "cpu", torch.float32)
    assert t.n_words == tok.n_words and torch.equal(loaded.output.weight, m.output.weight)
    path = tmp_path / "ckpt" / "tokenizer.model"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-3]))
    with pytest.raises(M.CheckpointError, match=f"tokenizer.model: {tok.n_words - 3} ids, but the model's "
                                                f"vocabulary has {tok.n_words}"):
        sample.load_checkpoint(tmp_path / "ckpt", "cpu", torch.float32)


# ---------------------------------------------------------------------------------------------- CLI

def run_cli(args, stdin=""):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], input=stdin, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_prompt_and_chat(tmp_path, tok):
    tok.save(str(tmp_path / "tok.model"))
    m = tiny_model(vocab_size=tok.n_words, max_seq_len=48)
    M.save_model(m, tmp_path / "ckpt", tokenizer_path=tmp_path / "tok.model")
    ckpt = str(tmp_path / "ckpt")
    # greedy (top-p does nothing at temperature 0) on CPU in fp32, as the reference: the CLI prints the prompt, then
    # generate's continuation of <|begin_of_text|> + the prompt, decoded without its stop token
    r = run_cli(["--ckpt", ckpt, "--prompt", "hello world", "--max_new_tokens", "8", "--temperature", "0",
                 "--device", "cpu"])
    assert r.returncode == 0, r.stderr
    new, _ = sample.generate(m, [tok.encode("hello world", bos=True)], 8, temperature=0, stop_ids=tok.stop_ids)
    new = [t for t in new[0] if t not in tok.stop_ids]
    assert new and r.stdout == "hello world" + tok.decode(new) + "\n"
    # 100 new tokens in a 48-token context (greedy, this model writes no stop token): it stops there, and says so
    r = run_cli(["--ckpt", ckpt, "--prompt", "hello world", "--max_new_tokens", "100", "--temperature", "0",
                 "--device", "cpu"])
    assert r.returncode == 0 and "the model's context of 48 is full" in r.stderr, r.stderr
    # chat: three turns in a 48-token context with 16-token replies overflow; /reset; a too-long message; EOF
    r = run_cli(["--ckpt", ckpt, "--chat", "--system", "be brief", "--max_new_tokens", "16"],
                stdin="hello\nthe quick brown fox\njumps over\n/reset\nllama\n" + "x " * 100 + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("outgrew the 48-token context") >= 1 and "(new conversation)" in r.stdout
    assert "shorten it" in r.stdout  # a message longer than the whole context is refused, not truncated
    r = run_cli(["--ckpt", ckpt, "--prompt", "hello", "--top_k", "0"])  # (it used to crash deep in sampling)
    assert r.returncode == 2 and "--temperature must be >= 0 and finite, --top_k >= 1" in r.stderr
    (tmp_path / "ckpt" / "tokenizer.model").unlink()
    r = run_cli(["--ckpt", ckpt, "--prompt", "hello"])
    assert r.returncode == 1 and "no tokenizer.model (nor original/tokenizer.model" in r.stderr
    r = run_cli(["--ckpt", ckpt + "x", "--prompt", "hello"])  # a typo: said so, not a word on HF downloads
    assert r.returncode == 1 and r.stderr.strip() == f"{ckpt}x: no such folder", r.stderr
    (tmp_path / "step_000010").mkdir()  # train.py's training checkpoint, given for its exported model
    for name in ("manifest.json", "state.pt"):
        (tmp_path / "step_000010" / name).write_text("{}")
    r = run_cli(["--ckpt", str(tmp_path / "step_000010"), "--prompt", "hello"])
    assert r.returncode == 1 and "a training checkpoint (what train.py --resume reads)" in r.stderr, r.stderr


def test_sample_next_applies_temperature_before_top_p():
    """Temperature, then top-p: at temperature 5 row [1, 3, 2, 0] has probs ~[.22, .33, .27, .18], so top_p=0.7
    keeps tokens {1, 2, 0} (token 1 ~40% of the kept mass). The nucleus of the untempered probs [.09, .64, .24, .03]
    would keep {1, 2} only."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    draws = torch.cat([sample.sample_next(logits, temperature=5.0, top_p=0.7, generator=g) for _ in range(400)])
    assert set(draws.tolist()) == {0, 1, 2}
    assert 0.3 < (draws == 1).float().mean().item() < 0.5  # not ~0.73, the share at temperature 1


def chat_session(tok, monkeypatch, lines, system=None):
    """Run sample.chat on a tiny model with `lines` typed (then ctrl-D), 4 new tokens a reply, greedy -> the
    session's tokens at the end."""
    sessions = []

    class Recorded(sample.Session):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            sessions.append(self)
    monkeypatch.setattr(sample, "Session", Recorded)
    typed = iter(lines)

    def fake_input(prompt=""):
        line = next(typed, None)
        if line is None:
            raise EOFError
        return line
    monkeypatch.setattr("builtins.input", fake_input)
    m = tiny_model(vocab_size=tok.n_words, max_seq_len=128).eval()
    args = argparse.Namespace(ckpt="tiny", system=system, max_context=128, max_new_tokens=4, temperature=0,
                              top_k=None, top_p=None)
    sample.chat(m, tok, args, torch.Generator().manual_seed(0))
    return sessions[0].tokens


def test_chat_turns_continue_one_dialog(tok, monkeypatch):
    """Two chat turns leave exactly the Llama 3 dialog in the session: one <|begin_of_text|>, a reply cut at the
    token limit closed by <|eot_id|>, then the next user turn without its own <|begin_of_text|>."""
    tokens = chat_session(tok, monkeypatch, ["hello", "the quick brown fox"], system="be brief")
    system = [{"role": "system", "content": "be brief"}]
    first = tok.encode_dialog_prompt(system + [{"role": "user", "content": "hello"}])
    reply = tokens[len(first):len(first) + 4]
    assert not set(reply) & tok.stop_ids  # (so the reply was cut by the token limit and must be closed)
    second = tok.encode_dialog_prompt([{"role": "user", "content": "the quick brown fox"}])[1:]
    expected = first + reply + [tok.eot_id] + second
    assert tokens[:len(expected)] == expected
    assert len(tokens) == len(expected) + 4


def test_chat_closes_a_reply_ended_by_end_of_text_with_eot(tok, monkeypatch):
    """A reply that stops at <|end_of_text|> (a stop token too) is closed as Meta's format closes every turn:
    <|eot_id|> in its place, not after it."""
    monkeypatch.setattr(sample, "sample_next", lambda logits, *a: torch.tensor([tok.eos_id]))
    tokens = chat_session(tok, monkeypatch, ["hello", "again"])
    first = tok.encode_dialog_prompt([{"role": "user", "content": "hello"}])
    second = tok.encode_dialog_prompt([{"role": "user", "content": "again"}])[1:]
    assert tokens == first + [tok.eot_id] + second + [tok.eos_id]


def test_cli_prompt_says_the_context_is_full_only_when_it_is(tmp_path, tok, monkeypatch, capsys):
    """(review, helper) main() set session.tokens = ids, the same list that stream() appends to, so its count of new
    tokens was always 0: a run that simply reached --max_new_tokens claimed "stopped after 0 new tokens: the model's
    context ... is full", and a run that did fill the context reported 0 new tokens."""
    torch.manual_seed(0)
    tok.save(str(tmp_path / "tok.model"))
    m = tiny_model(vocab_size=tok.n_words, max_seq_len=48)
    M.save_model(m, tmp_path / "ckpt", tokenizer_path=tmp_path / "tok.model")
    ids = tok.encode("hello world", bos=True)
    free, _ = sample.generate(m, [ids], 48 - len(ids), temperature=0)
    assert not set(free[0]) & tok.stop_ids  # (so neither run below ends at a stop token)
    base = ["sample.py", "--ckpt", str(tmp_path / "ckpt"), "--prompt", "hello world", "--temperature", "0",
            "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", base + ["--max_new_tokens", "4"])
    sample.main()
    assert "is full" not in capsys.readouterr().err  # 4 new tokens in a 48-token context: nothing is full
    monkeypatch.setattr(sys, "argv", base + ["--max_new_tokens", "100"])
    sample.main()
    assert f"stopped after {48 - len(ids)} new tokens: the model's context of 48 is full" in capsys.readouterr().err


def test_a_malformed_tokenizer_model_is_a_checkpoint_error(tmp_path, tok, monkeypatch, capsys):
    """(review, helper) Tokenizer.load's ValueError for a malformed tokenizer.model (it names file:line) went out of
    load_tokenizer as it was, and sample.py's main (like align.py's) turns only CheckpointError and FileNotFoundError
    into a one-line message: a damaged tokenizer in a checkpoint ended in a traceback. And it is found before the
    weights are read (it was after: minutes at 8B): here the weights file is empty, and the message names the
    tokenizer."""
    tok.save(str(tmp_path / "tok.model"))
    m = tiny_model(vocab_size=tok.n_words, max_seq_len=48)
    M.save_model(m, tmp_path / "ckpt", tokenizer_path=tmp_path / "tok.model")
    path = tmp_path / "ckpt" / "tokenizer.model"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:5] + ["not base64!! 5\n"] + lines[6:]))
    with pytest.raises(M.CheckpointError, match="tokenizer.model:6: malformed line"):
        sample.load_tokenizer(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "consolidated.00.pth").write_bytes(b"")  # found before the weights are read
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", str(tmp_path / "ckpt"), "--prompt", "hi", "--device",
                                      "cpu"])
    with pytest.raises(SystemExit) as e:
        sample.main()
    assert "tokenizer.model:6: malformed line" in str(e.value.code)


def test_cli_max_context_below_one_is_refused(monkeypatch, capsys):
    """(review, helper) --max_context was not checked: a negative one failed in torch (a negative dimension for the KV
    cache), after the weights were read."""
    for context in ("-3", "0"):
        monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", "nowhere", "--chat", "--max_context", context])
        with pytest.raises(SystemExit) as e:
            sample.main()
        assert e.value.code == 2 and "--max_context >= 1" in capsys.readouterr().err


def test_an_infinite_temperature_is_refused(monkeypatch, capsys):
    """(review, helper) --temperature inf passed the checks (inf >= 0): the logits divided by it are all 0, so every
    token was drawn alike, whatever the model said. (--top_p inf and nan were refused already: not within (0, 1].)"""
    with pytest.raises(ValueError, match="temperature=inf: must be >= 0 and finite"):
        sample.sample_next(torch.tensor([[5.0, 0.0, -5.0]]), temperature=float("inf"))
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", "nowhere", "--prompt", "hi", "--temperature", "inf"])
    with pytest.raises(SystemExit) as e:
        sample.main()
    assert e.value.code == 2 and "--temperature must be >= 0 and finite" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--prompt", "hi", "--chat"], ["--prompt", "hi", "--system", "be brief"], []])
def test_cli_prompt_or_chat_not_both(monkeypatch, capsys, flags):
    """--prompt with --chat, or --system without it, was silently ignored: refused before anything is read."""
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", "nowhere", *flags])
    with pytest.raises(SystemExit) as e:
        sample.main()
    assert e.value.code == 2 and "give --prompt TEXT or --chat" in capsys.readouterr().err


def test_cli_a_device_that_is_not_there_is_one_line(monkeypatch, capsys):
    """(review, helper) --device gpu (a name torch does not know) or --device cuda without CUDA ended in torch's
    traceback after the tokenizer was read; now refused by the parser, naming --device."""
    for device in ["gpu"] + ([] if torch.cuda.is_available() else ["cuda"]):
        monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", "nowhere", "--prompt", "hi", "--device", device])
        with pytest.raises(SystemExit) as e:
            sample.main()
        assert e.value.code == 2 and f"--device {device}:" in capsys.readouterr().err


def test_cli_max_context_without_chat_is_refused(monkeypatch, capsys):
    """(review, helper) --max_context is --chat's KV cache: with --prompt it was silently ignored."""
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", "nowhere", "--prompt", "hi", "--max_context", "64"])
    with pytest.raises(SystemExit) as e:
        sample.main()
    assert e.value.code == 2 and "--max_context goes with --chat" in capsys.readouterr().err
