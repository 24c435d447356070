"""align.py — post-training, the Llama 2/3 way: SFT -> reward model -> rejection sampling -> DPO -> PPO.

One file, read top to bottom: the embedded task family and its checkers, the JSONL loaders for real data,
the losses as pure functions, the models around the transformer (a reward head; the policy's log-probs and value
head), then one function per stage.
Every stage reads a checkpoint in Meta's layout and writes one (model.save_model), so any stage's output
can be chatted with: `python sample.py --ckpt out/align-dpo --chat`; align_log.json beside it holds the stage's
settings and every step's metrics.

Design choices
- Embedded default data (no downloads): a generated family of small tasks with exact checkers — addition,
  sorting letters, counting a letter, reversing a word, tiny Python expressions (max/min/len). The checker plays
  the human annotator: it labels the preference pairs, and it gives held-out accuracy after every stage.
  Held-out prompts never appear in any training set (nor in the texts the small tokenizer is trained on).
- Preference pairs are on-policy, as in Llama 3 (§4.2.1: pairs are sampled from the latest models): K samples of
  the current policy per prompt, a correct one is "chosen" (else the checker's answer), an incorrect one is
  "rejected" (else a corrupted answer: a number off by one or two, or the letters shuffled).
- SFT (Llama 3 §4.1.3): conversations rendered by tokenizer.encode_dialog, loss only on assistant tokens and their
  <|eot_id|>, several conversations packed per row with document masking (doc_ids), never across conversations;
  the loss is the mean over the batch's assistant tokens (under DDP too: each rank weighs its share).
- Reward model (Llama 2 §3.2.2): the policy's transformer with a scalar head read at the last token (<|eot_id|>),
  Bradley–Terry loss with an optional margin; the head is saved beside the checkpoint as reward_head.pth.
- Rejection sampling (Llama 2 §3.2.3): K samples per prompt, the reward model keeps the best of those that ended
  with a stop token (a sample cut at --max_new is no whole answer), SFT on the winners.
- DPO (Rafailov et al. 2023) with Llama 3's two changes (§4.1.4): header and termination tokens masked out of the
  DPO loss, and an NLL term (coefficient 0.2) on the chosen response, its <|eot_id|> included (as SFT's loss has it:
  the stopping that DPO's term no longer sees); only the final response counts, not earlier
  assistant turns of a multi-turn prompt. Reference log-probs are computed once, under the policy's autocast.
- PPO (Ouyang et al. 2022; Ziegler et al. 2019): reward = reward-model score at the last token minus a per-token KL
  penalty to the frozen reference, with a fixed coefficient (adaptive with --kl_target); GAE; clipped policy and
  value losses; minibatch epochs; whitened advantages. The value head reads the policy's features detached: the
  value loss never moves the policy (a cheap stand-in for InstructGPT's separate value model). A response cut at
  --max_new is scored at its last token all the same, where the reward model never saw a sequence end (TRL's
  missing_eos_penalty is one remedy); the embedded tasks' answers fit in the default 16 tokens.
- DPO's and PPO's per-token log-probs (Policy, token_logprobs) and SFT's loss (model.cross_entropy) go a chunk of
  rows at a time: at Llama 3's 128K vocabulary the logits are never all held.
- `python align.py all` starts from a fresh small model (0.8M parameters) with a small BPE tokenizer trained on the
  task texts (written as out/align-base), so the whole chain runs in minutes on a 2-core CPU.
  `python align.py all --init out/default` starts from the pretrained model of `python train.py` instead
  (2.2M parameters, 8K vocabulary: an SFT step took 4.5x as long, 0.41 s; the chain 12.7 minutes on the same CPU).
  SFT, RM and DPO run under torchrun (DDP); RS and PPO in one process.
- A killed stage goes on exactly where it was with --resume (the same flags): every --ckpt_interval steps (default
  a tenth of the stage's) its loop (modules, optimizer, random generators, step, history) is saved to OUT/resume.pt,
  which goes once the stage's checkpoint and align_log.json (the mark of a stage that ended) are written; `all
  --resume` keeps the stages that ended and runs the rest. A stage started without --resume first removes both
  files. SIGTERM (a scheduler's preemption) or Ctrl-C stops the loop after its step, saved: exit 0, then --resume.
  What comes before a loop (generated pairs and winners, reference log-probs) is made again from the seed (a
  signal during it stops the stage as its loop would begin).
- On CPU one intra-op thread per process (unless OMP_NUM_THREADS is set): these matrices are too small for
  threads to pay, and on shared cores threads thrash (measured here: generation 20x faster with one thread).

Real data (JSONL, one record a line; a malformed record, a line that is not UTF-8, a prompt that does not end
with the user's turn, or an empty file is reported with its file and line number):
  SFT:      {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}, or TRL's
            {"prompt": "..." or [messages], "completion": "..." or [messages]}
  RM, DPO:  {"prompt": "..." or [messages], "chosen": "...", "rejected": "..."[, "margin": 1.0 (RM only)]}, each
            answer a string, [the assistant's message], or the whole conversation, the prompt first; without a
            "prompt", the conversations carry it (TRL's implicit prompt)
  RS, PPO:  {"prompt": "..." or [messages]}
Prompts longer than the context are truncated from the left (keeping <|begin_of_text|>) and counted.

Commands
  python align.py all                                   # the whole chain on the embedded tasks, CPU, minutes
  python align.py all --init out/default                # the same from the pretrained model (out/default-sft, ...)
  python align.py sft --init out/default --out out/default-sft [--data sft.jsonl]
  python align.py rm  --init out/default-sft --out out/default-rm [--data pairs.jsonl]
  python align.py rs  --init out/default-sft --rm out/default-rm --out out/default-rs [--data prompts.jsonl]
  python align.py dpo --init out/default-rs --out out/default-dpo [--data pairs.jsonl]
  python align.py ppo --init out/default-dpo --rm out/default-rm --out out/default-ppo [--data prompts.jsonl]
  torchrun --standalone --nproc_per_node=8 align.py sft --init ... --out ...     # sft, rm, dpo: DDP
  python align.py all --resume                          # after a kill: the same command, --resume added
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from model import (PRESETS, CheckpointError, Transformer, atomic_save, chunk_rows, load_model, load_pth,
                   model_dir, save_model, tokenizer_path)
from sample import generate, load_checkpoint, load_tokenizer
from tokenizer import Tokenizer, atomic_write, check_dialog

# ----------------------------------------------------------------------------------------------------------------
# 1. The embedded task family: prompts with exact answers, and the checker that plays the annotator.

TASK_KINDS = ("add", "sort", "count", "reverse", "python")
LETTERS = "abcdefgh"


def make_task(rng):
    """One random task: {"kind", "prompt", "answer"}. E.g. {"kind": "reverse", "prompt": "Reverse: d a c",
    "answer": "c a d"}. Letters and digits are written apart, so each is its own token whatever the BPE merged
    (a model cannot reverse or count what it cannot spell), and ranges are small on purpose: a model of a few
    hundred thousand parameters learns these in minutes."""
    kind = rng.choice(TASK_KINDS)
    letters = lambda alphabet, lo, hi: [rng.choice(alphabet) for _ in range(rng.randint(lo, hi))]
    if kind == "add":
        a, b = rng.randint(0, 19), rng.randint(0, 19)  # 400 sums: the held-out ones are a small share
        return dict(kind=kind, prompt=f"What is {a} + {b}?", answer=str(a + b))
    if kind == "sort":
        xs = rng.sample(LETTERS, rng.randint(3, 5))
        return dict(kind=kind, prompt="Sort the letters: " + " ".join(xs), answer=" ".join(sorted(xs)))
    if kind == "count":
        ch, xs = rng.choice("ab"), letters("abc", 3, 7)
        return dict(kind=kind, prompt=f"How many {ch} in: {' '.join(xs)}?", answer=str(xs.count(ch)))
    if kind == "reverse":
        xs = letters(LETTERS, 3, 5)
        return dict(kind=kind, prompt="Reverse: " + " ".join(xs), answer=" ".join(reversed(xs)))
    fn = rng.choice(("max", "min", "len"))  # "python": a one-line expression and what Python prints for it
    xs = [rng.randint(0, 9) for _ in range(rng.randint(2, 5) if fn == "len" else 3)]
    expr = f"len([{', '.join(map(str, xs))}])" if fn == "len" else f"{fn}({', '.join(map(str, xs))})"
    answer = {"len": len, "max": max, "min": min}[fn](xs)
    return dict(kind="python", prompt=f"Evaluate in Python: {expr}", answer=str(answer))


def check(task, response):
    """The annotator: is `response` the task's answer (ignoring surrounding and repeated whitespace)?"""
    return " ".join(response.split()) == task["answer"]


def corrupt(task, rng):
    """A plausible wrong answer, for a rejected response when the policy never erred:
    a number off by one or two, or the letters shuffled (one letter added when the shuffle gives the answer back,
    as it must when no shuffle can change it)."""
    ans = task["answer"]
    while True:
        if ans.isdigit():
            wrong = str(max(0, int(ans) + rng.choice((-2, -1, 1, 2))))
        else:
            sep = " " if " " in ans else ""
            xs = ans.split(sep) if sep else list(ans)
            rng.shuffle(xs)
            wrong = sep.join(xs) if sep.join(xs) != ans else ans + sep + rng.choice(LETTERS)
        if not check(task, wrong):
            return wrong


def task_split(n_train, n_eval, seed=0, stage=0):
    """(train, held-out) tasks. The held-out set depends only on `seed`, so every stage is scored on the same
    prompts; each stage draws its own training prompts (`stage`), none of them in the held-out set."""
    rng = random.Random(seed)
    held_out = {}
    while len(held_out) < n_eval:
        t = make_task(rng)
        held_out.setdefault(t["prompt"], t)
    rng = random.Random(1000 * seed + 1 + stage)
    train = []
    while len(train) < n_train:
        t = make_task(rng)
        if t["prompt"] not in held_out:
            train.append(t)
    return train, list(held_out.values())


def user(text):
    return [{"role": "user", "content": text}]


def task_conversation(task):
    """An SFT conversation: the task's prompt and its checked answer."""
    return user(task["prompt"]) + [{"role": "assistant", "content": task["answer"]}]


# ----------------------------------------------------------------------------------------------------------------
# 2. Real data: JSONL loaders for the usual shapes; a malformed record is reported with its file and line.

class BadInput(ValueError):
    """A --data file that is not what the stage reads (the message names file:line and the field), or a flag's
    value the model cannot take (the message names the flag): the command line shows it as one line."""


def read_jsonl(path):
    """Yield (line_number, record) for every non-blank line. A line that is not UTF-8 JSON, or a file with no
    records, raises BadInput naming path:line (or path). A byte-order mark (Windows editors write one) is skipped."""
    if os.path.isdir(path):
        raise BadInput(f"{path}: a folder, not a JSONL file")
    n = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8-sig"))
            except UnicodeDecodeError:
                raise BadInput(f"{path}:{lineno}: not UTF-8") from None
            except json.JSONDecodeError as e:
                raise BadInput(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            n += 1
            yield lineno, record
    if n == 0:
        raise BadInput(f"{path}: no records")


def _messages(x, where, last):
    """A string (one user message) or a list of {"role", "content"} messages in Llama 3's dialog shape
    (tokenizer.check_dialog) whose last message is `last`'s -> list of messages."""
    msgs = user(x) if isinstance(x, str) else x
    try:
        check_dialog(msgs)
    except ValueError as e:
        raise BadInput(f"{where}: {e}") from None
    if msgs[-1]["role"] != last:
        raise BadInput(f"{where}: the last message must be the {last}'s")
    return msgs


def _response(x, prompt, where):
    """An answer: a string; the assistant's message alone (TRL's explicit prompt); or the whole conversation, the
    prompt first (HH-RLHF's, TRL's implicit prompt) -> its text. A conversation that is not the prompt and one
    answer is refused: its other turns would be dropped and its answer trained as the answer to this prompt."""
    if isinstance(x, str):
        return x
    msgs = _messages(prompt + x if isinstance(x, list) and len(x) == 1 else x, where, "assistant")
    turns = lambda ms: [(m["role"], m["content"].strip()) for m in ms]  # noqa: E731  (as the chat format has them)
    if turns(msgs[:-1]) != turns(prompt):
        raise BadInput(f"{where}: a conversation must be the prompt's messages, then one assistant message")
    return msgs[-1]["content"]


def load_sft(path):
    """{"messages": [...]} per line, ending with an assistant turn (none of them empty), or TRL's {"prompt",
    "completion"} (each a string or messages) -> list of conversations."""
    out = []
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        if isinstance(rec, dict) and "messages" not in rec and {"prompt", "completion"} <= rec.keys():
            answer = rec["completion"]
            if not isinstance(answer, (str, list)):
                raise BadInput(f"{where}: 'completion' must be a string or a list of messages")
            rec = {"messages": _messages(rec["prompt"], f"{where}: 'prompt'", "user") +
                   ([{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer)}
        if not isinstance(rec, dict) or "messages" not in rec:
            raise BadInput(f"{where}: expected an object with a 'messages' list, or a 'prompt' and a 'completion'"
                           f"{f' (its keys: {sorted(rec)})' if isinstance(rec, dict) else ''}")
        msgs = _messages(rec["messages"], f"{where}: 'messages'", "assistant")
        empty = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and not m["content"].strip()]
        if empty:  # (the chat format strips it: <|eot_id|> alone would be trained as the answer)
            raise BadInput(f"{where}: 'messages': message {empty[0]} (the assistant's) is empty: SFT would train the "
                           "model to answer with nothing")
        out.append(msgs)
    return out


def load_pairs(path):
    """{"prompt", "chosen", "rejected"[, "margin"]} per line, the answers strings or messages (_response), or
    TRL's implicit prompt: {"chosen", "rejected"} conversations that share it -> list of {"prompt": messages,
    "chosen": str, "rejected": str[, "margin": float]}. A pair whose two answers are the same text (HH-RLHF has a
    few) teaches nothing and would count as a miss in every accuracy: it is dropped, and the drops are counted."""
    out, same, echo = [], [], []
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(rec, dict) or not {"chosen", "rejected"} <= rec.keys() or \
                "prompt" not in rec and not isinstance(rec["chosen"], list):
            keys = f", its keys: {sorted(rec)}" if isinstance(rec, dict) else ""
            raise BadInput(f"{where}: expected an object with 'prompt', 'chosen' and 'rejected' (answers that are "
                           f"conversations carry their prompt){keys}")
        if "prompt" not in rec:  # the implicit prompt: all of the chosen conversation but its answer
            c = rec["chosen"]
            if len(c) < 2 or not isinstance(c[-1], dict) or c[-1].get("role") != "assistant":
                raise BadInput(f"{where}: 'chosen': a conversation that carries its prompt ends with the "
                               "assistant's answer, after the prompt")
            rec = dict(rec, prompt=c[:-1])
        p, answers = rec["prompt"], (rec["chosen"], rec["rejected"])
        if isinstance(p, str) and p.strip() and all(isinstance(a, str) and a.strip().startswith(p.strip())
                                                    for a in answers):
            echo.append(lineno)  # (HH-RLHF's transcripts beside a 'prompt' column; or a short prompt both echo)
        prompt = _messages(p, f"{where}: 'prompt'", "user")
        pair = dict(prompt=prompt, chosen=_response(rec["chosen"], prompt, f"{where}: 'chosen'"),
                    rejected=_response(rec["rejected"], prompt, f"{where}: 'rejected'"))
        if "margin" in rec:  # Llama 2's preference strength, for the reward model's loss
            m = rec["margin"]
            # (abs(m) <= the largest float: False for NaN and inf, and for a JSON integer past a float's range, where
            # math.isfinite raised OverflowError)
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not abs(m) <= sys.float_info.max:
                raise BadInput(f"{where}: 'margin' must be a finite number, got {m!r}")
            pair["margin"] = float(m)
        if pair["chosen"].strip() == pair["rejected"].strip():  # the chat format strips them: the same tokens
            same.append(lineno)
            continue
        out.append(pair)
    if same:
        print(f"{path}: dropped {len(same)} pairs whose chosen and rejected are the same (lines {same[:5]}"
              f"{', ...' if len(same) > 5 else ''})", file=sys.stderr)
    if echo:
        print(f"{path}: in {len(echo)} pairs both answers begin with the prompt (lines {echo[:5]}"
              f"{', ...' if len(echo) > 5 else ''}): if they hold it, give the answers alone, else its tokens are "
              "trained as the answer's", file=sys.stderr)
    if not out:
        raise BadInput(f"{path}: no pair with two different answers")
    return out


def load_prompts(path):
    """{"prompt": ...} per line, ending with a user turn -> list of prompts (lists of messages)."""
    out = []
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(rec, dict) or "prompt" not in rec:
            raise BadInput(f"{where}: expected an object with a 'prompt'")
        out.append(_messages(rec["prompt"], f"{where}: 'prompt'", "user"))
    return out


# ----------------------------------------------------------------------------------------------------------------
# 3. Tokens: rendering, left truncation, padding, packing, per-token log-probs.

class Truncations:
    """Counts sequences cut to fit the context, so each stage can say how many it cut."""
    n = 0


def truncate_left(ids, n, mask=None):
    """Keep <|begin_of_text|> and the last n-1 tokens: the end of a prompt is what the answer depends on."""
    if len(ids) <= n:
        return ids if mask is None else (ids, mask)
    Truncations.n += 1
    ids = ids[:1] + ids[len(ids) - n + 1:]
    return ids if mask is None else (ids, mask[:1] + mask[len(mask) - n + 1:])


def render(tok, prompt, response):
    """(ids, mask) of `prompt` (messages) answered by `response`; mask on the answer tokens and its <|eot_id|>
    only, not on the assistant turns of a multi-turn prompt (encode_dialog's mask marks every assistant turn)."""
    ids, mask = tok.encode_dialog(prompt + [{"role": "assistant", "content": response}])
    n = len(tok.encode_dialog_prompt(prompt))  # the prompt and the open assistant header
    return list(ids), [0] * n + list(mask[n:])


def render_prompt(tok, prompt, max_len):
    """Prompt ids ending with the open assistant header, left-truncated to max_len (callers leave room to answer)."""
    return truncate_left(list(tok.encode_dialog_prompt(prompt)), max_len)


def pad(rows, value=0):
    """list of lists of ints -> LongTensor (B, T_max), right-padded with `value`."""
    out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def pack_sft(examples, seq_len):
    """Pack (ids, mask) conversations into rows of seq_len: several per row, never split, never attending across
    (each gets its own doc id; the padding at a row's end gets one too). Targets are -100 where mask is 0, so
    system, user and header tokens are never trained on. Returns x, y, doc_ids: LongTensors (N, seq_len).
    E.g. seq_len=6, ids [1,2,3] mask [0,1,1] and ids [1,4] mask [0,1] -> x [1,2,1,0,0,0], y [2,3,4,-100,-100,-100],
    doc_ids [0,0,1,2,2,2]."""
    rows, row, doc = [], [], 0
    for ids, mask in examples:
        ids, mask = truncate_left(list(ids), seq_len + 1, list(mask))
        x, y = ids[:-1], [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
        if len(row) + len(x) > seq_len:  # this conversation does not fit: start a new row
            rows.append(row)
            row, doc = [], 0
        row += [(a, b, doc) for a, b in zip(x, y)]
        doc += 1
    rows.append(row)
    X = torch.zeros(len(rows), seq_len, dtype=torch.long)
    Y = torch.full((len(rows), seq_len), -100, dtype=torch.long)
    D = torch.zeros(len(rows), seq_len, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r)
        X[i, :n] = torch.tensor([a for a, _, _ in r])
        Y[i, :n] = torch.tensor([b for _, b, _ in r])
        D[i, :n] = torch.tensor([d for *_, d in r])
        D[i, n:] = (D[i, n - 1] + 1) if n else 0
    return X, Y, D


def token_logprobs(h, weight, tokens, chunk=None):
    """log p(tokens[:, t+1] | tokens[:, :t+1]) for every t: (B, T-1), from the final hidden states h (B, T, C) and
    the output matrix weight (V, C), a chunk of rows at a time (model.chunk_rows): at 128K vocabulary a DPO batch of
    16 x 2048 tokens has 17 GB of fp32 logits. With several chunks, backward makes each one's logits again
    (activation checkpointing: the loss weighs every log-prob, so the gradient cannot be made in the forward, as
    cross_entropy's is); a lone chunk is kept, as plain autograd keeps it."""
    if h.shape[:-1] != tokens.shape:
        raise ValueError(f"token_logprobs: hidden states {tuple(h.shape)} and tokens {tuple(tokens.shape)} do not "
                         "pair up (want h (B, T, dim) and tokens (B, T))")
    h, tokens = h[:, :-1], tokens[:, 1:]
    B, T = tokens.shape
    h, tokens = h.reshape(B * T, -1), tokens.reshape(B * T)
    chunk = chunk or chunk_rows(weight)
    pieces = [(h[i:i + chunk], weight, tokens[i:i + chunk]) for i in range(0, B * T, chunk)]
    if len(pieces) == 1:
        return _chunk_logprobs(*pieces[0]).view(B, T)
    return torch.cat([checkpoint(_chunk_logprobs, *p, use_reentrant=False) for p in pieces]).view(B, T)


def _chunk_logprobs(h, weight, tokens):
    logp = F.log_softmax(F.linear(h, weight).float(), dim=-1)  # (rows, V): what model(tokens) gives, log-softmaxed
    return logp.gather(-1, tokens[:, None]).squeeze(-1)


def loss_mask(tok, ids, mask):
    """Llama 3's DPO mask (§4.1.4): the assistant's tokens, minus header and termination tokens
    (<|eot_id|>, <|end_of_text|>, <|start_header_id|>, <|end_header_id|>), shifted to line up with token_logprobs."""
    drop = {tok.eot_id, tok.eos_id, tok.start_header_id, tok.end_header_id}
    return [int(m and t not in drop) for t, m in zip(ids[1:], mask[1:])]


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------------------------
# 4. The losses, as pure functions of tensors.

def bradley_terry_loss(r_chosen, r_rejected, margin=None):
    """Reward-model loss, Llama 2 eq. 1-2: -log σ(r_chosen - r_rejected - margin); r_* (B,), margin (B,) or None.
    Equal scores give log 2; the margin asks for a larger gap on pairs the annotator found clearly different."""
    diff = r_chosen - r_rejected - (0 if margin is None else margin)
    return -F.logsigmoid(diff).mean()


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1):
    """DPO, Rafailov et al. 2023 eq. 7: -log σ(β[(log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r))]).
    Inputs (B,): log-probs of the whole response (summed over its masked tokens). A policy equal to its reference
    gives exactly log 2. Also returns the implicit rewards β·(log π - log π_ref) of chosen and rejected, for logging."""
    chosen_reward = beta * (pi_chosen - ref_chosen)
    rejected_reward = beta * (pi_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
    return loss, chosen_reward.detach(), rejected_reward.detach()


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016): rewards, values, mask (B, T) -> advantages, returns.
    δ_t = r_t + γ V_{t+1} - V_t,  A_t = δ_t + γλ A_{t+1}, with V and A zero after the last unmasked step
    (the episode ends there). Returns = A + V are the value targets."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv[:, t] = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value = values[:, t] * mask[:, t]  # past the end of a sequence: terminal, value 0
        next_adv = adv[:, t]
    return adv, adv + values


def whiten(x, mask):
    """Advantages normalised to mean 0 and std 1 over the valid tokens (stabilises the policy step)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def ppo_policy_loss(logp, old_logp, adv, mask, clip=0.2):
    """PPO's clipped surrogate, Schulman et al. 2017 eq. 7: -min(ρ A, clip(ρ, 1-ε, 1+ε) A), ρ = π/π_old.
    All (B, T). Returns the loss and the fraction of tokens where the clip was active."""
    ratio = torch.exp(logp - old_logp)
    clipped = -adv * ratio.clamp(1 - clip, 1 + clip)
    loss = torch.max(-adv * ratio, clipped)
    # active: the clipped term won the max (the token gives no gradient); a ratio outside the range whose
    # unclipped term is the larger (a loss not capped: the pessimistic bound) does not count
    clipfrac = masked_mean((clipped > -adv * ratio).float(), mask)
    return masked_mean(loss, mask), clipfrac


def ppo_value_loss(values, old_values, returns, mask, clip=0.2):
    """Clipped value loss (as in OpenAI baselines' PPO2): ½ max((V - R)², (V_clipped - R)²), V_clipped within ±ε
    of the value at rollout time, so one update cannot move the value far either."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def kl_shaped_rewards(score, logp, ref_logp, mask, kl_coef):
    """Per-token reward (Ziegler et al. 2019; Ouyang et al. 2022 eq. 2): -β·(log π - log π_ref) on every response
    token, plus the reward model's score on the last one. score (B,), the rest (B, T) -> (B, T)."""
    rewards = -kl_coef * (logp - ref_logp) * mask
    last = mask.cumsum(1).argmax(1)  # index of each row's last response token
    rewards[torch.arange(len(score)), last] += score
    return rewards


class AdaptiveKL:
    """Adaptive KL coefficient, Ziegler et al. 2019 §2.2: nudge β so the measured KL tracks a target.
    β ← β·(1 + clip(KL/target - 1, -0.2, 0.2)·n/horizon). target=None keeps β fixed."""

    def __init__(self, coef, target=None, horizon=10000):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl, n_steps):
        if self.target is not None:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.coef *= 1 + error * n_steps / self.horizon


# ----------------------------------------------------------------------------------------------------------------
# 5. Models around the transformer: a reward head; the policy (its log-probs, a value head).

class RewardModel(nn.Module):
    """Llama 2 §3.2.2: the chat model's transformer with the next-token head swapped for a scalar head,
    read at each sequence's last token (the <|eot_id|> closing the answer), so the score sees the whole exchange."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.args.dim, 1)
        nn.init.zeros_(self.head.weight)  # every response starts at score 0; the BT gradient still flows (h_c != h_r)
        nn.init.zeros_(self.head.bias)
        if backbone.output.weight is not backbone.tok_embeddings.weight:
            backbone.output.requires_grad_(False)  # unused here; frozen so DDP does not wait for its gradient

    def forward(self, tokens, last):
        h = self.backbone.hidden_states(tokens)  # (B, T, C)
        return self.head(h[torch.arange(len(tokens), device=h.device), last]).squeeze(-1).float()  # (B,)


def save_reward_model(rm, out_dir, tokenizer_file):
    """Meta's layout for the transformer (sample.py can load it) + reward_head.pth beside it. An old head is removed
    first: a process killed between the two writes leaves a directory that is refused, never a new transformer
    read with an old head."""
    head = os.path.join(out_dir, "reward_head.pth")
    if os.path.exists(head):
        os.remove(head)
    save_model(rm.backbone, out_dir, tokenizer_path=tokenizer_file)
    atomic_save(rm.head.state_dict(), head)


def reward_head(path):
    """path/reward_head.pth, when path is a reward model's folder; else the error that says what it is."""
    head = os.path.join(model_dir(path), "reward_head.pth")
    if not os.path.exists(head):
        raise FileNotFoundError(f"{head} not found: {path} is not a reward model written by `align.py rm`")
    return head


def load_reward_model(path, device="cpu"):
    head = reward_head(path)
    rm = RewardModel(load_model(path, device=device, dtype=torch.float32))
    rm.head.load_state_dict(load_pth(head))  # (CRC-checked, like the transformer's weights)
    return rm.to(device)


class Policy(nn.Module):
    """A language model read as a policy over its next tokens: tokens (B, T) -> log-probs of tokens[:, 1:]
    (token_logprobs, (B, T-1)) and, with a value head (PPO), the values of the same positions (B, T-1; else None).
    The value head reads the features detached: the value loss trains only the head and never moves the policy.
    DPO and PPO train through this module (DDP wraps it), so the logits are never all held."""

    def __init__(self, model, value_head=False):
        super().__init__()
        self.model = model
        self.value_head = nn.Linear(model.args.dim, 1) if value_head else None
        if value_head:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, tokens):
        h = self.model.hidden_states(tokens)  # (B, T, C)
        values = self.value_head(h[:, :-1].detach()).squeeze(-1).float() if self.value_head else None
        return token_logprobs(h, self.model.output.weight, tokens), values


# ----------------------------------------------------------------------------------------------------------------
# 6. Sampling, scoring, evaluating.

def device_of(module):
    return next(module.parameters()).device


SFT_ROW = 8192  # tokens per packed SFT row at most: Llama 3's pretraining context (a 3.1 download's is 128K, and
                # --batch_size rows of it would be a million tokens a step)


def prompt_room(model, max_new):
    """Tokens a prompt may keep when max_new more must fit after it; a response of over half the context is
    refused rather than leaving every prompt cut to a few tokens."""
    n = model.args.max_seq_len
    if not 0 < max_new <= n // 2:
        raise BadInput(f"--max_new {max_new}: responses take 1 to {n // 2} tokens (half the model's context of {n}), "
                       "the rest is the prompt's")
    return n - max_new


@torch.no_grad()
def sample_responses(model, tok, prompt_ids, max_new, temperature=1.0, greedy=False, generator=None, batch_size=64):
    """Responses (token lists, the stop token included if one was hit) for each prompt, via sample.generate."""
    out = []
    for i in range(0, len(prompt_ids), batch_size):
        tokens, _ = generate(model, prompt_ids[i:i + batch_size], max_new, temperature=temperature,
                             top_k=1 if greedy else None, stop_ids=tok.stop_ids, generator=generator)
        out += tokens
    return out


def response_text(tok, tokens):
    return tok.decode([t for t in tokens if t not in tok.stop_ids])


def exchange(tok, prompt_ids, response):
    """prompt + response as the reward model learned them: closed by <|eot_id|>, also when the sample stopped on
    <|end_of_text|> or <|eom_id|> (the same whole answer; a score read at a token the RM was never trained at is
    noise the policy could learn to exploit)."""
    if response and response[-1] in tok.stop_ids:
        response = response[:-1] + [tok.eot_id]
    return prompt_ids + response


@torch.no_grad()
def rm_scores(rm, seqs, batch_size=64):
    """Reward-model score of each full sequence (prompt + response tokens), read at its last token -> (N,)."""
    dev, out = device_of(rm), []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        last = torch.tensor([len(s) - 1 for s in chunk], device=dev)
        out.append(rm(pad(chunk).to(dev), last).cpu())
    return torch.cat(out)


@torch.no_grad()
def evaluate(model, tok, tasks, rm=None, max_new=16):
    """Held-out accuracy of greedy answers, overall and per task kind, and their mean reward-model score."""
    prompts = [render_prompt(tok, user(t["prompt"]), prompt_room(model, max_new)) for t in tasks]
    responses = sample_responses(model, tok, prompts, max_new, greedy=True)
    correct = [check(t, response_text(tok, r)) for t, r in zip(tasks, responses)]
    res = {"accuracy": sum(correct) / len(tasks)}
    for kind in TASK_KINDS:
        ks = [c for t, c in zip(tasks, correct) if t["kind"] == kind]
        res[kind] = sum(ks) / max(1, len(ks))
    if rm is not None:
        res["reward"] = rm_scores(rm, [exchange(tok, p, r) for p, r in zip(prompts, responses)]).mean().item()
    return res


def preference_pairs(policy, tok, tasks, k, max_new, temperature=1.0, seed=0):
    """Checker-labelled pairs on the policy's own samples (Llama 3 §4.2.1 samples pairs from the latest policy):
    chosen = a correct sample (else the checker's answer), rejected = a wrong one (else a corrupted answer).
    Returns the pairs and the fraction of samples that were correct."""
    rng = random.Random(seed)
    gen = torch.Generator(device=device_of(policy)).manual_seed(seed)
    prompts = [render_prompt(tok, user(t["prompt"]), prompt_room(policy, max_new)) for t in tasks]
    responses = sample_responses(policy, tok, [p for p in prompts for _ in range(k)], max_new, temperature,
                                 generator=gen)
    pairs, n_good = [], 0
    for i, t in enumerate(tasks):
        texts = [response_text(tok, r) for r in responses[i * k:(i + 1) * k]]
        good = [x for x in texts if check(t, x)]
        bad = [x for x in texts if not check(t, x)]
        n_good += len(good)
        pairs.append(dict(prompt=user(t["prompt"]), chosen=good[0] if good else t["answer"],
                          rejected=bad[0] if bad else corrupt(t, rng)))
    return pairs, n_good / (k * len(tasks))


# ----------------------------------------------------------------------------------------------------------------
# 7. Distributed set-up and the training loop the stages share.

RANK, WORLD, WAITING_ROOM = 0, 1, None


def setup_device():
    """torchrun sets RANK: then one process per device, gloo on CPU, nccl on GPUs (like train.py), and a gloo group
    with no practical time limit for barrier(): there the other ranks wait while rank 0 alone saves and evaluates
    (generation: it can outlast the training group's timeout, NCCL's 10 minutes)."""
    global RANK, WORLD, WAITING_ROOM
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        RANK, WORLD = dist.get_rank(), dist.get_world_size()
        WAITING_ROOM = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    return device


def barrier():
    if dist.is_initialized():
        dist.barrier(group=WAITING_ROOM)


STOP = []  # the signal that asked the command line to stop: SIGTERM (a scheduler's preemption) or Ctrl-C


def on_signal(signum, frame):
    """The first SIGTERM or Ctrl-C stops the stage's loop after its current step, saved for --resume (StageState);
    Ctrl-C again stops at once. SIGTERM again is ignored, to the end: Slurm signals every process of a job and
    torchrun forwards its own copy, so a worker gets the same preemption twice, and must still save."""
    if STOP and signum == signal.SIGINT:
        raise KeyboardInterrupt
    STOP[:] = STOP or [signum]
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def signalled():
    """Whether any rank got a signal: all stop after the same step (DDP's replicas must stay equal)."""
    flag = torch.tensor([float(len(STOP))])
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=WAITING_ROOM)
    return flag.item() > 0


def signal_name():
    return signal.Signals(STOP[0]).name if STOP else "a signal to another process"


class Stopped(Exception):
    """A signal ended a stage: its loop saved after a step, or no step taken yet (the command line says so and
    exits 0)."""


def log(*a):
    if RANK == 0:
        print(*a, flush=True)


def run_flags(args):
    """The flags that decide what a stage computes: a resumed stage must have the same ones."""
    return {k: v for k, v in vars(args).items() if k not in ("resume", "ckpt_interval")}


def flag_changes(saved, flags):
    """How this command's flags differ from a saved run's (both {flag: value}), one '--flag there, here' each."""
    return [f"--{k} {saved.get(k)!r} there, {v!r} here" for k, v in flags.items() if saved.get(k) != v]


def forget(out):
    """A stage starting over: what an earlier run left in its folder goes first (resume.pt, and align_log.json, the
    mark of a stage that ended), so that a later --resume can never go back to it."""
    for name in ("resume.pt", "align_log.json"):
        if RANK == 0 and os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


class StageState:
    """A stage's training loop in OUT/resume.pt (modules, optimizer, random generators, step, history), written
    atomically by rank 0 every --ckpt_interval steps, for --resume (the module docstring tells the whole story)."""

    def __init__(self, args=None):
        self.path = os.path.join(args.out, "resume.pt") if args else None
        self.every, self.resume = (args.ckpt_interval, args.resume) if args else (0, False)
        self.flags = run_flags(args) if args else None

    def load(self, parts):
        """Restore parts ({name: module, optimizer, torch.Generator or random.Random}) in place, with --resume ->
        (step, history, extra); (0, [], {}) with nothing to resume. A signal before the loop stops here."""
        if self.path and signalled():
            raise Stopped(f"stopped by {signal_name()} before the loop of this stage began: the same command with "
                          "--resume goes on from its last save, if any")
        if not self.resume or not self.path:
            return 0, [], {}
        if not os.path.exists(self.path):
            log(f"nothing to resume in {os.path.dirname(self.path)}: the stage starts from --init")
            return 0, [], {}
        state = load_pth(self.path)
        try:
            changed = flag_changes(state["flags"], self.flags)
            if changed:
                raise SystemExit(f"{self.path}: written with other flags ({'; '.join(changed)}): resume with the "
                                 "same ones, or drop --resume to start the stage over")
            for name, obj in parts.items():
                if isinstance(obj, torch.Generator):
                    obj.set_state(state[name])
                elif isinstance(obj, random.Random):
                    obj.setstate(state[name])
                else:  # a module (DDP's unwrapped: any number of processes) or an optimizer
                    getattr(obj, "module", obj).load_state_dict(state[name])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:  # another model, another stage's state...
            raise SystemExit(f"{self.path}: does not fit this stage ({type(e).__name__}: {e}); drop --resume to "
                             "start the stage over") from None
        torch.set_rng_state(state["torch_rng"])
        log(f"resumed {self.path} at step {state['step']}")
        return state["step"], state["history"], state["extra"]

    def save(self, step, steps, history, parts, extra=None):
        """After `step` of `steps` steps, every `every` of them, and after a signal, then raising Stopped (not
        after the last step: the stage's checkpoint comes then). Rank 0 writes (DDP's replicas are equal); the
        others wait, out of the training group's timeout."""
        every = max(1, steps // 10) if self.every is None else self.every
        if not self.path or step >= steps:
            return
        stop = signalled()
        if not stop and (not every or step % every):
            return
        if RANK == 0:
            state = {"step": step, "history": history, "flags": self.flags, "extra": extra or {},
                     "torch_rng": torch.get_rng_state()}
            for name, obj in parts.items():
                state[name] = (obj.get_state() if isinstance(obj, torch.Generator) else obj.getstate()
                               if isinstance(obj, random.Random) else getattr(obj, "module", obj).state_dict())
            atomic_save(state, self.path)
        barrier()
        if stop:
            raise Stopped(f"stopped by {signal_name()} after step {step} of {steps}: the same command with --resume "
                          f"goes on from {self.path}")


def wrap_ddp(module):
    """DDP averages gradients across processes during backward; a single process trains the module as is."""
    if not dist.is_initialized():
        return module
    return DDP(module, device_ids=[device_of(module)] if device_of(module).type == "cuda" else None)


def batch_indices(n, batch_size, step, seed=0):
    """The global batch at `step`: epochs of a seeded permutation, the same on every rank. Each rank trains on
    batch[RANK::WORLD]: equal shares, which DDP's gradient average weighs equally."""
    if batch_size % WORLD:
        raise ValueError(f"batch size {batch_size} is not a multiple of the {WORLD} processes")
    if n < batch_size and WORLD > 1:  # the batch would be all n, shared unevenly (or not at all) by the ranks
        raise ValueError(f"{n} examples for a batch of {batch_size} in {WORLD} processes: give more data or a "
                         "smaller --batch_size")
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return perm[i * batch_size:(i + 1) * batch_size].tolist()


def autocast(module):
    """bf16 autocast on CUDA (every forward pass whose results meet in one loss: policy and reference alike)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device_of(module).type == "cuda" else nullcontext()


def optimize(module, step_loss, steps, lr, name, warmup=10, log_every=25, state=None):
    """The loop every stage shares, in nanoGPT's order: set lr, forward + backward, clip, step, log.
    step_loss(step) -> (loss, {metric: float}), a function of the step alone (batch_indices), so a loop resumed
    from a StageState takes the same steps. AdamW without weight decay (a fine-tune); linear warm-up, then linear
    decay to lr/10. bf16 autocast on CUDA."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    amp = autocast(module)
    state = state or StageState()
    start, history, _ = state.load({"module": module, "opt": opt})
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * (1 - 0.9 * step / steps)
        with amp:
            loss, metrics = step_loss(step)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        logged = loss.detach().float()
        if WORLD > 1:  # each rank's loss is of its share of the batch: the log keeps the whole batch's
            dist.all_reduce(logged)
            logged /= WORLD
        history.append({"loss": logged.item(), **metrics})
        if step % log_every == 0 or step == steps - 1:
            log(f"{name} step {step:4d}/{steps} " + " ".join(f"{k} {v:.4f}" for k, v in history[-1].items()))
        state.save(step + 1, steps, history, {"module": module, "opt": opt})
    return history


# ----------------------------------------------------------------------------------------------------------------
# 8. The stages. Each train_* function takes a model and data and returns its history; the CLI wraps them below.

def train_sft(model, tok, conversations, steps, batch_size, lr, name="sft", state=None, seed=0, final_only=False):
    """SFT (Llama 3 §4.1.3): next-token loss on the assistant's tokens only; conversations packed with doc masks.
    The loss is the mean over the batch's target tokens, however many each row holds. final_only (rejection
    sampling): only the last assistant message is a target, not the earlier turns of a multi-turn prompt."""
    examples = [render(tok, c[:-1], c[-1]["content"]) if final_only else tok.encode_dialog(c) for c in conversations]
    X, Y, D = pack_sft(examples, min(model.args.max_seq_len, SFT_ROW))  # (N, T) each
    net, dev = wrap_ddp(model), device_of(model)

    def step_loss(step):
        batch = batch_indices(len(X), batch_size, step, seed)
        idx = batch[RANK::WORLD]
        loss = net(X[idx].to(dev), targets=Y[idx].to(dev), doc_ids=D[idx].to(dev))  # mean over this rank's targets
        # DDP averages the ranks' gradients: weigh each rank by its share of the batch's targets
        share = (Y[idx] != -100).sum() * WORLD / (Y[batch] != -100).sum()
        return loss * share, {}
    return optimize(net, step_loss, steps, lr, name, state=state)


def _pair_rows(tok, pairs, max_len):
    """Render each pair twice: (chosen ids, chosen loss mask, rejected ids, rejected loss mask). Where the longer
    one is over max_len, both lose the same prompt tokens after <|begin_of_text|>, so both answer the same prompt;
    an answer too long even without its prompt is then cut from its start, on its side alone (truncate_left)."""
    rows = []
    for p in pairs:
        c_ids, c_mask = render(tok, p["prompt"], p["chosen"])
        r_ids, r_mask = render(tok, p["prompt"], p["rejected"])
        cut = min(max(len(c_ids), len(r_ids)) - max_len, len(tok.encode_dialog_prompt(p["prompt"])) - 1)
        if cut > 0:
            c_ids, c_mask, r_ids, r_mask = (s[:1] + s[1 + cut:] for s in (c_ids, c_mask, r_ids, r_mask))
            Truncations.n += 2 - sum(len(ids) > max_len for ids in (c_ids, r_ids))  # truncate_left counts the rest
        (c_ids, c_mask), (r_ids, r_mask) = truncate_left(c_ids, max_len, c_mask), truncate_left(r_ids, max_len, r_mask)
        rows.append((c_ids, loss_mask(tok, c_ids, c_mask), r_ids, loss_mask(tok, r_ids, r_mask)))
    return rows


def train_rm(rm, tok, pairs, steps, batch_size, lr, state=None, seed=0):
    """Reward model: Bradley–Terry on (chosen, rejected), both in one forward; a pair may carry a "margin"."""
    rows = _pair_rows(tok, pairs, rm.backbone.args.max_seq_len)
    margins = torch.tensor([float(p.get("margin", 0.0)) for p in pairs])
    net, dev = wrap_ddp(rm), device_of(rm)

    def step_loss(step):
        idx = batch_indices(len(rows), batch_size, step, seed)[RANK::WORLD]
        seqs = [rows[i][0] for i in idx] + [rows[i][2] for i in idx]  # chosen then rejected
        last = torch.tensor([len(s) - 1 for s in seqs], device=dev)
        r_chosen, r_rejected = net(pad(seqs).to(dev), last).chunk(2)  # (b,), (b,)
        loss = bradley_terry_loss(r_chosen, r_rejected, margins[idx].to(dev))
        return loss, {"acc": (r_chosen > r_rejected).float().mean().item()}
    return optimize(net, step_loss, steps, lr, "rm", state=state)


@torch.no_grad()
def rm_accuracy(rm, tok, pairs):
    """Pairwise accuracy: how often the reward model scores chosen above rejected."""
    rows = _pair_rows(tok, pairs, rm.backbone.args.max_seq_len)
    r_chosen = rm_scores(rm, [r[0] for r in rows])
    r_rejected = rm_scores(rm, [r[2] for r in rows])
    return (r_chosen > r_rejected).float().mean().item()


def response_logprobs(policy, seqs, masks):
    """Summed log-prob of each sequence's masked (response) tokens: seqs (B lists), masks (B lists, len-1) ->
    (summed log-probs (B,), masked tokens per row (B,), log-prob of each sequence's last token (B,): the
    <|eot_id|> closing its answer, which loss_mask leaves out). policy: a Policy (or DDP of one)."""
    tokens = pad(seqs).to(device_of(policy))
    m = pad(masks).to(tokens.device).float()  # (B, T-1), lines up with token_logprobs
    logp = policy(tokens)[0]  # (B, T-1)
    last = torch.tensor([len(s) - 2 for s in seqs], device=tokens.device)  # the position that predicts the last token
    return (logp * m).sum(-1), m.sum(-1), logp[torch.arange(len(seqs), device=tokens.device), last]


def train_dpo(policy, ref, tok, pairs, steps, batch_size, lr, beta=0.1, nll_coef=0.2, state=None, seed=0):
    """DPO with Llama 3's changes: header/termination tokens out of DPO's sums, NLL (per token) on chosen."""
    rows = _pair_rows(tok, pairs, policy.args.max_seq_len)

    @torch.no_grad()
    def reference_logprobs(j):  # the reference never changes: its log-probs once, in batches of 64, under the
        with autocast(ref):     # policy's autocast: a policy equal to its reference gives log 2 (in bf16 on a GPU
            # to rounding: its batches are padded to other lengths than the training steps', other kernels run)
            chunks = [rows[i:i + 64] for i in range(0, len(rows), 64)]
            lps = [response_logprobs(Policy(ref), [r[j] for r in c], [r[j + 1] for r in c])[0] for c in chunks]
            return torch.cat(lps).cpu()
    ref_c, ref_r = reference_logprobs(0), reference_logprobs(2)  # chosen, rejected
    net, dev = wrap_ddp(Policy(policy)), device_of(policy)

    def step_loss(step):
        idx = batch_indices(len(rows), batch_size, step, seed)[RANK::WORLD]
        lp, n, last = response_logprobs(net, [rows[i][0] for i in idx] + [rows[i][2] for i in idx],
                                        [rows[i][1] for i in idx] + [rows[i][3] for i in idx])
        (pi_c, pi_r), n_c, eot_c = lp.chunk(2), n[:len(idx)], last[:len(idx)]
        loss, r_c, r_r = dpo_loss(pi_c, pi_r, ref_c[idx].to(dev), ref_r[idx].to(dev), beta)
        # the NLL is SFT's loss on the chosen answer, its <|eot_id|> included: the mask keeps the token both answers
        # share out of DPO's contrast, and without it here nothing would hold up stopping after a good answer
        nll = -((pi_c + eot_c) / (n_c + 1)).mean()
        return loss + nll_coef * nll, {"dpo": loss.item(), "nll": nll.item(), "margin": (r_c - r_r).mean().item(),
                                       "acc": (r_c > r_r).float().mean().item()}
    return optimize(net, step_loss, steps, lr, "dpo", state=state)


def rejection_sample(policy, rm, tok, prompts, k, max_new, temperature=1.0, seed=0):
    """Best-of-K (Llama 2 §3.2.3): K samples per prompt, the reward model keeps the best of those that ended
    with a stop token (one cut at max_new is no whole answer: SFT would teach <|eot_id|> where it was cut).
    Returns per prompt the winner as an SFT conversation (None if no sample ended) and the (len(prompts), K)
    score matrix."""
    gen = torch.Generator(device=device_of(policy)).manual_seed(seed)
    prompt_ids = [render_prompt(tok, p, prompt_room(policy, max_new)) for p in prompts]
    flat = [p for p in prompt_ids for _ in range(k)]
    responses = sample_responses(policy, tok, flat, max_new, temperature, generator=gen)
    scores = rm_scores(rm, [exchange(tok, p, r) for p, r in zip(flat, responses)]).view(len(prompts), k)
    ended = torch.tensor([bool(r) and r[-1] in tok.stop_ids for r in responses]).view(len(prompts), k)
    best = scores.masked_fill(~ended, float("-inf")).argmax(1).tolist()
    winners = [p + [{"role": "assistant", "content": response_text(tok, responses[i * k + b])}]
               if ended[i, b] else None for i, (p, b) in enumerate(zip(prompts, best))]
    return winners, scores


def train_ppo(policy, ref, reward_fn, tok, prompts, iters, rollout_size, lr, max_new=16, kl_coef=0.5,
              kl_target=None, epochs=2, minibatch=16, gamma=1.0, lam=0.95, clip=0.2, vf_coef=0.5, seed=0, state=None):
    """PPO on prompts (lists of messages). reward_fn(seqs: list of token lists, prompt + response) -> (N,) scores.
    Each iteration: roll out, score, shape rewards with the KL penalty, GAE, then `epochs` passes of minibatches.
    state: a StageState, saved every few iterations (and resumed from)."""
    dev = device_of(policy)
    pv = Policy(policy, value_head=True).to(dev)
    # the fresh value head starts from zero and must catch up with the rewards' scale: 10x the policy's lr
    opt = torch.optim.AdamW([{"params": policy.parameters(), "lr": lr},
                             {"params": pv.value_head.parameters(), "lr": 10 * lr}],
                            betas=(0.9, 0.95), weight_decay=0.0)
    # Ziegler et al. adapt over a horizon of 10000 samples in runs of millions; ours see a few thousand, so the
    # horizon is ten rollouts (the coefficient may move up to 2% per iteration)
    kl_ctl = AdaptiveKL(kl_coef, kl_target, horizon=10 * rollout_size)
    score_mean, score_std = None, None
    gen = torch.Generator(device=dev).manual_seed(seed)
    rng, perm_gen = random.Random(seed), torch.Generator().manual_seed(seed)
    rendered = [render_prompt(tok, p, prompt_room(policy, max_new)) for p in prompts]
    state, parts = state or StageState(), {"pv": pv, "opt": opt, "gen": gen, "rng": rng, "perm_gen": perm_gen}
    start, history, extra = state.load(parts)
    if extra:
        kl_ctl.coef, score_mean, score_std = extra["kl_coef"], extra["score_mean"].to(dev), extra["score_std"].to(dev)
    for it in range(start, iters):
        # rollout: sample from the current policy, then score every token once with the same full forward
        prompt_ids = [rendered[i] for i in rng.sample(range(len(prompts)), min(rollout_size, len(prompts)))]
        responses = sample_responses(policy, tok, prompt_ids, max_new, generator=gen)
        seqs = [p + r for p, r in zip(prompt_ids, responses)]
        tokens = pad(seqs).to(dev)  # (B, T)
        mask = torch.zeros(len(seqs), tokens.shape[1] - 1, device=dev)  # (B, T-1): positions predicting the response
        for i, (p, r) in enumerate(zip(prompt_ids, responses)):
            mask[i, len(p) - 1:len(p) + len(r) - 1] = 1
        with torch.no_grad():
            old_logp, old_values = pv(tokens)  # (B, T-1) each
            ref_logp = Policy(ref)(tokens)[0]
            score = reward_fn([exchange(tok, p, r) for p, r in zip(prompt_ids, responses)]).to(dev)  # (B,)
            if score_mean is None:  # a reward model's scale is arbitrary (Bradley–Terry fixes only differences):
                score_mean, score_std = score.mean(), score.std(correction=0)   # standardise by the first rollout
                # (correction=0: one sequence has std 0, not NaN), unless its scores hardly differ (one sequence,
                # a reward that all fail): dividing by ~0 would blow up every later score, so they are only centred
                score_std = torch.where(score_std > 1e-3, score_std, torch.ones_like(score_std))
            rewards = kl_shaped_rewards((score - score_mean) / score_std, old_logp, ref_logp, mask, kl_ctl.coef)
            adv, returns = gae(rewards, old_values, mask, gamma, lam)
            adv = whiten(adv, mask)
        # update: a few epochs of minibatches over this rollout
        stats = []
        for _ in range(epochs):
            for mb in torch.randperm(len(seqs), generator=perm_gen).split(minibatch):
                mb = mb.to(dev)
                logp, values = pv(tokens[mb])  # (b, T-1) each
                pg_loss, clipfrac = ppo_policy_loss(logp, old_logp[mb], adv[mb], mask[mb], clip)
                vf_loss = ppo_value_loss(values, old_values[mb], returns[mb], mask[mb], clip)
                loss = pg_loss + vf_coef * vf_loss
                loss.backward()
                nn.utils.clip_grad_norm_(pv.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                stats.append((pg_loss.item(), vf_loss.item(), clipfrac.item()))
        kl = ((old_logp - ref_logp) * mask).sum(1).mean().item()  # per sequence, the KL the penalty acts on
        kl_ctl.update(kl, len(seqs))
        # per response token; the tokens were sampled from this policy at temperature 1, so -log p of each is an
        # unbiased estimate of its distribution's entropy (TRL logs the same), and costs no pass over the vocabulary
        ent = masked_mean(-old_logp, mask).item()
        pg, vf, cf = (sum(s[j] for s in stats) / len(stats) for j in range(3))
        history.append(dict(reward=score.mean().item(), kl=kl, kl_coef=kl_ctl.coef, entropy=ent, clipfrac=cf,
                            pg_loss=pg, vf_loss=vf))
        if it % 5 == 0 or it == iters - 1:
            log(f"ppo iter {it:3d}/{iters} " + " ".join(f"{k} {v:.4f}" for k, v in history[-1].items()))
        state.save(it + 1, iters, history, parts, dict(kl_coef=kl_ctl.coef, score_mean=score_mean, score_std=score_std))
    return history


# ----------------------------------------------------------------------------------------------------------------
# 9. The command line: one function per stage (load, build its data, train, save, evaluate), and `all`.

STAGES = ("sft", "rm", "rs", "dpo", "ppo")
# per stage: optimizer steps (PPO: iterations), batch size (PPO: rollouts per iteration), learning rate, and how
# many task prompts it draws (SFT: conversations; RM, DPO: preference pairs; RS, PPO: prompts). Sized so that
# `python align.py all` runs in minutes on a 2-core CPU; --steps/--batch_size/--lr/--n_prompts override one stage.
STAGE_DEFAULTS = {
    "sft": dict(steps=1000, batch_size=8, lr=2e-3, n_prompts=8000),
    "rm": dict(steps=1200, batch_size=16, lr=1e-3, n_prompts=2000),
    "rs": dict(steps=60, batch_size=8, lr=1e-4, n_prompts=800),
    "dpo": dict(steps=200, batch_size=16, lr=2e-4, n_prompts=800),
    "ppo": dict(steps=60, batch_size=32, lr=1e-5, n_prompts=2000),
}
# Tuned on this demo (each change checked on the held-out tasks): the RM's zero-initialised head needs lr 1e-3 and
# ~10 epochs of its pairs (held-out pair accuracy 0.72 -> 0.81); RS at lr 1e-4 moves the policy less toward the
# RM's mistakes; DPO twice the steps and lr (its loss had barely left log 2); the RM still errs on about 1 pair in 5,
# so PPO takes small steps (lr 1e-5) under a firm fixed KL coefficient (0.5): with lr 3e-5 and 0.1 adaptive,
# held-out accuracy fell 3-5 points.
SMALL_MODEL = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=128)  # ~0.8M params
SMALL_VOCAB = 256 + 256 + 64  # bytes + special tokens + 64 merges: the task texts hold about 80


def mean_of(history, key):
    """The mean of one metric over some steps of a stage's history (ten of them: a steadier figure than one)."""
    return sum(h[key] for h in history) / len(history)


def hp(args, stage, key):
    value = getattr(args, key)
    return STAGE_DEFAULTS[stage][key] if value is None else value


def fresh_base(out_dir, n_eval, seed=0):
    """No pretrained model to start from: a small BPE tokenizer trained on the task texts (not the n_eval held-out
    ones) and a fresh small transformer, written in Meta's layout like any other checkpoint."""
    train, _ = task_split(2000, n_eval, seed)
    texts = [f"{t['prompt']}\n{t['answer']}\n" for t in train] + ["system\nuser\nassistant\n"] * 50
    tok = Tokenizer.train(texts, vocab_size=SMALL_VOCAB)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.model"))
    torch.manual_seed(seed)
    model = Transformer(dataclasses.replace(PRESETS["cpu"], vocab_size=tok.n_words, **SMALL_MODEL))
    save_model(model, out_dir)
    return out_dir


def finish(args, stage, model, tok, history, metric, rm=None):
    """On rank 0: save the stage's checkpoint, evaluate it on the held-out tasks, and write beside it
    align_log.json (its flags, every step's metrics, the result), which marks the stage done (`all --resume`).
    Log one line."""
    res, cut = {}, Truncations.n  # (before the evaluation's prompts are counted too)
    if RANK == 0:
        if isinstance(model, RewardModel):  # its head beside the transformer
            save_reward_model(model, args.out, tokenizer_path(args.init))
        else:
            save_model(model, args.out, tokenizer_path=tokenizer_path(args.init))
        if stage != "rm" and args.n_eval:  # the reward model's transformer is no policy: its own metric says it all
            res = evaluate(model, tok, task_split(0, args.n_eval, args.seed)[1], rm, args.max_new)
        res = dict(stage=stage, out=args.out, metric=metric, **res)
        log_json = json.dumps({"stage": stage, "args": vars(args), "processes": WORLD, "history": history,
                               "result": res}, indent=1).encode()
        atomic_write(os.path.join(args.out, "align_log.json"), lambda f: f.write(log_json))
        if os.path.exists(os.path.join(args.out, "resume.pt")):
            os.remove(os.path.join(args.out, "resume.pt"))
    acc = (f"held-out accuracy{' on the embedded tasks' if args.data else ''} {res['accuracy']:.3f}, "
           if "accuracy" in res else "")
    reward = f"mean reward {res['reward']:.3f}, " if "reward" in res else ""
    log(f"[{stage}] -> {args.out}: {acc}{reward}{metric} ({cut} sequences truncated to the context)")
    return res


def finished(args):
    """With --resume: the result of a stage that ended before (its align_log.json, and no resume.pt), else None."""
    log_path = os.path.join(args.out, "align_log.json")
    if not args.resume or not os.path.exists(log_path) or os.path.exists(os.path.join(args.out, "resume.pt")):
        return None
    with open(log_path) as f:
        saved = json.load(f)
    changed = flag_changes(saved["args"], run_flags(args))
    if changed or "result" not in saved:  # (no result: written by align.py before 2026-11-27 12:31)
        why = f"other flags ({'; '.join(changed)})" if changed else "an older align.py"
        raise SystemExit(f"{log_path}: a stage run with {why}: resume with the same flags, or drop --resume to run "
                         f"{'the chain' if args.stage == 'all' else 'the stage'} again")
    log(f"[{saved['stage']}] ended before: {args.out}")
    return saved["result"]


def load_init(args, device):
    """The stage's starting model (--init) and its tokenizer; --max_new checked against its context (each stage's
    evaluation generates) and --rm found, before any work (a mistyped one found after training would lose it)."""
    model, tok = load_checkpoint(args.init, device, torch.float32)  # fp32 master weights (Meta's are bf16)
    prompt_room(model, args.max_new)
    if args.rm:
        reward_head(args.rm)
        if load_tokenizer(args.rm).fingerprint() != tok.fingerprint():  # its scores would read other text
            raise CheckpointError(f"--rm {args.rm} was trained with another tokenizer than --init {args.init}'s "
                                  f"({tokenizer_path(args.rm)} vs {tokenizer_path(args.init)})")
    return model, tok


def stage_sft(args, device):
    model, tok = load_init(args, device)
    n = hp(args, "sft", "n_prompts")
    tasks = task_split(n, args.n_eval, args.seed, 1)[0]
    convos = load_sft(args.data) if args.data else [task_conversation(t) for t in tasks]
    hist = train_sft(model, tok, convos, hp(args, "sft", "steps"), hp(args, "sft", "batch_size"), hp(args, "sft", "lr"),
                     state=StageState(args), seed=args.seed)
    return finish(args, "sft", model, tok, hist, f"SFT loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f}",
                  load_reward_model(args.rm, device) if args.rm else None)  # (not held while SFT trains)


def stage_rm(args, device):
    policy, tok = load_init(args, device)
    train, held_out = task_split(hp(args, "rm", "n_prompts"), args.n_eval, args.seed, 2)
    if args.data:
        pairs, test_pairs = load_pairs(args.data), []
    else:  # the policy's own samples, labelled by the checker; the held-out prompts give held-out pairs
        pairs, p_good = preference_pairs(policy, tok, train, args.k, args.max_new, args.temperature, args.seed)
        test_pairs = preference_pairs(policy, tok, held_out, args.k, args.max_new, args.temperature,
                                      args.seed + 1)[0] if held_out else []  # (--n_eval 0: none)
        log(f"[rm] {len(pairs)} pairs from {args.k} samples per prompt; {p_good:.1%} of samples correct")
    rm = RewardModel(policy).to(device)
    hist = train_rm(rm, tok, pairs, hp(args, "rm", "steps"), hp(args, "rm", "batch_size"), hp(args, "rm", "lr"),
                    state=StageState(args), seed=args.seed)
    acc = f"{rm_accuracy(rm, tok, test_pairs):.3f}" if test_pairs else "n/a (no held-out pairs: --data, or --n_eval 0)"
    metric = f"BT loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f}, held-out pair accuracy {acc}"
    return finish(args, "rm", rm, tok, hist, metric)


def stage_rs(args, device):
    (policy, tok), rm = load_init(args, device), load_reward_model(args.rm, device)
    tasks = task_split(hp(args, "rs", "n_prompts"), args.n_eval, args.seed, 3)[0]
    prompts = load_prompts(args.data) if args.data else [user(t["prompt"]) for t in tasks]
    winners, scores = rejection_sample(policy, rm, tok, prompts, args.k, args.max_new, args.temperature, args.seed)
    kept = [i for i, w in enumerate(winners) if w is not None]
    if not kept:
        raise SystemExit(f"[rs] no sample of any prompt ended within --max_new {args.max_new} tokens: the policy "
                         "has not learned to end its answers (more SFT --steps before it; a pretrained --init "
                         "needs more than a fresh model), or a larger --max_new")
    picked = "" if args.data else \
        f", winners correct {sum(check(tasks[i], winners[i][-1]['content']) for i in kept) / len(kept):.3f}"
    log(f"[rs] mean reward of all samples {scores.mean():.3f}, of the best of {args.k} "
        f"{scores.max(1).values.mean():.3f}" + picked +
        f"; {len(prompts) - len(kept)} prompts dropped (none of their samples ended within --max_new)")
    hist = train_sft(policy, tok, [winners[i] for i in kept], hp(args, "rs", "steps"), hp(args, "rs", "batch_size"),
                     hp(args, "rs", "lr"), name="rs", state=StageState(args), seed=args.seed, final_only=True)
    metric = (f"best-of-{args.k} reward {scores.max(1).values.mean():.3f} vs mean {scores.mean():.3f}{picked}; "
              f"SFT loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f}")
    return finish(args, "rs", policy, tok, hist, metric, rm)


def stage_dpo(args, device):
    policy, tok = load_init(args, device)
    ref = copy.deepcopy(policy).requires_grad_(False)
    if args.data:
        pairs = load_pairs(args.data)
    else:
        tasks = task_split(hp(args, "dpo", "n_prompts"), args.n_eval, args.seed, 4)[0]
        pairs, p_good = preference_pairs(policy, tok, tasks, args.k, args.max_new, args.temperature, args.seed)
        log(f"[dpo] {len(pairs)} pairs from {args.k} samples per prompt; {p_good:.1%} of samples correct")
    hist = train_dpo(policy, ref, tok, pairs, hp(args, "dpo", "steps"), hp(args, "dpo", "batch_size"),
                     hp(args, "dpo", "lr"), args.beta, args.nll_coef, state=StageState(args), seed=args.seed)
    metric = f"DPO loss {hist[0]['dpo']:.3f} -> {mean_of(hist[-10:], 'dpo'):.3f}, reward margin " \
             f"{mean_of(hist[-10:], 'margin'):.3f}"
    return finish(args, "dpo", policy, tok, hist, metric, load_reward_model(args.rm, device) if args.rm else None)


def stage_ppo(args, device):
    (policy, tok), rm = load_init(args, device), load_reward_model(args.rm, device)
    ref = copy.deepcopy(policy).requires_grad_(False)
    tasks = task_split(hp(args, "ppo", "n_prompts"), args.n_eval, args.seed, 5)[0]
    prompts = load_prompts(args.data) if args.data else [user(t["prompt"]) for t in tasks]
    hist = train_ppo(policy, ref, lambda seqs: rm_scores(rm, seqs), tok, prompts, hp(args, "ppo", "steps"),
                     hp(args, "ppo", "batch_size"), hp(args, "ppo", "lr"), args.max_new, args.kl_coef, args.kl_target,
                     seed=args.seed, state=StageState(args))
    metric = f"rollout reward {mean_of(hist[:10], 'reward'):.3f} -> {mean_of(hist[-10:], 'reward'):.3f}, " \
             f"KL {mean_of(hist[-10:], 'kl'):.3f}"
    return finish(args, "ppo", policy, tok, hist, metric, rm)


def stage_all(args, device):
    """base -> SFT -> RM -> RS -> DPO -> PPO, then every checkpoint reloaded and scored on the held-out tasks."""
    t0 = time.time()
    run = args.run or (os.path.basename(args.init.rstrip("/")) if args.init else "align")
    if args.init is None:
        args.init = fresh_base(f"out/{run}-base", args.n_eval, args.seed)
        log(f"[base] a fresh {SMALL_MODEL} model and a {load_tokenizer(args.init).n_words}-token tokenizer trained "
            f"on the task texts, in {args.init}")
    base = args.init
    walls = {"base": time.time() - t0}
    chain = [("sft", base, stage_sft), ("rm", f"out/{run}-sft", stage_rm), ("rs", f"out/{run}-sft", stage_rs),
             ("dpo", f"out/{run}-rs", stage_dpo), ("ppo", f"out/{run}-dpo", stage_ppo)]
    rows, ran = {}, False
    for stage, init, fn in chain:
        t, Truncations.n = time.time(), 0
        args.init, args.out = init, f"out/{run}-{stage}"
        done = None if ran else finished(args)
        if not done:
            if ran or not args.resume:  # after a stage that ran, a later one's files are another chain's
                forget(args.out)
            ran = True
        rows[stage] = done or fn(args, device)
        walls[stage] = None if done else time.time() - t
        if stage == "rm":
            args.rm = args.out
    # the table: every checkpoint reloaded from disk, greedy answers to the same held-out prompts, scored by the RM
    rm = load_reward_model(args.rm, device)
    held_out = task_split(0, args.n_eval, args.seed)[1]
    print(f"\nalign.py all: start {base}, {len(held_out)} held-out tasks, greedy answers; "
          f"total wall time {time.time() - t0:.0f} s\n")
    print("| stage | checkpoint | held-out accuracy | " + " | ".join(TASK_KINDS) +
          " | mean reward | stage's own metric | wall time |")
    print("|---" * (len(TASK_KINDS) + 6) + "|")
    for stage, path in [("base", base)] + [(s, f"out/{run}-{s}") for s in STAGES]:
        if stage == "rm":  # the reward model's transformer is no policy: its own metric says it all
            cells = ["—"] * (len(TASK_KINDS) + 2)
        else:
            res = evaluate(*load_checkpoint(path, device), held_out, rm, args.max_new)
            cells = [f"{res['accuracy']:.3f}"] + [f"{res[k]:.2f}" for k in TASK_KINDS] + [f"{res['reward']:.3f}"]
        print(f"| {stage} | `{path}` | {' | '.join(cells)} | {rows.get(stage, {}).get('metric', '')} "
              f"| {'an earlier run' if walls[stage] is None else f'{walls[stage]:.0f} s'} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES + ("all",))
    p.add_argument("--init", help="checkpoint to start from (all: default a fresh small model, see the docstring)")
    p.add_argument("--out", help="where the stage writes its checkpoint (default: INIT-STAGE)")
    p.add_argument("--rm", help="reward model checkpoint (rs, ppo; other stages then also report mean reward)")
    p.add_argument("--data", help="JSONL instead of the embedded tasks (see the docstring for the shapes)")
    p.add_argument("--run", help="all: outputs go to out/RUN-sft, ... (default: the name of --init, else 'align')")
    p.add_argument("--steps", type=int, help="optimizer steps (ppo: iterations); default per stage, see "
                   "STAGE_DEFAULTS; with `all` these overrides apply to every stage (a quick smoke run from a fresh "
                   "model: --steps 3 --n_prompts 16; from a pretrained --init, SFT needs more steps before RS "
                   "finds answers that end)")
    p.add_argument("--batch_size", type=int, help="per step: packed rows (sft, rs), preference pairs (rm, dpo: twice "
                   "as many sequences); ppo: rollouts per iteration")
    p.add_argument("--lr", type=float)
    p.add_argument("--n_prompts", type=int, help="task prompts the stage draws (sft: conversations, rm/dpo: pairs)")
    p.add_argument("--n_eval", type=int, default=500, help="held-out tasks scored after every stage (the embedded "
                   "tasks, with --data too; 0: none, but `all` needs some for its table)")
    p.add_argument("--k", type=int, default=4, help="samples per prompt for preference pairs and rejection sampling")
    p.add_argument("--max_new", type=int, default=16, help="longest response sampled, in tokens")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature for preference pairs and rejection sampling (PPO samples at 1)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta (Llama 3: 0.1)")
    p.add_argument("--nll_coef", type=float, default=0.2, help="DPO's NLL term on chosen (Llama 3: 0.2)")
    p.add_argument("--kl_coef", type=float, default=0.5, help="PPO's (initial) KL penalty coefficient")
    p.add_argument("--kl_target", type=float,
                   help="PPO: adapt the KL coefficient so the KL per response tracks this (default: keep it fixed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt_interval", type=int,
                   help="steps (ppo: iterations) between the saves of a stage's loop to OUT/resume.pt (default: a "
                   "tenth of the stage's; 0: none)")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed stage from OUT/resume.pt, same flags (all: the stages not yet ended too)")
    args = p.parse_args()
    if args.stage == "all" and args.data:   # (it would run SFT on it, then fail at the reward model's stage)
        p.error("--data holds one stage's records (sft: messages; rm, dpo: pairs; rs, ppo: prompts): run the "
                "stages one by one, each with its own --data")
    if args.stage == "all" and args.out:  # (the chain would write out/RUN-STAGE all the same, over another run's)
        p.error("--out names one stage's folder: `all` writes out/RUN-sft, out/RUN-rm, ...: name the run with --run")
    if args.stage != "all" and args.run:
        p.error(f"--run names the folders of `all`: {args.stage} writes to --out (default INIT-{args.stage})")
    if args.stage != "all":
        if args.init is None:
            p.error(f"{args.stage} needs --init CKPT")
        if args.stage in ("rs", "ppo") and args.rm is None:
            p.error(f"{args.stage} needs --rm (a reward model written by `align.py rm`)")
        args.out = args.out or f"{args.init.rstrip('/')}-{args.stage}"
    if (args.ckpt_interval or 0) < 0:
        p.error("--ckpt_interval must be >= 0 (0: no saves to resume from)")
    for name in ("steps", "batch_size", "n_prompts", "k"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if (args.lr is not None and not 0 < args.lr < math.inf) or not 0 < args.temperature < math.inf:
        p.error("--lr and --temperature must be > 0 (at temperature 0 the K samples of a prompt are one answer K "
                "times: no pair to prefer, nothing to choose from), and finite")
    if not args.beta > 0:  # (0: DPO's term is log 2 whatever the policy does; below: it prefers the rejected)
        p.error("--beta must be > 0")
    for name in ("nll_coef", "kl_coef"):  # (below 0 each rewards what it is there to hold down)
        if not getattr(args, name) >= 0:
            p.error(f"--{name} must be >= 0 (0: {'no NLL term' if name == 'nll_coef' else 'no KL penalty'})")
    if args.kl_target is not None and not args.kl_target > 0:  # (PPO divides the measured KL by it)
        p.error("--kl_target must be > 0 (the KL per response the coefficient steers to; without it: fixed)")
    if args.n_eval < (1 if args.stage == "all" else 0):
        p.error(f"--n_eval must be >= {1 if args.stage == 'all' else 0}")
    device = setup_device()
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # tiny matrices: threads cost more than they save (module docstring)
    if args.stage in ("rs", "ppo", "all") and dist.is_initialized():
        raise SystemExit(f"{args.stage} runs in one process (sft, rm and dpo take torchrun): drop torchrun")
    torch.manual_seed(args.seed)
    if args.stage != "all" and not args.resume:
        forget(args.out)
    elif args.stage != "all" and finished(args):  # --resume of a stage that ended: nothing left to do
        sys.exit(0)
    stage = {"sft": stage_sft, "rm": stage_rm, "rs": stage_rs, "dpo": stage_dpo, "ppo": stage_ppo, "all": stage_all}
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        stage[args.stage](args, device)
    except (FileNotFoundError, CheckpointError, BadInput) as e:  # a mistyped --init, --rm or --data: one line
        raise SystemExit(str(e)) from None  # (every rank says it: torchrun may stop rank 0 before it could)
    except Stopped as e:  # a signal: what --resume needs is saved
        log(str(e))
    if dist.is_initialized():
        barrier()  # rank 0 may still be evaluating: leave together
        dist.destroy_process_group()
        sys.stdout.flush()  # and past the interpreter's teardown, where gloo sometimes aborts (train.py's finish)
        sys.stderr.flush()
        os._exit(0)
