"""Tests for align.py: the losses against closed forms and hand-computed examples, the data plumbing (SFT mask,
packing, JSONL errors), and a few steps of each stage on a tiny model improving that stage's own objective.
Hermetic: a tiny tokenizer trained here on the task texts, a tiny model, files only in tmp_path.

Run: python -m pytest -q tests/test_align.py
"""
import json
import math
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import align
from model import CheckpointError, ModelArgs, Transformer, save_model
from tokenizer import Tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """As `python align.py` does on CPU: tiny matrices run faster on one thread (and do not thrash shared cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- the losses --------------------------------------------------------------------------------------------------

def test_dpo_loss_closed_form():
    pi_c, pi_r = torch.tensor([-3.0, -7.5]), torch.tensor([-4.0, -2.0])
    ref_c, ref_r = torch.tensor([-3.5, -6.0]), torch.tensor([-3.0, -2.5])
    beta = 0.1
    loss, r_c, r_r = align.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
    expected = [-math.log(1 / (1 + math.exp(-beta * ((a - b) - (c - d)))))
                for a, b, c, d in zip(pi_c.tolist(), ref_c.tolist(), pi_r.tolist(), ref_r.tolist())]
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert r_c.tolist() == pytest.approx([0.05, -0.15])  # beta * (pi - ref)
    assert r_r.tolist() == pytest.approx([-0.1, 0.05])


def test_dpo_loss_is_log2_when_policy_is_reference():
    lp_c, lp_r = torch.randn(8) * 5, torch.randn(8) * 5
    loss, _, _ = align.dpo_loss(lp_c, lp_r, lp_c.clone(), lp_r.clone(), beta=0.3)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)


def test_bradley_terry_loss():
    r_c, r_r = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 0.5])
    expected = [math.log(1 + math.exp(-(c - r))) for c, r in zip(r_c.tolist(), r_r.tolist())]
    assert align.bradley_terry_loss(r_c, r_r).item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    assert align.bradley_terry_loss(r_r[2:], r_c[2:]).item() == pytest.approx(math.log(2))  # equal scores
    margin = torch.tensor([1.0, 0.0, 2.0])  # a margin asks for a bigger gap: same scores, larger loss
    expected = [math.log(1 + math.exp(-(c - r - m))) for c, r, m in zip(r_c.tolist(), r_r.tolist(), margin.tolist())]
    assert align.bradley_terry_loss(r_c, r_r, margin).item() == pytest.approx(sum(expected) / 3, rel=1e-6)


def test_gae_against_hand_computed_example():
    # row 0: three steps, gamma 1, lambda 0.5, reward 1 at the end
    #   d2 = 1 - 0.7 = 0.3            A2 = 0.3
    #   d1 = 0 + 0.7 - 0.6 = 0.1      A1 = 0.1 + 0.5 * 0.3 = 0.25
    #   d0 = 0 + 0.6 - 0.5 = 0.1      A0 = 0.1 + 0.5 * 0.25 = 0.225
    adv, ret = align.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3),
                         gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.225, 0.25, 0.3])
    assert ret[0].tolist() == pytest.approx([0.725, 0.85, 1.0])
    # row 1: the last step is padding, so the episode ends after step 1 (its value 9 and reward 5 must not leak)
    #   d1 = 1 + 0.9 * 0 - 0.6 = 0.4  A1 = 0.4
    #   d0 = 0 + 0.9 * 0.6 - 0.5 = 0.04   A0 = 0.04 + 0.9 * 1.0 * 0.4 = 0.4
    adv, _ = align.gae(torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[0.5, 0.6, 9.0]]),
                       torch.tensor([[1.0, 1.0, 0.0]]), gamma=0.9, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.4, 0.4, 0.0])


def test_ppo_losses_clip():
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    logp = torch.full((1, 2), math.log(1.5))  # ratio 1.5, outside 1 +- 0.2
    # adv +1: the gain is capped at 1.2; adv -1: the loss is not capped (pessimistic bound), 1.5
    loss, clipfrac = align.ppo_policy_loss(logp, old, torch.tensor([[1.0, -1.0]]), mask, clip=0.2)
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    assert clipfrac.item() == 0.5  # the clip acts on the first token only (both ratios are outside the range)
    loss, clipfrac = align.ppo_policy_loss(old, old, torch.tensor([[2.0, -1.0]]), mask)  # ratio 1: -mean(adv)
    assert loss.item() == pytest.approx(-0.5) and clipfrac.item() == 0.0
    # value: moved from 0 to 1 towards return 2, clip 0.2: max((1-2)^2, (0.2-2)^2) / 2 = 1.62
    v = align.ppo_value_loss(torch.ones(1, 1), torch.zeros(1, 1), torch.full((1, 1), 2.0), torch.ones(1, 1), clip=0.2)
    assert v.item() == pytest.approx(0.5 * 1.8 ** 2)


def test_kl_shaped_rewards_and_adaptive_coefficient():
    logp, ref = torch.tensor([[0.0, -1.0, -1.0, 0.0]]), torch.tensor([[0.0, -2.0, -1.5, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    r = align.kl_shaped_rewards(torch.tensor([3.0]), logp, ref, mask, kl_coef=0.1)
    assert r[0].tolist() == pytest.approx([0.0, -0.1, -0.05 + 3.0, 0.0])  # score on the last response token
    ctl = align.AdaptiveKL(0.1, target=1.0, horizon=100)
    ctl.update(kl=10.0, n_steps=10)  # far above target: +20% error cap, times 10/100
    assert ctl.coef == pytest.approx(0.1 * 1.02)
    fixed = align.AdaptiveKL(0.1)
    fixed.update(kl=10.0, n_steps=10)
    assert fixed.coef == 0.1


# --- tasks and data ----------------------------------------------------------------------------------------------

def test_tasks_checker_corrupt_and_split():
    rng = random.Random(0)
    for _ in range(300):
        t = align.make_task(rng)
        assert align.check(t, t["answer"]) and align.check(t, f"  {t['answer']} \n")
        assert not align.check(t, align.corrupt(t, rng))
    train, held_out = align.task_split(500, 100, seed=3, stage=1)
    assert len({t["prompt"] for t in held_out}) == 100
    assert not {t["prompt"] for t in train} & {t["prompt"] for t in held_out}
    assert held_out == align.task_split(10, 100, seed=3, stage=2)[1]  # the same held-out set for every stage


def test_malformed_jsonl_reports_line(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    path = tmp_path / "sft.jsonl"
    path.write_text(good + "\n\n" + good + "\n" + '{"messages": [\n')
    with pytest.raises(ValueError, match=r"sft\.jsonl:4: not valid JSON"):
        align.load_sft(path)
    path.write_text(good + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"sft\.jsonl:2: 'messages': the last message must be the assistant's"):
        align.load_sft(path)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" +
                     json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: expected an object with 'prompt', 'chosen'"):
        align.load_pairs(pairs)
    pairs.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": None}) + "\n")  # which field: named
    with pytest.raises(align.BadInput, match=r"pairs\.jsonl:1: 'rejected': a dialog is"):
        align.load_pairs(pairs)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"prompts\.jsonl:1: 'prompt': message 0 has role 'assistant', "
                                         r"expected 'user'"):
        align.load_prompts(prompts)
    # a prompt must end with the user's turn (it is what the model answers)
    prompts.write_text(json.dumps({"prompt": "q"}) + "\n" + json.dumps(
        {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    with pytest.raises(ValueError, match=r"prompts\.jsonl:2: 'prompt': the last message must be the user's"):
        align.load_prompts(prompts)
    prompts.write_bytes(json.dumps({"prompt": "q"}).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')  # Latin-1
    with pytest.raises(ValueError, match=r"prompts\.jsonl:2: not UTF-8"):
        align.load_prompts(prompts)
    prompts.write_text("\n \n")
    with pytest.raises(ValueError, match=r"prompts\.jsonl: no records"):
        align.load_prompts(prompts)
    # well-formed records of every shape load
    pairs.write_text(json.dumps({"prompt": "q", "chosen": [{"role": "user", "content": "q"},
                                                          {"role": "assistant", "content": "a"}], "rejected": "b"}))
    assert align.load_pairs(pairs) == [{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}]
    pairs.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2}) + "\n" +
                     json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: 'margin' must be a finite number"):
        align.load_pairs(pairs)
    for bad in ("NaN", "true"):  # json.loads reads NaN as a float and true as a bool: neither is a margin
        pairs.write_text('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": %s}\n' % bad)
        with pytest.raises(ValueError, match=r"pairs\.jsonl:1: 'margin' must be a finite number"):
            align.load_pairs(pairs)


def test_jsonl_with_a_byte_order_mark_and_pairs_without_a_difference(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"  # as Notepad saves UTF-8: a BOM before the first record
    same = [{"prompt": "q", "chosen": " 5\n", "rejected": "5"}, {"prompt": "q", "chosen": "", "rejected": ""}]
    records = [{"prompt": "q", "chosen": "a", "rejected": "b"}] + same
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(map(json.dumps, records)).encode())
    assert align.load_pairs(path) == [{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}]
    assert "dropped 2 pairs whose chosen and rejected are the same (lines [2, 3])" in capsys.readouterr().err
    path.write_text("\n".join(map(json.dumps, same)))
    with pytest.raises(ValueError, match=r"pairs\.jsonl: no pair with two different answers"):
        align.load_pairs(path)


@pytest.fixture(scope="module")
def tok():
    train, _ = align.task_split(300, 0, seed=0)
    texts = [f"{t['prompt']}\n{t['answer']}\n" for t in train] + ["system\nuser\nassistant\n"] * 5
    return Tokenizer.train(texts, vocab_size=256 + 256 + 48)


def test_pack_sft_docstring_example():
    x, y, d = align.pack_sft([([1, 2, 3], [0, 1, 1]), ([1, 4], [0, 1])], seq_len=6)
    assert x.tolist() == [[1, 2, 1, 0, 0, 0]]
    assert y.tolist() == [[2, 3, 4, -100, -100, -100]]
    assert d.tolist() == [[0, 0, 1, 2, 2, 2]]


def test_sft_mask_never_covers_system_user_or_headers(tok):
    convos = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: abc"},
               {"role": "assistant", "content": "cba"}, {"role": "user", "content": "What is 2 + 2?"},
               {"role": "assistant", "content": "4"}],
              align.task_conversation({"prompt": "Sort the letters: b a", "answer": "a b"})]
    X, Y, D = align.pack_sft([tok.encode_dialog(c) for c in convos], seq_len=128)
    assert X.shape[0] == 1  # both fit in one row
    targets = [t for t in Y[0].tolist() if t != -100]
    # exactly the assistants' contents, each closed by <|eot_id|>: no system, user, or header token
    expected = [t for answer in ("cba", "4", "a b") for t in tok.encode(answer) + [tok.eot_id]]
    assert targets == expected
    # the two conversations do not see each other
    n1 = len(tok.encode_dialog(convos[0])[0]) - 1
    assert set(D[0, :n1].tolist()) == {0} and D[0, n1] == 1
    # Llama 3's DPO mask also drops the termination token
    ids, mask = tok.encode_dialog(convos[1])
    kept = [t for t, m in zip(ids[1:], align.loss_mask(tok, ids, mask)) if m]
    assert kept == tok.encode("a b")


def test_pair_loss_mask_covers_only_the_final_response(tok):
    """A multi-turn prompt (HH-RLHF style) has earlier assistant turns: DPO's sums and its NLL term must see only
    the response being compared, not those turns."""
    prompt = [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"},
              {"role": "user", "content": "What is 2 + 2?"}]
    ids, mask = align.render(tok, prompt, "4")
    assert [t for t, m in zip(ids, mask) if m] == tok.encode("4") + [tok.eot_id]
    kept = [t for t, m in zip(ids[1:], align.loss_mask(tok, ids, mask)) if m]
    assert kept == tok.encode("4")


def test_truncate_left_keeps_bos_and_counts():
    before = align.Truncations.n
    assert align.truncate_left([0, 1, 2, 3, 4, 5], 4) == [0, 3, 4, 5]
    assert align.truncate_left([0, 1], 4) == [0, 1]
    assert align.Truncations.n == before + 1


def test_a_truncated_pair_keeps_the_same_prompt_on_both_sides(tok):
    """The reward model and DPO compare two answers to one prompt: cut to fit, both must keep the same prompt
    tokens, however different the answers' lengths (each cut on its own, the longer one lost more)."""
    prompt = align.user("Reverse the letters: " + " ".join("abcdefghijklmnopqrstuvwxyz"))
    pair = dict(prompt=prompt, chosen="a", rejected="a b c d e f g h i j k l m n o p")
    c_ids, c_mask, r_ids, r_mask = align._pair_rows(tok, [pair], max_len=48)[0]
    assert len(r_ids) == 48 and len(c_ids) < 48 and c_ids[0] == r_ids[0] == tok.bos_id
    n = len(c_ids) - len(tok.encode("a")) - 1  # chosen's prompt part: all but its answer and <|eot_id|>
    assert c_ids[:n] == r_ids[:n] and len(tok.encode_dialog_prompt(prompt)) > n  # the same prompt, and it was cut
    for ids, mask, answer in ((c_ids, c_mask, "a"), (r_ids, r_mask, pair["rejected"])):  # the answers are whole
        assert [t for t, m in zip(ids[1:], mask) if m] == tok.encode(answer)  # (the loss mask, on the targets)
    # an answer longer than the context without its prompt: the prompt goes from both sides (no more), and the long
    # answer loses its start on its own; the short answer stays whole (a shared cut that size had emptied it)
    pair = dict(prompt=align.user("the cat sat"), chosen="yes", rejected=" ".join("abcdefghijklmnopqrstuvwxyz") * 2)
    c_ids, c_mask, r_ids, r_mask = align._pair_rows(tok, [pair], max_len=32)[0]
    assert len(r_ids) == 32 and [t for t, m in zip(c_ids[1:], c_mask) if m] == tok.encode("yes")


def test_max_new_leaves_room_for_the_prompt(tok, tmp_path):
    model = tiny_model(tok)  # a context of 64
    assert align.prompt_room(model, 32) == 32
    for bad in (33, 63, 0):
        with pytest.raises(ValueError, match=f"--max_new {bad}: responses take 1 to 32 tokens"):
            align.prompt_room(model, bad)
    # checked when the stage loads its model, not after training (the first use is the closing evaluation)
    tok.save(str(tmp_path / "tok.model"))
    save_model(model, tmp_path / "init", tokenizer_path=tmp_path / "tok.model")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "align.py", "sft", "--init", str(tmp_path / "init"), "--max_new", "40",
                        "--out", str(tmp_path / "sft")], cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("--max_new 40: responses take 1 to 32 tokens"), r.stderr
    assert "sft step" not in r.stdout and not (tmp_path / "sft").exists()   # (one line, no traceback)
    r = subprocess.run([sys.executable, "align.py", "all", "--data", str(tmp_path / "sft.jsonl")], cwd=repo,
                       capture_output=True, text=True, timeout=300)   # (every stage would read one stage's records)
    assert r.returncode == 2 and "--data holds one stage's records" in r.stderr, r.stderr


def test_a_batch_larger_than_the_data_is_refused_under_ddp(monkeypatch):
    assert sorted(align.batch_indices(3, 4, step=0)) == [0, 1, 2]  # one process: the batch is all there is
    monkeypatch.setattr(align, "WORLD", 2)  # two ranks would share 3 examples 2 + 1 (or 1 + 0)
    with pytest.raises(ValueError, match="3 examples for a batch of 4 in 2 processes"):
        align.batch_indices(3, 4, step=0)


# --- each stage improves its own objective on a tiny model --------------------------------------------------------

def tiny_model(tok, seed=0, context=64):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=tok.n_words, multiple_of=16,
                                 rope_theta=10000.0, max_seq_len=context))


def tail(history, key="loss", n=5):
    return sum(h[key] for h in history[-n:]) / n


def test_sft_steps_lower_the_loss(tok):
    convos = [align.task_conversation(t) for t in align.task_split(64, 0, seed=1)[0]]
    hist = align.train_sft(tiny_model(tok, context=128), tok, convos, steps=30, batch_size=8, lr=3e-3)
    assert tail(hist) < 0.8 * hist[0]["loss"]
    # step 0 is the fresh model's loss on the first batch of packed rows, under their document mask (without it
    # the conversations packed into a row, 3-4 at this context, would see each other: another number)
    X, Y, D = align.pack_sft([tok.encode_dialog(c) for c in convos], 128)
    idx = align.batch_indices(len(X), 8, step=0)
    assert D[idx].max() >= 2  # (a row of one conversation and its padding is the same with or without the mask)
    with torch.no_grad():
        masked, unmasked = (tiny_model(tok, context=128)(X[idx], targets=Y[idx], doc_ids=d).item()
                            for d in (D[idx], None))
    assert hist[0]["loss"] == pytest.approx(masked, abs=1e-6) and abs(masked - unmasked) > 1e-3
    # --seed orders the batches (it used to be seed 0's order whatever the flag)
    other = align.batch_indices(len(X), 8, step=0, seed=7)
    assert other != idx
    with torch.no_grad():
        masked = tiny_model(tok, context=128)(X[other], targets=Y[other], doc_ids=D[other]).item()
    hist = align.train_sft(tiny_model(tok, context=128), tok, convos, steps=1, batch_size=8, lr=3e-3, seed=7)
    assert hist[0]["loss"] == pytest.approx(masked, abs=1e-6)


def test_sft_rows_stop_at_sft_row(tok, monkeypatch):
    """SFT packs rows of the model's context, up to SFT_ROW (8192): a Llama 3.1 download's context is 128K, whose rows
    at --batch_size 8 would be a million tokens a step, nearly all padding (a review found it)."""
    seen, pack = [], align.pack_sft
    monkeypatch.setattr(align, "pack_sft", lambda examples, seq_len: seen.append(seq_len) or pack(examples, seq_len))
    monkeypatch.setattr(align, "SFT_ROW", 64)
    convos = [align.task_conversation(t) for t in align.task_split(8, 0, seed=1)[0]]
    align.train_sft(tiny_model(tok, context=128), tok, convos, steps=1, batch_size=2, lr=1e-3)
    align.train_sft(tiny_model(tok, context=48), tok, convos, steps=1, batch_size=2, lr=1e-3)
    assert seen == [64, 48]


def test_reward_model_learns_pairs_and_roundtrips(tok, tmp_path, monkeypatch):
    rng = random.Random(0)
    tasks = align.task_split(64, 0, seed=2)[0]
    pairs = [dict(prompt=align.user(t["prompt"]), chosen=t["answer"], rejected=align.corrupt(t, rng)) for t in tasks]
    rm = align.RewardModel(tiny_model(tok))
    hist = align.train_rm(rm, tok, pairs, steps=60, batch_size=16, lr=1e-2)
    assert hist[0]["loss"] == pytest.approx(math.log(2))  # the zero head scores everything 0
    assert tail(hist) < 0.6
    assert align.rm_accuracy(rm, tok, pairs) > 0.65  # from 0 (all ties) at the start
    # read at each sequence's own last token: padding a shorter one in a batch with a longer one changes nothing
    # (a head read at the last column still learns, the pad positions seeing the whole sequence)
    a, b = (tok.encode_dialog(align.user(t["prompt"]) + [{"role": "assistant", "content": t["answer"]}])[0]
            for t in tasks[:2])
    a, b = sorted((a, b), key=len)
    assert len(a) < len(b)
    with torch.no_grad():
        torch.testing.assert_close(align.rm_scores(rm, [a, b])[:1], align.rm_scores(rm, [a]), atol=1e-5, rtol=0)
    # saved in Meta's layout + the head; reloading gives the same scores
    tok_path = tmp_path / "tok.model"
    tok.save(str(tok_path))
    align.save_reward_model(rm, tmp_path / "rm", tok_path)
    seqs = [tok.encode_dialog_prompt(p["prompt"]) for p in pairs[:4]]
    assert torch.allclose(align.rm_scores(rm, seqs), align.rm_scores(align.load_reward_model(tmp_path / "rm"), seqs))
    head = tmp_path / "rm" / "reward_head.pth"  # a flipped bit in the head's weights is refused, naming the file
    data, at = head.read_bytes(), head.read_bytes().index(rm.head.weight.detach().numpy().tobytes())
    head.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
    with pytest.raises(CheckpointError, match="reward_head.pth: the bytes of its record"):
        align.load_reward_model(tmp_path / "rm")
    # rewritten by a process killed after the transformer and before the head: refused, not read with the old head
    monkeypatch.setattr(align, "atomic_save", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        align.save_reward_model(rm, tmp_path / "rm", tok_path)
    with pytest.raises(FileNotFoundError, match="is not a reward model written by `align.py rm`"):
        align.load_reward_model(tmp_path / "rm")


def test_dpo_steps_lower_the_loss_from_log2(tok):
    rng = random.Random(1)
    tasks = align.task_split(32, 0, seed=3)[0]
    pairs = [dict(prompt=align.user(t["prompt"]), chosen=t["answer"], rejected=align.corrupt(t, rng)) for t in tasks]
    policy = tiny_model(tok)
    ref = tiny_model(tok).requires_grad_(False)  # same seed: the same weights
    hist = align.train_dpo(policy, ref, tok, pairs, steps=25, batch_size=16, lr=3e-3, beta=0.5)
    assert hist[0]["dpo"] == pytest.approx(math.log(2), abs=1e-5)
    assert tail(hist, "dpo") < 0.5 and tail(hist, "acc") > 0.8


def test_rejection_sampling_keeps_the_best(tok, monkeypatch):
    policy = tiny_model(tok)
    rm = align.RewardModel(tiny_model(tok, seed=1))
    torch.nn.init.normal_(rm.head.weight)  # any fixed scorer will do
    prompts = [align.user(t["prompt"]) for t in align.task_split(6, 0, seed=4)[0]]
    winners, scores = align.rejection_sample(policy, rm, tok, prompts, k=3, max_new=6)
    assert scores.shape == (6, 3)
    # which samples won: the untrained policy rarely stops within 6 tokens, so its samples are given here, two
    # of the three of each prompt ending with <|eot_id|> (all three for the first prompt, none for the last)
    rng = random.Random(0)
    samples = [[rng.randrange(256) for _ in range(rng.randrange(1, 6))] for _ in range(18)]
    for i, s in enumerate(samples):
        if i < 3 or (i % 3 != 2 and i < 15):
            s.append(tok.eot_id)
    monkeypatch.setattr(align, "sample_responses", lambda *a, **kw: samples)
    winners, scores = align.rejection_sample(policy, rm, tok, prompts, k=3, max_new=6)
    # each score is the reward model's for its own prompt + sample, each sequence scored alone (the winners below are
    # picked by these scores, so a score given to another sequence would pass unseen there)
    want = [align.rm_scores(rm, [tok.encode_dialog_prompt(p) + samples[3 * i + j]])[0].item()
            for i, p in enumerate(prompts) for j in range(3)]
    assert scores.flatten().tolist() == pytest.approx(want, abs=1e-5)
    for i, (p, w) in enumerate(zip(prompts, winners)):
        ended = [j for j in range(3) if samples[3 * i + j][-1] == tok.eot_id]
        if not ended:
            assert w is None
            continue
        best = max(ended, key=lambda j: scores[i, j].item())  # the best sample that ended
        assert w == p + [{"role": "assistant", "content": align.response_text(tok, samples[3 * i + best])}]
    assert winners[-1] is None and sum(w is not None for w in winners) == 5
    hist = align.train_sft(policy, tok, [w for w in winners if w], steps=15, batch_size=5, lr=3e-3, name="rs")
    assert tail(hist, n=3) < hist[0]["loss"]


def test_ppo_raises_the_reward(tok, monkeypatch):
    """A dense toy reward, the share of response tokens with an even id: a random policy gets about half.
    Measured without sampling noise: the policy's probability mass on even ids at the first answer position."""
    policy = tiny_model(tok)
    ref = tiny_model(tok).requires_grad_(False)
    prompts = [align.user(t["prompt"]) for t in align.task_split(32, 0, seed=5)[0]]
    prompt_ids = align.pad([tok.encode_dialog_prompt(p) for p in prompts[:8]])

    def even_mass():  # left as a plain forward on equal-length prompts: the first 8 prompts padded at the end
        with torch.no_grad():
            last = torch.tensor([len(tok.encode_dialog_prompt(p)) - 1 for p in prompts[:8]])
            probs = policy(prompt_ids)[torch.arange(8), last].softmax(-1)  # (8, V)
        return probs[:, 0::2].sum(-1).mean().item()

    def reward_fn(seqs):
        return torch.tensor([sum(t % 2 == 0 for t in s[-6:]) / 6 for s in seqs])
    before = even_mass()
    seen = []   # (gamma, lam) as train_ppo hands them to gae: a swap would still raise the reward
    real_gae = align.gae
    monkeypatch.setattr(align, "gae", lambda r, v, m, gamma, lam: (seen.append((gamma, lam)), real_gae(r, v, m, gamma,
                                                                                                        lam))[1])
    hist = align.train_ppo(policy, ref, reward_fn, tok, prompts, iters=8, rollout_size=16, lr=1e-2, max_new=6,
                           kl_coef=0.01, epochs=2, minibatch=8, gamma=0.99, lam=0.9)
    assert even_mass() > before + 0.05 and set(seen) == {(0.99, 0.9)}
    assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout comes from the reference itself
    assert abs(hist[-1]["kl"]) > 1e-3   # and the last from a policy that moved away from it (a KL of 0 throughout:
                                        # the reference's log-probs taken from the policy)
    # a rollout of one sequence (one prompt): its score's spread is 0, and nothing may turn NaN
    hist = align.train_ppo(policy, ref, reward_fn, tok, prompts[:1], iters=2, rollout_size=4, lr=1e-2, max_new=6)
    assert all(math.isfinite(v) for h in hist for v in h.values())


SLOW_RANK_0 = """
import os
if "RANK" in os.environ:  # a torchrun worker: its group times out after 5 s, rank 0 evaluates and saves slowly
    import sys
    import time
    from datetime import timedelta
    import torch.distributed as dist
    init = dist.init_process_group
    def short_timeout(*a, **k):
        init(*a, timeout=timedelta(seconds=5), **k)
        main = sys.modules["__main__"]  # align.py
        evaluate, save = main.evaluate, main.atomic_save
        main.evaluate = lambda *a, **k: (time.sleep(8), evaluate(*a, **k))[1]
        main.atomic_save = lambda obj, path: (time.sleep(8 * str(path).endswith("resume.pt")), save(obj, path))[1]
    dist.init_process_group = short_timeout
"""


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_ddp_matches_one_process(tok, tmp_path, stage):
    """`torchrun --nproc_per_node=2 align.py sft|dpo` (gloo, DDP) takes the same steps as one process: each rank
    takes half of every global batch and DDP averages the gradients, so the weights come out equal. SFT's packed
    rows hold different numbers of target tokens, so each rank's loss is weighed by its share of them. Rank 0
    alone evaluates at the end (generation: with a large model, longer than NCCL's 10-minute timeout) and saves the
    loop's state: the other rank waits for it past the group's timeout (5 s here: SLOW_RANK_0). In DPO, rank 1 gets
    SIGTERM in its 2nd step (a scheduler's preemption): both ranks stop after it, rank 0 saves, both exit 0, and the
    resumed run (both ranks reading the state) ends as one process does."""
    tok.save(str(tmp_path / "tok.model"))
    save_model(tiny_model(tok), tmp_path / "init", tokenizer_path=tmp_path / "tok.model")
    rng = random.Random(2)
    with open(tmp_path / "data.jsonl", "w") as f:
        for t in align.task_split(16, 0, seed=6)[0]:
            record = ({"messages": align.task_conversation(t)} if stage == "sft" else
                      {"prompt": t["prompt"], "chosen": t["answer"], "rejected": align.corrupt(t, rng)})
            f.write(json.dumps(record) + "\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = [stage, "--init", str(tmp_path / "init"), "--data", str(tmp_path / "data.jsonl"), "--steps", "3",
              "--batch_size", "8", "--lr", "1e-3", "--n_eval", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "align.py", *common, "--out", str(tmp_path / "one")], cwd=repo, env=env,
                   check=True, capture_output=True, timeout=300)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_RANK_0 if stage == "sft" else KILL_AT_STEP)
    env["PYTHONPATH"] = str(tmp_path / "site")

    def torchrun(*extra, **kw):
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                               "--master_addr=127.0.0.1", f"--master_port={port}", "align.py", *common, "--out",
                               str(tmp_path / "two"), *extra], cwd=repo, capture_output=True, timeout=300, **kw)
    if stage == "dpo":
        r = torchrun("--ckpt_interval", "0", env={**env, "KILL_AT_STEP": "2", "KILL_SIGNAL": "TERM", "KILL_RANK": "1"},
                     text=True)  # (no periodic save: the one there is the signal's)
        assert r.returncode == 0 and "stopped by a signal to another process after step 2 of 3" in r.stdout, \
            r.stdout + r.stderr[-3000:]
        assert (tmp_path / "two" / "resume.pt").exists() and not (tmp_path / "two" / "align_log.json").exists()
        r = torchrun("--resume", env=env, text=True)
        assert r.stdout.count("resumed") == 1 and "at step 2" in r.stdout, r.stdout + r.stderr[-3000:]
    else:
        torchrun("--ckpt_interval", "2", env=env, check=True)
    one = torch.load(tmp_path / "one" / "consolidated.00.pth")
    two = torch.load(tmp_path / "two" / "consolidated.00.pth")
    init = torch.load(tmp_path / "init" / "consolidated.00.pth")
    assert any(not torch.equal(one[k], init[k]) for k in one)  # the steps did move the weights
    log = json.loads((tmp_path / "one" / "align_log.json").read_text())  # beside the checkpoint: every step
    assert log["stage"] == stage and len(log["history"]) == 3 and log["args"]["steps"] == 3
    # really one and two processes (two copies of a single process would train alike and give the same weights)
    log2 = json.loads((tmp_path / "two" / "align_log.json").read_text())
    assert (log["processes"], log2["processes"]) == (1, 2)
    # the logged loss is the whole batch's under DDP too (it was rank 0's share)
    assert [h["loss"] for h in log2["history"]] == pytest.approx([h["loss"] for h in log["history"]], abs=1e-5)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)


def test_whiten_ignores_padding():
    """Advantages are whitened over the response tokens only: padding (any value) neither shifts the mean nor
    the spread, and comes out 0."""
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, -50.0, -50.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = (valid - valid.mean()) / valid.std(correction=0)
    w = align.whiten(x, mask)
    assert w[mask.bool()].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert w[~mask.bool()].tolist() == [0.0] * 4


def test_kl_penalty_only_on_response_tokens():
    """The prompt and the padding are no action of the policy: however far its log-probs there are from the
    reference's, they earn no penalty."""
    logp, ref = torch.tensor([[-1.0, -3.0, -1.0, -0.5]]), torch.tensor([[-4.0, -2.0, -1.5, -3.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    r = align.kl_shaped_rewards(torch.tensor([3.0]), logp, ref, mask, kl_coef=0.1)
    assert r[0].tolist() == pytest.approx([0.0, 0.1, -0.05 + 3.0, 0.0])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("chunk", [7, None])
def test_token_logprobs_chunked_equal_the_full_log_softmax(bf16, chunk, device):
    """token_logprobs in chunks (7 rows: several, and a short last one; None: the default, one chunk) gives what
    log_softmax over all the logits gives: the log-probs and their gradients with respect to the hidden states and
    the output matrix (through the recomputation in backward). Measured against float64; under bf16 autocast no
    further from it than the full log_softmax under the same autocast (the weight's gradient is rounded once a
    chunk)."""
    torch.manual_seed(0)
    h = torch.randn(3, 9, 16, dtype=torch.float64, device=device)
    w = 0.5 * torch.randn(50, 16, dtype=torch.float64, device=device)
    tokens = torch.randint(0, 50, (3, 9), device=device)
    upstream = torch.randn(3, 8, dtype=torch.float64, device=device)  # a loss that weighs every log-prob differently

    def run(chunked, dtype):
        x, y = h.to(dtype).detach().requires_grad_(), w.to(dtype).detach().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16 and dtype == torch.float32):
            if chunked:
                logp = align.token_logprobs(x, y, tokens, chunk)
            else:
                full = torch.log_softmax(F.linear(x[:, :-1], y).float(), -1)  # (3, 8, 50)
                logp = full.gather(-1, tokens[:, 1:, None])[..., 0].to(dtype)
        (logp * upstream.to(logp.dtype)).sum().backward()
        return [t.detach().double() for t in (logp, x.grad, y.grad)]
    exact = run(False, torch.float64)
    for a, b, ref in zip(run(True, torch.float32), run(False, torch.float32), exact):
        err, full_err = ((t - ref).norm() / ref.norm() for t in (a, b))
        assert err <= 1.5 * full_err + 1e-6 and err < (2e-2 if bf16 else 1e-6), (err, full_err)
    with pytest.raises(ValueError, match=r"hidden states \(3, 9, 16\) and tokens \(3, 8\)"):
        align.token_logprobs(h, w, tokens[:, 1:])


def test_token_logprobs_never_hold_all_the_logits(peak_growth):
    """DPO's and PPO's log-probs at Llama 3's 128,256-token vocabulary: forward + backward over 4096 positions, in
    a fresh process, grows peak memory by less than one fp32 copy of the logits (2.1 GB; log_softmax over all of
    them holds about three: logits, log-probs, gradient)."""
    grew = peak_growth("import torch, align\n"
                       "h = torch.randn(2, 2049, 32, requires_grad=True)\n"
                       "w = (0.02 * torch.randn(128256, 32)).requires_grad_()\n"
                       "tokens = torch.randint(0, 128256, (2, 2049))",
                       "align.token_logprobs(h, w, tokens).sum().backward()")
    assert grew < 4096 * 128256 * 4, f"peak grew by {grew / 1e9:.2f} GB"


def test_value_loss_never_moves_the_policy(tok):
    policy = tiny_model(tok)
    pv = align.Policy(policy, value_head=True)
    torch.nn.init.normal_(pv.value_head.weight)  # a trained head: d value / d features is no longer 0
    _, values = pv(torch.randint(0, tok.n_words, (2, 6)))
    values.sum().backward()
    assert pv.value_head.weight.grad is not None and pv.value_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in policy.parameters())


def test_dpo_nll_is_per_token_on_the_chosen_response(tok):
    """Llama 3's NLL term: the chosen response's log-likelihood per token (a long answer weighs no more than a
    short one), its <|eot_id|> included (DPO's own sums leave it out: then nothing else keeps the policy stopping),
    averaged over pairs, and added to the DPO loss with its coefficient."""
    pairs = [dict(prompt=align.user("What is 1 + 2?"), chosen="3", rejected="4"),
             dict(prompt=align.user("Sort the letters: c a b d"), chosen="a b c d", rejected="d c b a")]
    policy = tiny_model(tok)
    ref = tiny_model(tok).requires_grad_(False)
    per_token, counts = [], []
    with torch.no_grad():
        for p in pairs:
            ids, mask = align.render(tok, p["prompt"], p["chosen"])
            m = mask[1:]  # m[t]: is ids[t + 1] an answer token or its <|eot_id|> (SFT's targets)
            logp = torch.log_softmax(policy(torch.tensor([ids]))[0].float(), -1)
            lps = [logp[t, ids[t + 1]].item() for t in range(len(ids) - 1) if m[t]]
            assert ids[-1] == tok.eot_id and m[-1] == 1
            per_token.append(-sum(lps) / len(lps))
            counts.append(len(lps))
    assert counts[0] < counts[1]  # answers of different lengths: a sum would not average to this
    hist = align.train_dpo(policy, ref, tok, pairs, steps=1, batch_size=2, lr=1e-3, beta=0.1, nll_coef=0.2)
    assert hist[0]["nll"] == pytest.approx(sum(per_token) / 2, rel=1e-4)
    assert hist[0]["loss"] == pytest.approx(hist[0]["dpo"] + 0.2 * hist[0]["nll"], rel=1e-5)


def test_ppo_mask_covers_exactly_the_response_tokens(tok, monkeypatch):
    """The PPO mask marks the positions whose next token is a response token: the last prompt position up to
    the one before the last response token; nothing of the prompt, nothing of the padding."""
    prompts = [align.user(t["prompt"]) for t in align.task_split(3, 0, seed=7)[0]]
    responses = [[100 + j for j in range(n)] + [tok.eot_id] for n in (1, 4, 2)]  # of different lengths
    seen, masks = [], []

    def fake_sample(model, tok_, prompt_ids, max_new, **kw):
        seen.extend(prompt_ids)
        return responses[:len(prompt_ids)]

    def spy(score, logp, ref_logp, mask, kl_coef):
        masks.append(mask.clone())
        return shaped(score, logp, ref_logp, mask, kl_coef)
    shaped = align.kl_shaped_rewards
    monkeypatch.setattr(align, "sample_responses", fake_sample)
    monkeypatch.setattr(align, "kl_shaped_rewards", spy)
    align.train_ppo(tiny_model(tok), tiny_model(tok).requires_grad_(False), lambda seqs: torch.zeros(len(seqs)),
                    tok, prompts, iters=1, rollout_size=3, lr=1e-3, max_new=6)
    for row, p, r in zip(masks[0], seen, responses):
        expected = [0.0] * (len(p) - 1) + [1.0] * len(r)
        assert row.tolist() == expected + [0.0] * (len(row) - len(expected))


def test_the_reward_model_reads_every_answer_closed_by_eot(tok, monkeypatch):
    """A sample that stopped on <|end_of_text|> or <|eom_id|> is scored as the same answer closed by <|eot_id|>,
    the only ending the reward model was trained on (read at an untrained token, its score is noise that PPO could
    learn to seek): in evaluate, rejection sampling and PPO alike."""
    tasks = align.task_split(3, 0, seed=7)[0]
    prompts = [align.user(t["prompt"]) for t in tasks]
    ends = [tok.eos_id, tok.special_tokens["<|eom_id|>"], tok.eot_id]
    responses = [[100 + j, 101 + j, end] for j, end in enumerate(ends)]
    scored = []

    def fake_scores(rm, seqs, batch_size=64):
        scored.append(seqs)
        return torch.zeros(len(seqs))
    monkeypatch.setattr(align, "sample_responses", lambda model, tok_, prompt_ids, *a, **kw: responses)
    monkeypatch.setattr(align, "rm_scores", fake_scores)
    policy = tiny_model(tok)
    align.evaluate(policy, tok, tasks, rm=object(), max_new=6)
    align.rejection_sample(policy, object(), tok, prompts[:1], k=3, max_new=6)
    align.train_ppo(policy, tiny_model(tok).requires_grad_(False), lambda seqs: fake_scores(None, seqs), tok, prompts,
                    iters=1, rollout_size=3, lr=1e-3, max_new=6)
    assert len(scored) == 3
    for seqs in scored:
        assert [s[-3:] for s in seqs] == [r[:2] + [tok.eot_id] for r in responses]


def test_ppo_score_scale_survives_a_first_rollout_of_equal_scores(tok, monkeypatch):
    """Scores are standardised by the first rollout's spread. When its scores are all equal (one sequence: --batch_size
    1; a reward every first sample fails) there is no spread to divide by: the old floor of 1e-3 multiplied every
    later score by 1000, and the KL penalty weighed nothing against it. They are then only centred (review, helper)."""
    calls, seen = [0], []

    def reward_fn(seqs):  # first rollout: all 0; later ones: 0 / 1
        calls[0] += 1
        return torch.zeros(len(seqs)) if calls[0] == 1 else torch.tensor([float(i % 2) for i in range(len(seqs))])

    def spy(score, logp, ref_logp, mask, kl_coef):
        seen.append(score.clone())
        return shaped(score, logp, ref_logp, mask, kl_coef)
    shaped = align.kl_shaped_rewards
    monkeypatch.setattr(align, "kl_shaped_rewards", spy)
    prompts = [align.user(t["prompt"]) for t in align.task_split(8, 0, seed=5)[0]]
    align.train_ppo(tiny_model(tok), tiny_model(tok).requires_grad_(False), reward_fn, tok, prompts, iters=2,
                    rollout_size=8, lr=1e-3, max_new=6)
    assert seen[0].tolist() == [0.0] * 8 and seen[1].tolist() == [0.0, 1.0] * 4


KILL_AT_STEP = """
import os
# SIGKILL this process (or KILL_SIGNAL; under torchrun only rank KILL_RANK, if given) as it starts its Nth step,
# KILL_TIMES times (default once)
if "KILL_AT_STEP" in os.environ and os.environ.get("KILL_RANK", os.environ.get("RANK")) == os.environ.get("RANK"):
    import signal
    import torch
    step, calls = torch.optim.AdamW.step, [0]
    def killing_step(self, *a, **k):
        calls[0] += 1
        if calls[0] == int(os.environ["KILL_AT_STEP"]):
            for _ in range(int(os.environ.get("KILL_TIMES", "1"))):
                os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("KILL_SIGNAL", "KILL")))
        return step(self, *a, **k)
    torch.optim.AdamW.step = killing_step
    init = torch.optim.AdamW.__init__
    def killing_init(self, *a, **k):  # KILL_AT_STEP=0: as the optimizer is made, before the loop
        init(self, *a, **k)
        if os.environ["KILL_AT_STEP"] == "0":
            os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("KILL_SIGNAL", "KILL")))
    torch.optim.AdamW.__init__ = killing_init
"""


def test_a_killed_chain_resumes_exactly(tmp_path):
    """`align.py all` killed with SIGKILL in the middle of DPO, then (resumed) in the middle of PPO, each time one
    step after its last save (so a finished step is lost and taken again), and resumed with --resume: every stage's
    checkpoint and every step's metrics equal an uninterrupted run's. A resume with other flags is refused."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(KILL_AT_STEP)
    flags = ["all", "--steps", "6", "--n_prompts", "16", "--n_eval", "8", "--ckpt_interval", "2"]

    def run(where, *extra, kill_at=None):
        (tmp_path / where).mkdir(exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
        if kill_at:
            env["KILL_AT_STEP"] = str(kill_at)
        return subprocess.run([sys.executable, os.path.join(repo, "align.py"), *flags, *extra], cwd=tmp_path / where,
                              env=env, capture_output=True, text=True, timeout=300)

    r = run("whole")
    assert r.returncode == 0, r.stderr[-3000:]
    # optimizer steps: SFT, RM and RS 6 each, DPO 6; PPO 2 an iteration (16 rollouts, 2 epochs of one minibatch)
    r = run("killed", kill_at=6 + 6 + 6 + 6)  # DPO's 6th step: saved after its 4th, the 5th is lost
    assert r.returncode == -9 and os.path.exists(tmp_path / "killed/out/align-dpo/resume.pt"), r.stderr[-3000:]
    r = run("killed", "--resume", kill_at=2 + 2 * 3 + 1)  # DPO's last 2 steps, then PPO's 4th iteration (saved: 2)
    assert r.returncode == -9 and "resumed out/align-dpo/resume.pt at step 4" in r.stdout, r.stdout + r.stderr[-3000:]
    assert "[sft] ended before" in r.stdout and "[rs] ended before" in r.stdout
    r = run("killed", "--resume")
    assert r.returncode == 0 and "resumed out/align-ppo/resume.pt at step 2" in r.stdout, r.stdout + r.stderr[-3000:]
    for stage in align.STAGES:
        whole, killed = (tmp_path / d / "out" / f"align-{stage}" for d in ("whole", "killed"))
        assert not os.path.exists(killed / "resume.pt")  # gone once the stage ended
        a, b = (torch.load(d / "consolidated.00.pth") for d in (whole, killed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
        logs = [json.loads((d / "align_log.json").read_text()) for d in (whole, killed)]
        assert logs[0]["history"] == logs[1]["history"] and logs[0]["result"] == logs[1]["result"], stage
    r = run("killed", "--resume", "--lr", "1e-3")
    assert r.returncode == 1 and "align-sft/align_log.json: a stage run with other flags (--lr None there, 0.001 " \
        "here)" in r.stderr, r.stderr
    sft_log = tmp_path / "killed" / "out" / "align-sft" / "align_log.json"  # as align.py wrote it before 2026-11-27
    sft_log.write_text(json.dumps({k: v for k, v in json.loads(sft_log.read_text()).items() if k != "result"}))
    r = run("killed", "--resume")
    assert r.returncode == 1 and "align-sft/align_log.json: a stage run with an older align.py" in r.stderr, r.stderr
    # a fresh chain over that one, killed in SFT's first step: the old chain's marks went with it, so --resume
    # runs every stage again (had it kept them, it would have taken the old chain's later stages as its own)
    assert run("killed", kill_at=1).returncode == -9
    r = run("killed", "--resume")
    assert r.returncode == 0 and "ended before" not in r.stdout and "[ppo] -> out/align-ppo" in r.stdout, r.stdout


def test_stage_state_refuses_other_flags_and_a_fresh_start_drops_it(tmp_path):
    """A saved loop state resumes only under the flags it was written with (the error names the flag and both
    values) and into the same shapes; a stage starting without --resume removes it (and the mark of a stage that
    ended), so that a later --resume never goes back to another run's state."""
    import argparse
    args = argparse.Namespace(out=str(tmp_path), ckpt_interval=2, resume=True, lr=1e-3, steps=6, seed=0)
    net = torch.nn.Linear(3, 2)
    align.StageState(args).save(2, 6, [{"loss": 1.0}], {"net": net})
    assert (tmp_path / "resume.pt").exists()
    with torch.no_grad():
        net.weight.zero_()
    step, history, extra = align.StageState(args).load({"net": net})
    assert (step, history, extra) == (2, [{"loss": 1.0}], {}) and net.weight.abs().sum() > 0  # weights back
    with pytest.raises(SystemExit, match=r"resume.pt: written with other flags \(--lr 0.001 there, 0.002 here\)"):
        align.StageState(argparse.Namespace(**{**vars(args), "lr": 2e-3})).load({"net": net})
    (tmp_path / "align_log.json").write_text("{}")
    align.forget(str(tmp_path))  # a stage starting without --resume
    assert not (tmp_path / "resume.pt").exists() and not (tmp_path / "align_log.json").exists()
    align.StageState(args).save(3, 6, [], {"net": net})  # every ckpt_interval steps only,
    align.StageState(args).save(6, 6, [], {"net": net})  # and not after the last (the stage's checkpoint then)
    assert not (tmp_path / "resume.pt").exists()
    args.ckpt_interval = None  # default: a tenth of the stage's steps
    align.StageState(args).save(3, 30, [], {"net": net})
    assert (tmp_path / "resume.pt").exists()
    with pytest.raises(SystemExit, match=r"resume.pt: does not fit this stage \(RuntimeError"):
        align.StageState(args).load({"net": torch.nn.Linear(3, 4)})  # another model's state


def test_cli_mistyped_paths_no_eval_and_a_resume_of_an_ended_stage(tok, tmp_path):
    """A --init or --rm that is not there, or an --rm that is no reward model: a one-line message naming it, before
    any training. `rm --n_eval 0` has no held-out pairs to score (it divided by zero). `--resume` of a stage that
    ended does nothing."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tok.save(str(tmp_path / "tok.model"))
    save_model(tiny_model(tok), tmp_path / "init", tokenizer_path=tmp_path / "tok.model")

    def run(stage, *a):
        return subprocess.run([sys.executable, os.path.join(repo, "align.py"), stage, "--steps", "2", "--n_prompts",
                               "8", "--n_eval", "4", *a], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    r = run("sft", "--init", str(tmp_path / "nothere"))
    assert r.returncode == 1 and r.stderr.strip() == f"{tmp_path / 'nothere'}: no such folder", r.stderr
    r = run("sft", "--init", str(tmp_path / "init"), "--rm", str(tmp_path / "typo"), "--out", str(tmp_path / "sft"))
    assert r.returncode == 1 and "typo" in r.stderr and "Traceback" not in r.stderr and "sft step" not in r.stdout
    # a --rm that is there but no reward model (a policy's folder): found before training too, not at its end
    r = run("sft", "--init", str(tmp_path / "init"), "--rm", str(tmp_path / "init"), "--out", str(tmp_path / "sft"))
    assert r.returncode == 1 and "is not a reward model written by `align.py rm`" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "sft step" not in r.stdout
    r = run("rm", "--init", str(tmp_path / "init"), "--out", str(tmp_path / "rm"), "--n_eval", "0")
    assert r.returncode == 0 and "held-out pair accuracy n/a (no held-out pairs" in r.stdout, r.stderr[-2000:]
    # a reward model of another tokenizer would score other text: refused, naming both
    other = Tokenizer.train(["other text entirely, " * 50], vocab_size=256 + 256 + 8)
    other.save(str(tmp_path / "other.model"))
    save_model(tiny_model(other), tmp_path / "init2", tokenizer_path=tmp_path / "other.model")
    r = run("sft", "--init", str(tmp_path / "init2"), "--rm", str(tmp_path / "rm"), "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and "trained with another tokenizer than --init" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "sft step" not in r.stdout
    # a bf16 checkpoint (Meta's and HF's are) is trained in fp32: the reward head and PPO's value head are fp32
    save_model(tiny_model(tok).to(torch.bfloat16), tmp_path / "bf16", tokenizer_path=tmp_path / "tok.model")
    r = run("rm", "--init", str(tmp_path / "bf16"), "--out", str(tmp_path / "rm16"), "--n_eval", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("sft", "--init", str(tmp_path / "init"), "--data", str(tmp_path), "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and r.stderr.strip() == f"{tmp_path}: a folder, not a JSONL file", r.stderr[-2000:]
    for flag in ("--k", "--batch_size", "--steps", "--n_prompts"):
        r = run("sft", "--init", str(tmp_path / "init"), flag, "0")
        assert r.returncode == 2 and f"{flag} must be >= 1" in r.stderr, r.stderr
    r = run("rs", "--init", str(tmp_path / "init"), "--rm", str(tmp_path / "rm"), "--temperature", "0")
    assert r.returncode == 2 and "--temperature must be > 0 (at temperature 0 the K samples" in r.stderr, r.stderr
    assert run("sft", "--init", str(tmp_path / "init"), "--out", str(tmp_path / "sft")).returncode == 0
    r = run("sft", "--init", str(tmp_path / "init"), "--out", str(tmp_path / "sft"), "--resume")
    assert r.returncode == 0 and "[sft] ended before" in r.stdout and "sft step" not in r.stdout, r.stdout


def test_sigterm_saves_the_stage_and_resume_goes_on_exactly(tok, tmp_path):
    """SIGTERM (a scheduler's preemption) in SFT's 3rd step of 6, no periodic saves: the step ends, the loop is saved,
    the process exits 0 saying so; --resume ends with the weights and history of an uninterrupted run. The same
    signal before the loop (as its optimizer is made; on a real model, during RS's sampling or DPO's reference
    log-probs) stops before any step with nothing saved (it used to act after the first step)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tok.save(str(tmp_path / "tok.model"))
    save_model(tiny_model(tok), tmp_path / "init", tokenizer_path=tmp_path / "tok.model")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(KILL_AT_STEP)

    def run(out, *a, **env):
        return subprocess.run([sys.executable, os.path.join(repo, "align.py"), "sft", "--init", str(tmp_path / "init"),
                               "--out", str(tmp_path / out), "--steps", "6", "--n_prompts", "32", "--n_eval", "4",
                               "--ckpt_interval", "0", *a], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(tmp_path / "site"), **env})
    assert run("whole").returncode == 0
    r = run("stopped", KILL_AT_STEP="3", KILL_SIGNAL="TERM", KILL_TIMES="2")  # twice, as Slurm + torchrun send it
    assert r.returncode == 0 and "stopped by SIGTERM after step 3 of 6" in r.stdout, r.stdout + r.stderr[-2000:]
    assert not (tmp_path / "stopped" / "consolidated.00.pth").exists()
    r = run("stopped", "--resume")
    assert r.returncode == 0 and "resumed" in r.stdout and "at step 3" in r.stdout, r.stdout + r.stderr[-2000:]
    a, b = (torch.load(tmp_path / d / "consolidated.00.pth") for d in ("whole", "stopped"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [json.loads((tmp_path / d / "align_log.json").read_text()) for d in ("whole", "stopped")]
    assert logs[0]["history"] == logs[1]["history"]
    # a signal before the loop (here as its optimizer is made): no step taken, nothing saved, exit 0
    r = run("early", KILL_AT_STEP="0", KILL_SIGNAL="TERM")
    assert r.returncode == 0 and "stopped by SIGTERM before the loop" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "sft step" not in r.stdout and not any((tmp_path / "early" / f).exists()
                                                  for f in ("resume.pt", "consolidated.00.pth"))
    r = run("early", "--resume")
    assert r.returncode == 0 and "nothing to resume" in r.stdout, r.stdout + r.stderr[-2000:]
    c = torch.load(tmp_path / "early" / "consolidated.00.pth")
    assert all(torch.equal(a[k], c[k]) for k in a)


# --- TRL's documented dataset formats (huggingface.co/docs/trl/dataset_formats) ----------------------------

def _U(c):
    return {"role": "user", "content": c}


def _A(c):
    return {"role": "assistant", "content": c}


def _write(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_trl_explicit_conversational_preference_loads(tmp_path):
    """TRL's recommended conversational preference record: chosen/rejected hold only the completion's messages."""
    for prompt in ([_U("What color is the sky?")],
                   [{"role": "system", "content": "Be brief."}, _U("What color is the sky?")],
                   [_U("hi"), _A("hello"), _U("What color is the sky?")]):
        path = _write(tmp_path / "pairs.jsonl", {"prompt": prompt, "chosen": [_A("It is blue.")],
                                                 "rejected": [_A("It is green.")]})
        assert align.load_pairs(path) == [{"prompt": prompt, "chosen": "It is blue.", "rejected": "It is green."}]


def test_trl_implicit_conversational_preference_loads(tmp_path):
    """TRL's implicit prompt (RewardTrainer's recommended form): the prompt is the messages chosen and rejected
    share, all of them (a system message, earlier turns), not only the last user turn."""
    for prompt in ([_U("What color is the sky?")],
                   [{"role": "system", "content": "Be brief."}, _U("hi"), _A("hello"), _U("What color is the sky?")]):
        path = _write(tmp_path / "pairs.jsonl", {"chosen": prompt + [_A("It is blue.")],
                                                 "rejected": prompt + [_A("It is green.")]})
        assert align.load_pairs(path) == [{"prompt": prompt, "chosen": "It is blue.", "rejected": "It is green."}]


@pytest.mark.parametrize("chosen, rejected", [
    # a chosen conversation about another question: its user turn is dropped, "blue" trained as the answer to "q"
    ([_U("something else"), _A("blue")], [_U("q"), _A("green")]),
    ([_U("q"), _A("blue")], [_U("something else"), _A("green")]),  # the same on the rejected side
    # conversations that go on past the prompt (TRL: the completion is everything after the prompt): the later
    # turns are dropped and the final answers are trained as answers to the first question
    ([_U("q"), _A("a1"), _U("q2"), _A("blue")], [_U("q"), _A("a1"), _U("q2"), _A("green")]),
])
def test_a_response_conversation_that_does_not_continue_the_prompt_is_refused(tmp_path, chosen, rejected):
    path = _write(tmp_path / "pairs.jsonl", {"prompt": [_U("q")], "chosen": chosen, "rejected": rejected})
    with pytest.raises(align.BadInput, match=r"pairs\.jsonl:1: '(chosen|rejected)'"):
        align.load_pairs(path)


def test_string_answers_that_repeat_the_prompt_are_told(tmp_path, capsys):
    """Both answers begin with the whole prompt (HH-RLHF-style transcripts beside a 'prompt' column: the prompt's
    tokens would be trained as the answer's), or a short prompt both answers echo ("Hello" -> "Hello! ..."): which
    one, the loader cannot tell, so it says so on stderr and loads them. Records that cannot be read name the
    field: an implicit prompt's 'chosen' that ends without an answer, a completion that is no string or list."""
    path = _write(tmp_path / "pairs.jsonl", {"prompt": "Reverse: a b c", "chosen": "Reverse: a b c\nc b a",
                                             "rejected": "Reverse: a b c\nb a c"},
                  {"prompt": "Hello\n", "chosen": "Hello! How can I help?", "rejected": "Hello."},
                  {"prompt": "Hi", "chosen": "Hi there.", "rejected": "Hello."})  # one answer echoes: not told
    assert len(align.load_pairs(path)) == 3
    assert "in 2 pairs both answers begin with the prompt (lines [1, 2])" in capsys.readouterr().err
    for chosen in ([], [_U("q")], [_A("a")], [_U("q"), _U("r")]):
        _write(tmp_path / "pairs.jsonl", {"chosen": chosen, "rejected": [_U("q"), _A("b")]})
        with pytest.raises(align.BadInput, match=r"pairs\.jsonl:1: 'chosen': a conversation that carries its prompt"):
            align.load_pairs(tmp_path / "pairs.jsonl")
    _write(tmp_path / "pairs.jsonl", {"chosen": [_U("q"), _A("a")]})
    with pytest.raises(align.BadInput, match=r"its keys: \['chosen'\]"):
        align.load_pairs(tmp_path / "pairs.jsonl")
    for completion in ({"role": "assistant", "content": "4"}, None, 4):
        _write(tmp_path / "sft.jsonl", {"prompt": "2+2?", "completion": completion})
        with pytest.raises(align.BadInput, match=r"sft\.jsonl:1: 'completion' must be a string or a list"):
            align.load_sft(tmp_path / "sft.jsonl")


@pytest.mark.parametrize("record", [
    {"prompt": [_U("What color is the sky?")], "completion": [_A("It is blue.")]},  # conversational
    {"prompt": "What color is the sky?", "completion": "It is blue."},  # standard, read as one chat turn
])
def test_sft_reads_prompt_completion(tmp_path, record):
    """SFTTrainer's other documented input type: prompt-completion."""
    path = _write(tmp_path / "sft.jsonl", record)
    assert align.load_sft(path) == [[_U("What color is the sky?"), _A("It is blue.")]]


def test_rs_trains_only_the_winning_answer_not_earlier_turns_of_the_prompt(tok, tmp_path, monkeypatch):
    """Rejection sampling is SFT on the winners: with a multi-turn prompt (load_prompts takes one), only the
    sampled, RM-picked final answer (and its <|eot_id|>) is a target; the prompt's own earlier assistant turn,
    which no reward model ranked, is not (as DPO's render() has it)."""
    import argparse
    prompt = [{"role": "user", "content": "Reverse: a b c"}, {"role": "assistant", "content": "h h h h"},
              {"role": "user", "content": "What is 1 + 2?"}]
    winner = prompt + [{"role": "assistant", "content": "3"}]
    policy = tiny_model(tok, context=128)
    monkeypatch.setattr(align, "load_init", lambda args, device: (policy, tok))
    monkeypatch.setattr(align, "load_reward_model", lambda path, device: None)
    monkeypatch.setattr(align, "load_prompts", lambda path: [prompt])
    monkeypatch.setattr(align, "rejection_sample", lambda *a, **kw: ([winner], torch.zeros(1, 2)))
    monkeypatch.setattr(align, "finish", lambda *a, **kw: {})
    seen = []
    pack = align.pack_sft
    monkeypatch.setattr(align, "pack_sft", lambda examples, n: (seen.extend(examples), pack(examples, n))[1])
    args = argparse.Namespace(rm="rm", data="prompts.jsonl", seed=0, n_eval=0, k=2, max_new=6, temperature=1.0,
                              steps=1, batch_size=1, lr=1e-4, n_prompts=1, out=str(tmp_path), resume=False,
                              ckpt_interval=0)
    align.stage_rs(args, "cpu")
    (ids, mask), = seen
    # reference: the targets are exactly the tokens of the final answer and its <|eot_id|>
    answer = tok.encode("3") + [tok.eot_id]
    assert [t for t, m in zip(ids, mask) if m] == answer


def _cli(tmp_path, *a):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, os.path.join(repo, "align.py"), *a], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)


def test_cli_refuses_out_with_all_and_run_with_one_stage(tmp_path):
    """`all` writes out/RUN-STAGE whatever --out says (over the default chain's folders, its marks removed first),
    and one stage writes to --out whatever --run says: each refused, before any work, not ignored."""
    r = _cli(tmp_path, "all", "--init", str(tmp_path / "nothere"), "--out", str(tmp_path / "mine"))
    assert r.returncode == 2 and "--out names one stage's folder" in r.stderr, r.stderr[-2000:]
    r = _cli(tmp_path, "sft", "--init", str(tmp_path / "nothere"), "--run", "mine")
    assert r.returncode == 2 and "--run names the folders of `all`" in r.stderr, r.stderr[-2000:]


def test_cli_refuses_a_kl_target_of_zero(tmp_path):
    """--kl_target 0 was taken, then PPO's first iteration divided by it (ZeroDivisionError, a traceback after the
    rollout); a negative target only ever shrank the coefficient. Refused before any work."""
    for bad in ("0", "-0.1"):
        r = _cli(tmp_path, "ppo", "--init", str(tmp_path / "nothere"), "--rm", str(tmp_path / "nothere"),
                 "--kl_target", bad)
        assert r.returncode == 2 and "--kl_target must be > 0" in r.stderr, r.stderr[-2000:]


def test_cli_refuses_an_infinite_lr_or_temperature(tmp_path):
    """(review, helper) --temperature inf passed (inf > 0), and sample_next now refuses it: a ValueError at the first
    sampling, after the stages before it had run; --lr inf made every weight NaN. Both refused before any work."""
    for flag in ("--lr", "--temperature"):
        r = _cli(tmp_path, "rs", "--init", str(tmp_path / "nothere"), "--rm", str(tmp_path / "nothere"), flag, "inf")
        assert r.returncode == 2 and "--lr and --temperature must be > 0" in r.stderr and "and finite" in r.stderr, \
            r.stderr[-2000:]


@pytest.mark.parametrize("stage, flag, value, refused", [
    ("dpo", "--beta", "0", True), ("dpo", "--beta", "-0.1", True), ("dpo", "--nll_coef", "-0.2", True),
    ("ppo", "--kl_coef", "-0.5", True), ("dpo", "--nll_coef", "0", False), ("ppo", "--kl_coef", "0", False)])
def test_cli_refuses_coefficients_that_turn_the_objective_around(tmp_path, stage, flag, value, refused):
    """β = 0 leaves DPO's term at log 2 with no gradient (only the NLL trains), β < 0 trains toward the rejected
    answers; a negative NLL or KL coefficient rewards what it is there to hold down. Each ran silently. An NLL or
    KL coefficient of 0 (no NLL term, no KL penalty) is taken: the command goes on to the missing --init."""
    r = _cli(tmp_path, stage, "--init", str(tmp_path / "nothere"), "--rm", str(tmp_path / "nothere"), flag, value)
    if refused:
        assert r.returncode == 2 and f"{flag} must be" in r.stderr, r.stderr[-2000:]
    else:
        assert r.returncode == 1 and r.stderr.strip() == f"{tmp_path / 'nothere'}: no such folder", r.stderr[-2000:]


def test_a_margin_too_large_for_a_float_is_reported(tmp_path):
    """JSON's integers have no limit: math.isfinite(10**400) raises OverflowError (a traceback, no file:line)."""
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1%s}\n' % ("0" * 400))
    with pytest.raises(align.BadInput, match=r"pairs\.jsonl:1: 'margin' must be a finite number"):
        align.load_pairs(path)


@pytest.mark.parametrize("record", [
    {"messages": [_U("What color is the sky?"), _A("")]},
    {"messages": [_U("hi"), _A(" \n"), _U("What color is the sky?"), _A("Blue.")]},
    {"prompt": "What color is the sky?", "completion": ""},
])
def test_sft_refuses_an_empty_assistant_message(tmp_path, record):
    """An assistant message with no text (a failed export, a dropped field) is valid JSON of the right shape, and
    SFT trained <|eot_id|> alone as the answer to its prompt: reported with file:line, as a malformed record."""
    path = _write(tmp_path / "sft.jsonl", {"messages": [_U("q"), _A("a")]}, record)
    with pytest.raises(align.BadInput, match=r"sft\.jsonl:2: 'messages': message \d \(the assistant's\) is empty"):
        align.load_sft(path)
    ok = [{"role": "system", "content": ""}, _U("q"), _A("a")]  # an empty system message is no answer: loaded
    assert align.load_sft(_write(tmp_path / "ok.jsonl", {"messages": ok})) == [ok]
