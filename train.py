"""train.py: pretraining, the main stage of the Llama 3 recipe. One flat loop, from a laptop CPU to a GPU cluster.

`python train.py` with no arguments runs the whole spine on this machine's CPU: it trains a byte-level BPE
tokenizer on the Python standard library (cached at data/stdlib/tok.model), tokenizes the corpus into packed
uint32 shards (data/stdlib/), pretrains the small "cpu" model for a few minutes, evaluates the validation loss
and bits per byte, exports out/default/ in Meta's checkpoint layout and prints a sample.

Design choices
- nanoGPT's order: config -> device, distribution and seeds -> data -> model -> optimizer -> one loop
  (eval + checkpoint -> set lr -> micro-steps forward/backward -> clip -> step -> log).
- Packed documents, never padded, with Llama 3's document mask: data.PackedLoader yields doc_ids and attention
  never crosses a document boundary inside a sequence (Llama 3 paper, section 3.2). The loss is fp32.
  Several --data folders with their shares of the tokens are Llama 3's data mix (section 3.1.2, data.MixedLoader):
  each is evaluated on its own val split, and val loss / bits per byte weigh them by the shares, which a --resume
  may change (Llama 3 changed its mix while training), adding folders after its own. A share of 0 keeps a folder out
  of training, its val loss logged but not weighed in: an eval-only domain, or a source dropped on resume that a
  later one may take back.
- AdamW, betas (0.9, 0.95), weight decay 0.1, gradient clipping at 1.0, linear warmup then cosine decay to a
  tenth of the peak (Llama 2 paper section 2.2; Llama 3 405B went to a hundredth, --min_lr), or
  warmup-stable-decay. Decay only on the matrices (model.configure_optimizer): it pulls weights toward 0, which
  regularises a matrix, but RMSNorm's gains set a scale that the norm just removed, and decaying them only fights
  it (the nanoGPT/minGPT rule). Gradient accumulation reaches --tokens_per_step; bf16 autocast with fp32 master
  weights (GPU, and CPUs with bf16 matrix instructions). --average_last exports the mean of the last steps'
  weights (Llama 3 averaged checkpoints during its annealing, section 3.4.3).
- Distribution from the same loop: DDP, or FSDP2 (fully_shard per block, then the root; bf16 parameters and
  fp32 gradient reduction on GPU). Every rank reads its own slice of each batch; rank 0 alone logs and writes.
  On CPU the same code runs over gloo, which is how tests/test_train.py checks that 2 processes match 1.
- Checkpoints: model and optimizer through torch.distributed.checkpoint (each rank writes its own shards under
  FSDP), plus state.pt (step, loader position, RNG, args). All of it goes to a temporary folder that
  is renamed when complete, with a manifest of sizes and CRC32s checked before any load: a checkpoint exists
  whole or not at all, and a damaged one is refused by name. The last two are kept.
  At the end the model is exported in Meta's layout (params.json, consolidated.00.pth, tokenizer.model).
- Stops: SIGTERM/SIGINT save a checkpoint and exit; a NaN/inf loss stops before the bad update, naming the step.
- On CPU the default run has a time budget (--max_minutes 6): the schedule runs on the clock instead of the step
  count (warmup over the first tenth, cosine to lr / 10 when time is up), so it ends on time and properly decayed
  on a fast, slow or busy machine alike. A resumed run goes on from the time its checkpoint was written.

Run it
    python train.py                                    # CPU: tokenizer, shards, 6 minutes of training, sample
    python train.py --resume                           # continue out/default from its last checkpoint
    python train.py --model llama3.2-1b --seq_len 4096 --batch_size 4 --tokens_per_step 524288 --compile  # 1 GPU
    torchrun --standalone --nproc_per_node=8 train.py --fsdp --model llama3-8b --seq_len 8192 --batch_size 1
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        train.py --fsdp --model llama3-70b --act_ckpt  # the same line on each of 4 nodes, HOST = one of them
                                                       # (data/ and out/ on a filesystem all nodes share)
    python train.py --init out/default --out_dir out/long --seq_len 1024 --rope_factor 4 --max_steps 200
                                                       # long-context stage: continue at 4x the context
    python train.py --init out/default --out_dir out/anneal --data data/stdlib=0.5 data/best=0.5 --lr 3e-4 \\
        --warmup_steps 0 --schedule wsd --decay_frac 1 --min_lr 0 --max_steps 100 --average_last 20 --seed 1
                                                       # annealing: lr to 0 on an upsampled source, averaged
"""
import argparse
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from model import (PRESETS, CheckpointError, Transformer, atomic_save, bf16_matmuls, device_problem, keep_freed_memory,
                   load_model, peak_flops, save_model, tokenizer_path)
from sample import generate
from tokenizer import Tokenizer, atomic_write

# dcp warns that it runs "in a single process" when there is no process group: that is what we want
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")

# -----------------------------------------------------------------------------
# helpers: learning rate, checkpoints, the loss log and its plot


def get_lr(t, warmup, total, args):
    """The learning rate at point t of a run of length `total`, both in steps (t = step + 1) or, under a time
    budget (--max_minutes), in seconds. Linear warmup over `warmup`, then either cosine decay to min_lr (default
    lr / 10, Llama 2 section 2.2) at `total`, or warmup-stable-decay: constant, then linear to min_lr over the last
    decay_frac of the run (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
    Durations"), which lets a run be extended without restarting its schedule. Llama 3's annealing is the last:
    linear to 0 (--min_lr 0) on a mix that upsamples the best sources (section 3.4.3)."""
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    if t < warmup:
        return args.lr * t / warmup
    if args.schedule == "wsd":
        decay_start = max(warmup, total * (1 - args.decay_frac))  # (a decay reaching into the warmup starts after)
        frac = min(1.0, max(0.0, t - decay_start) / max(total - decay_start, 1e-9))
        return args.lr + frac * (min_lr - args.lr)
    frac = min(1.0, (t - warmup) / max(total - warmup, 1e-9))
    return min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (args.lr - min_lr)


def parse_mix(specs):
    """--data's FOLDER=SHARE for each folder of a data mix, or one FOLDER alone -> (folders, shares of the tokens
    summing to 1). An existing path is a folder as it is, '=' in its name or not. A share may be 0 (a folder
    evaluated, not trained on), not all of them: ['a=3', 'b=1', 'c=0'] -> (['a', 'b', 'c'], [0.75, 0.25, 0.0])."""
    mix = [(spec, None) if os.path.exists(spec) or "=" not in spec else spec.rsplit("=", 1) for spec in specs]
    if len(mix) > 1 and any(share is None for _, share in mix):
        raise ValueError("give each folder of a mix its share of the tokens (FOLDER=SHARE, e.g. --data data/web=0.7 "
                         "data/code=0.3)")
    try:
        shares = [1.0 if share is None else float(share) for _, share in mix]
    except ValueError:
        raise ValueError("a share is not a number (FOLDER=SHARE, e.g. data/web=0.7)") from None
    if not all(0 <= share < math.inf for share in shares) or not 0 < sum(shares) < math.inf:
        raise ValueError("a share must be a finite number >= 0, and one > 0")
    if len({os.path.realpath(folder) for folder, _ in mix}) < len(mix):
        raise ValueError("a folder named twice (give it the sum of its shares)")
    return [folder for folder, _ in mix], [share / sum(shares) for share in shares]


def list_checkpoints(ckpt_dir):
    """Complete checkpoints in ckpt_dir, by step. A folder is named step_N only once it is complete."""
    if not os.path.isdir(ckpt_dir):
        return []
    names = [n for n in os.listdir(ckpt_dir) if n.startswith("step_") and n[5:].isdigit()]
    return [os.path.join(ckpt_dir, n) for n in sorted(names, key=lambda n: int(n[5:]))]


def barrier():
    """Wait for every rank, on a gloo group with no practical time limit (made with the process group below): here
    the other ranks wait while rank 0 alone builds the data (hours for a large --source) or exports the model, and
    the training group's collectives end at a timeout (NCCL's: 10 minutes)."""
    if dist.is_initialized():
        dist.barrier(group=waiting_room)


def finish(status=0):
    """End the run: status is an exit code, or a message that rank 0 prints (exit code 1). Every rank calls this
    together. Under torchrun they leave the process group first, then exit with os._exit, past the interpreter's
    own teardown, where torch's gloo sometimes aborts (9 runs in 154 on a busy 2-core CPU) though every file is
    written and closed by then."""
    if not dist.is_initialized():
        sys.exit(status)
    barrier()
    if isinstance(status, str) and dist.get_rank() == 0:
        print(status, file=sys.stderr)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if isinstance(status, str) else status)


fail = finish  # fail(message): stop the run with an error (every rank reaches it together: they read the same files)


def checksums(folder, names):
    """{name: [size, crc32]} of the files that exist. Each rank reads only every world_size-th file and the
    shares are gathered, so checking a checkpoint costs the same time at any scale."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if world > 1:  # rank 0's list for everyone (a network filesystem may show the ranks different listings)
        box = [names]
        dist.broadcast_object_list(box, src=0)
        names = box[0]
    paths = {n: os.path.join(folder, n) for n in names[rank::world]}
    mine = {n: [os.path.getsize(p), data.file_crc32(p)] for n, p in paths.items() if os.path.exists(p)}
    if world == 1:
        return mine
    shares = [None] * world
    dist.all_gather_object(shares, mine)
    return {n: v for share in shares for n, v in share.items()}


def save_checkpoint(path, model, optimizer, state, rank, average, keep=2):
    """Write the training state to path atomically: all of it goes to path.tmp, which rank 0 renames once every
    rank has finished. Model, optimizer and the weights' running average (empty without --average_last) go through
    dcp (under FSDP each rank writes only its own shards); `state` (step, loader position, RNG: the same on every
    rank) is rank 0's state.pt. The last `keep` stay."""
    tmp = path + ".tmp"  # (one left by a run killed while saving went at the start of this run)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, "average": average}, checkpoint_id=tmp)  # (collective)
    if rank == 0:
        atomic_save(state, os.path.join(tmp, "state.pt"))  # (fsynced: the manifest describes bytes on disk)
    barrier()
    files = checksums(tmp, sorted(os.listdir(tmp)))
    if rank == 0:
        manifest = json.dumps({"step": state["step"], "files": files}, indent=1).encode()
        atomic_write(os.path.join(tmp, "manifest.json"), lambda f: f.write(manifest))
        if os.path.exists(path):  # a run resumed from an older checkpoint comes back to this step
            shutil.rmtree(path)
        os.replace(tmp, path)  # atomic: the checkpoint appears whole or not at all
        for old in list_checkpoints(os.path.dirname(path))[:-keep]:  # (none is later: see the start of the run)
            shutil.rmtree(old)
    barrier()


def load_checkpoint(path, model, optimizer, model_args, average, args):
    """Check path against its manifest (every file present, same size, same CRC32) and its model shape against
    model_args, then read the model, optimizer and average state back in place (dcp reshards if the number of
    processes changed) and return state.pt. A damaged or mismatched checkpoint is refused by name; nothing is
    loaded from it and nothing is deleted."""
    manifest_path = os.path.join(path, "manifest.json")
    if not os.path.isdir(path):
        fail(f"--resume {path}: no such checkpoint folder (they are OUT_DIR/ckpt/step_N)")
    if not os.path.exists(manifest_path):
        fail(f"{path} is not a complete checkpoint: it has no manifest.json")
    try:
        with open(manifest_path) as f:
            expected = {name: list(v) for name, v in json.load(f)["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        fail(f"corrupt checkpoint: {manifest_path} is not a manifest ({type(e).__name__}: {e}); refusing to load "
             f"{path}")
    found = checksums(path, sorted(expected))  # the same on every rank, so all stop or none
    bad = [os.path.join(path, n) for n, v in expected.items() if found.get(n) != v]
    if bad:
        others = [p for p in list_checkpoints(os.path.dirname(os.path.normpath(path))) if p != os.path.normpath(path)]
        fail(f"corrupt checkpoint: {', '.join(bad)} does not match {manifest_path} (missing, or "
             f"another size or CRC32); refusing to load {path}. Other checkpoints, untouched: "
             f"{', '.join(others) or 'none'} (resume from one with --resume PATH)")
    state = torch.load(os.path.join(path, "state.pt"), weights_only=True)  # ints, strings and RNG tensors
    saved = state.get("model_args", {})
    diff = {k: (v, getattr(model_args, k)) for k, v in saved.items() if v != getattr(model_args, k)}
    if diff:
        fail(f"{path} holds another model: " + ", ".join(f"{k} {a} there, {b} here" for k, (a, b) in diff.items())
             + " (resume with the flags it was trained with)")
    # --average_last: a checkpoint past the start of its averaging holds the average so far (over the steps that its
    # flags gave), one before it holds nothing to go on from (this run's averaging must start after it)
    step, last, total = state["step"], state["args"].get("average_last"), state["args"].get("max_steps")
    averaged = bool(last) and step > total - last
    if averaged and (last, total) != (args.average_last, args.max_steps):
        fail(f"{path} holds the mean of the weights since step {total - last} (--average_last {last} --max_steps "
             f"{total}): resume with those two flags")
    if average and not averaged and step > args.max_steps - args.average_last:
        fail(f"{path} is at step {step}, past step {args.max_steps - args.average_last} where --average_last "
             f"{args.average_last} would start, and it holds no average: a smaller --average_last")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd, **({"average": average} if averaged else {})}
    dcp.load(sd, checkpoint_id=path)  # in place, into this rank's shards
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    return state


LOG_FIELDS = ["step", "train_loss", "val_loss", "val_bpb", "lr", "grad_norm", "tokens_per_s", "mfu"]


def read_log(path):
    if not os.path.exists(path):
        return []
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        for i, r in enumerate(rows, 2):   # (line 1: the header)
            if not str(r.get("step", "")).isdigit():
                raise ValueError(f"line {i} has no step number")
            for k in LOG_FIELDS[1:]:  # (plot_svg reads them: a damaged value must stop the run here, not later)
                try:
                    float(r.get(k) or 0)
                except (ValueError, TypeError):
                    raise ValueError(f"line {i}: {k} {r[k]!r} is no number") from None
    except (ValueError, UnicodeDecodeError) as e:
        fail(f"{path}: not a log.csv of train.py ({e}); move it away to start a new log")
    return rows


def write_log(path, rows):
    """The whole log, rewritten atomically (a resume keeps the rows before its step)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, LOG_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def append_log(path, row):
    """One row (its missing fields empty) below the header write_log wrote at the start."""
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, LOG_FIELDS).writerow(row)


def plot_svg(rows, path, width=640, height=360, pad=50):
    """Train and validation loss against step, drawn as a hand-written SVG: no plotting library needed."""
    series = {"train_loss": "#1f77b4", "val_loss": "#d62728"}
    points = {k: [(float(r["step"]), float(r[k])) for r in rows if r.get(k)] for k in series}
    xs = [x for pts in points.values() for x, _ in pts]
    ys = [y for pts in points.values() for _, y in pts]
    if len(xs) < 2:
        return
    x0, x1, y0, y1 = min(xs), max(max(xs), min(xs) + 1), min(ys), max(max(ys), min(ys) + 1e-6)
    sx = lambda x: pad + (x - x0) / (x1 - x0) * (width - 2 * pad)  # noqa: E731  (data -> pixel coordinates)
    sy = lambda y: height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
           f'<path d="M{pad},{pad} V{height - pad} H{width - pad}" stroke="black" fill="none"/>']
    for i in range(5):  # 5 ticks per axis
        x, y = x0 + i * (x1 - x0) / 4, y0 + i * (y1 - y0) / 4
        out.append(f'<text x="{sx(x):.1f}" y="{height - pad + 15}" text-anchor="middle">{x:.0f}</text>')
        out.append(f'<text x="{pad - 5}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    out.append(f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle">step</text>')
    for i, (key, color) in enumerate(series.items()):
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points[key])
        if pts:
            out.append(f'<polyline points="{pts}" stroke="{color}" fill="none" stroke-width="1.5"/>')
        out.append(f'<text x="{width - pad - 80}" y="{pad + 15 * i}" fill="{color}">{key.replace("_", " ")}</text>')
    atomic_write(path, lambda f: f.write("\n".join(out + ["</svg>\n"]).encode()))


# -----------------------------------------------------------------------------
# config: one flat block; the values are saved in every checkpoint
parser = argparse.ArgumentParser(description="Pretrain a Llama 3 model (see the docstring of train.py).")
parser.add_argument("--out_dir", default="out/default", help="model export, checkpoints, log.csv, loss.svg")
parser.add_argument("--data", nargs="+", default=["data/stdlib"], metavar="FOLDER[=SHARE]",
                    help="folder of token shards (made from --source if missing), or several with their shares of "
                         "the tokens, Llama 3's data mix: --data data/web=0.7 data/code=0.3 (a share of 0: "
                         "evaluated only)")
parser.add_argument("--source", help="what data.prepare_data reads to make a missing --data (default: stdlib)")
parser.add_argument("--blocklist", help="with --source: a file of domains whose WARC/WET pages the new tokenizer and "
                    "shards leave out (data.py's --blocklist)")
parser.add_argument("--tokenizer", default="data/stdlib/tok.model", help="trained on --source if missing")
parser.add_argument("--vocab_size", type=int, default=8192, help="of a newly trained tokenizer, incl. 256 specials")
parser.add_argument("--model", default="cpu", choices=sorted(PRESETS), help="shape preset of model.py")
for name in ("dim", "n_layers", "n_heads", "n_kv_heads"):
    parser.add_argument(f"--{name}", type=int, help="override the preset's " + name)
parser.add_argument("--seq_len", type=int,
                    help="context length T (default: the preset's max_seq_len; with --init the model's)")
parser.add_argument("--init", help="start from this exported model instead of random weights (long-context stage)")
parser.add_argument("--rope_factor", type=float, help="with --init: Llama 3.1 RoPE scaling by this factor")
parser.add_argument("--batch_size", type=int, default=8, help="sequences per micro-step, per process")
parser.add_argument("--tokens_per_step", type=int, help="global batch in tokens, by gradient accumulation")
parser.add_argument("--max_steps", type=int, help="optimizer steps (default 300)")
parser.add_argument("--max_minutes", type=float, help="time budget instead of max_steps: the schedule runs on the "
                    "clock (default on a CPU when neither is given: 6; 0: none)")
parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
parser.add_argument("--warmup_steps", type=int, default=30,
                    help="linear warmup (under --max_minutes: the first tenth of the time instead)")
parser.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine")
parser.add_argument("--decay_frac", type=float, default=0.2, help="wsd: share of the steps spent decaying")
parser.add_argument("--min_lr", type=float, help="where the decay ends (default lr / 10; Llama 3 405B: lr / 100)")
parser.add_argument("--average_last", type=int, help="export the mean of the weights after each of the last N steps "
                    "(Polyak averaging: Llama 3 averaged checkpoints during annealing)")
parser.add_argument("--weight_decay", type=float, default=0.1, help="Llama 2 section 2.2")
parser.add_argument("--grad_clip", type=float, default=1.0, help="max global gradient norm (Llama 2 section 2.2)")
parser.add_argument("--seed", type=int, default=1337)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--dtype", choices=["bfloat16", "float32"],
                    help="of the matmuls, by autocast; weights stay fp32 (default: bfloat16 on CUDA and on CPUs with "
                         "bf16 matrix instructions, float32 elsewhere)")
parser.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP2 instead of DDP")
parser.add_argument("--compile", action="store_true", help="torch.compile each block")
parser.add_argument("--act_ckpt", action="store_true", help="activation checkpointing: recompute blocks in backward")
parser.add_argument("--eval_interval", type=int, default=100)
parser.add_argument("--eval_tokens", type=int, default=16384, help="validation tokens per evaluation (of each "
                    "--data folder)")
parser.add_argument("--ckpt_interval", type=int, default=100)
parser.add_argument("--log_interval", type=int, default=10, help="print every this many steps (log.csv: all)")
parser.add_argument("--resume", nargs="?", const="last", help="from the last checkpoint in out_dir, or this one")
parser.add_argument("--prompt", default="def ", help="the sample printed at the end starts with this")
parser.add_argument("--sample_tokens", type=int, default=120)
args = parser.parse_args()
for name in ("batch_size", "eval_interval", "eval_tokens", "ckpt_interval", "log_interval", "tokens_per_step",
             "seq_len", "dim", "n_layers", "n_heads", "n_kv_heads", "average_last"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
        parser.error(f"--{name} must be at least 1")
rope_factor = 2 if args.rope_factor is None else args.rope_factor
if min(args.max_steps or 0, args.sample_tokens, args.warmup_steps, args.seed) < 0 or not 0 <= args.decay_frac <= 1 \
        or not 0 <= (args.max_minutes or 0) < math.inf or not 1 < rope_factor < math.inf:
    parser.error("--max_steps, --max_minutes, --sample_tokens, --seed and --warmup_steps must be >= 0 (and finite), "
                 "--decay_frac within [0, 1], --rope_factor > 1")
if not (0 < args.lr < math.inf and args.grad_clip > 0 and 0 <= args.weight_decay < math.inf and
        0 <= (args.min_lr or 0) <= args.lr):  # (--grad_clip inf: no clipping; an infinite --lr or decay: NaN weights)
    parser.error("--lr and --grad_clip must be > 0, --weight_decay >= 0, --lr and --weight_decay finite, --min_lr "
                 "within [0, --lr]")
if problem := device_problem(args.device):  # (else torch's traceback at its first use)
    parser.error(f"--device {args.device}: {problem}")
try:
    folders, shares = parse_mix(args.data)
except ValueError as e:
    parser.error(f"--data {' '.join(args.data)}: {e}")
if len(folders) > 1 and args.source:
    parser.error("--source builds one --data folder: build each folder of a mix with data.py")
if args.blocklist and not args.source:
    parser.error("--blocklist goes with --source: it leaves pages out of the data --source builds")
if args.decay_frac != parser.get_default("decay_frac") and args.schedule != "wsd":
    parser.error("--decay_frac is the share of wsd's decay: give --schedule wsd (cosine decays over the whole run)")
if args.rope_factor is not None and not args.init:
    parser.error("--rope_factor scales the RoPE of a trained model: it needs --init")
if args.init and os.path.realpath(args.init) == os.path.realpath(args.out_dir):
    parser.error(f"--out_dir {args.out_dir} is --init's folder: this run would delete its checkpoints and log and "
                 "overwrite its model; give another --out_dir")
if os.path.isdir(args.tokenizer) or args.tokenizer.endswith(("/", os.sep)):  # (a new one: found after its training)
    parser.error(f"--tokenizer {args.tokenizer} is a folder: give the tokenizer's file, e.g. "
                 f"{os.path.join(args.tokenizer, 'tok.model')}")
if args.init and args.model != parser.get_default("model"):
    parser.error("--init takes the shape of the model it loads: drop --model")
clock_default = args.max_steps is None and args.max_minutes is None and args.device == "cpu"
if clock_default:
    args.max_minutes = 6.0  # `python train.py` on a laptop: a few minutes, whatever its speed
# on the clock the schedule counts no steps: the step flags given are not used (said once the log is up)
unused = [f"--{k} {getattr(args, k)}" for k in ("max_steps", "warmup_steps")
          if args.max_minutes and getattr(args, k) not in (None, parser.get_default(k))]
args.max_steps = 300 if args.max_steps is None else args.max_steps
if args.average_last and args.max_minutes:
    parser.error("--average_last counts the last of --max_steps: give --max_steps, not --max_minutes (without "
                 "--max_steps a CPU run is on a 6-minute clock)")
if (args.average_last or 0) > args.max_steps:
    parser.error(f"--average_last {args.average_last}: more than the {args.max_steps} steps of --max_steps")

# -----------------------------------------------------------------------------
# device, distribution, seeds: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; plain `python train.py` is 1 of 1
distributed = "RANK" in os.environ
if args.fsdp and not distributed:  # (else one process, unsharded, said only as "no parallelism" in the log)
    parser.error("--fsdp shards the model over torchrun's processes: launch it under torchrun, e.g. torchrun "
                 "--standalone --nproc_per_node=N train.py --fsdp ...")
device = torch.device(args.device)
if distributed:
    rank, world_size, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    waiting_room = dist.new_group(backend="gloo", timeout=timedelta(days=7))  # for barrier()
else:
    rank, world_size = 0, 1
master = rank == 0  # logs, writes the CSV, the plot and the exported model
fsdp, ddp = args.fsdp, distributed and not args.fsdp  # (--fsdp without torchrun: refused above)
torch.manual_seed(args.seed)  # the same seed on every rank: every rank builds the same initial weights
# bf16 matmuls with fp32 master weights (Llama 3 trains in bf16), on GPU and on CPUs with bf16 matrix instructions
# (model.bf16_matmuls): there a step of the cpu preset ran 1.3x faster than in fp32 when it was 256 wide (the
# elementwise ops stay fp32), at the same loss per step (2.26 bits per byte after 200 steps either way)
args.dtype = args.dtype or ("bfloat16" if bf16_matmuls(device) else "float32")
autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()
torch.backends.cuda.matmul.allow_tf32 = args.dtype == "bfloat16"  # the few fp32 matmuls outside autocast; not
# with --dtype float32, which asks for fp32 everywhere
if device.type == "cpu":
    keep_freed_memory()  # ~10% faster CPU steps: no page faults for each new activation (see model.py)


def log(*a):
    if master:
        print(*a, flush=True)


# -----------------------------------------------------------------------------
# data: the tokenizer and the shards are made once (by rank 0) and cached; each rank reads its own slice
t_start = time.time()
# both are made from --source when missing; a path of one's own without a --source is more likely a typo than a
# wish to fill it with the standard library
default_data = parser.get_default("data")[0]
for folder in folders:
    if not os.path.exists(os.path.join(folder, "meta.json")) and folder != default_data and args.source is None:
        fail(f"--data {folder} not found: make it with data.py, or give --source to build it there")
if not os.path.exists(args.tokenizer) and args.tokenizer != parser.get_default("tokenizer") and args.source is None:
    fail(f"--tokenizer {args.tokenizer} not found: make it with tokenizer.py, or give --source to build it there")
built = [folder for folder in folders if os.path.exists(os.path.join(folder, "meta.json"))]
if not os.path.exists(args.tokenizer) and built:
    fail(f"--tokenizer {args.tokenizer} not found, but --data {built[0]} is built: give the tokenizer its shards were "
         "made with (a new one would not match them)")
source = args.source or "stdlib"
building = not os.path.exists(args.tokenizer) or len(built) < len(folders)
try:  # Llama 3's safety filter by domain: the tokenizer learns from the pages the shards will hold (read on every
    # rank, so that all stop together at a bad list, and only when something is to be built)
    data.check_blocklist(args.blocklist, source)
    blocklist = data.read_blocklist(args.blocklist) if args.blocklist and building else ()
except (ValueError, FileNotFoundError) as e:
    fail(str(e))
if args.blocklist and building and os.path.exists(args.tokenizer):
    log(f"note: --tokenizer {args.tokenizer} is used as it is: the list leaves pages out of the shards only (a "
        "tokenizer made without it learned from them too; tokenizer.py --blocklist makes one with it)")
try:  # (a source that is not there, or too small for a val split: one line; torchrun then stops the other ranks)
    if master and not os.path.exists(args.tokenizer):
        log(f"training a {args.vocab_size}-token BPE tokenizer on {source} ...")
        texts = map(data.clean_text, data.iter_documents(source, blocklist))
        Tokenizer.train(texts, args.vocab_size).save(args.tokenizer)   # (its folder made only now: nothing is left
        log(f"  -> {args.tokenizer} in {time.time() - t_start:.0f}s")   # behind by a source that fails)
    for folder in folders:  # (one, or the default folder of a mix: a --source builds no folder of a mix)
        if master and not os.path.exists(os.path.join(folder, "meta.json")):
            log(f"tokenizing {source} into packed shards with {args.tokenizer} ...")
            data.prepare_data(source, args.tokenizer, folder, blocklist=args.blocklist)
            log(f"  -> {folder} in {time.time() - t_start:.0f}s")
except (ValueError, OSError) as e:
    fail(f"{e}\n(train.py builds with data.py's default settings: to set others, such as --val_fraction, build the "
         "folder with data.py first)")
del blocklist  # (a million domains take ~100 MB: not kept for the run)
barrier()
try:
    tok = Tokenizer.load(args.tokenizer)
except (ValueError, OSError) as e:  # (a damaged file: its message names the line)
    fail(f"--tokenizer: {e}")
if args.vocab_size != parser.get_default("vocab_size") and tok.n_words != args.vocab_size:
    fail(f"--vocab_size {args.vocab_size}, but --tokenizer {args.tokenizer} exists with {tok.n_words} tokens: "
         "give a new --tokenizer path (and --data folder) to train one of that size")
metas = {}  # each folder's meta.json: tokens and UTF-8 bytes per split, for bits per byte
for folder in folders:
    # a folder made earlier is used as it is (data.check_folder): it must hold the source asked for (the default
    # folder: the default source)
    asked = args.source or (source if folder == default_data else None)
    try:
        metas[folder], notes = data.check_folder(folder, asked, args.blocklist)
    except ValueError as e:
        fail(str(e))
    for note in notes:
        log(note)
    # every shard against the CRC-32 data.py wrote for it (a flipped bit in a token would train without a sound; an
    # older data.py wrote none: nothing is checked, as the note said). The ranks of each node share the files out
    # among themselves, so every node checks all of them (its own copy, when the data was copied to each node's disk)
    local, per_node = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    bad = data.damaged_shards(folder, metas[folder], slice(local, None, per_node))
    if distributed:  # (on the waiting room's gloo group: a large folder may take longer than NCCL's timeout)
        shares_of_bad = [None] * world_size
        dist.all_gather_object(shares_of_bad, bad, group=waiting_room)
        bad = sorted(set(sum(shares_of_bad, [])))
    if bad:
        fail(f"{folder}: {', '.join(bad)} not as data.py wrote (missing, or its CRC-32 differs from meta.json's):"
             f" a damaged copy; copy the folder again, or rerun data.py with --out {folder} (it rebuilds it)")

# -----------------------------------------------------------------------------
# model: a preset shape with the tokenizer's vocabulary, or (--init) a trained model to continue at longer context
if args.init:
    try:
        model = load_model(args.init)
    except CheckpointError as e:
        fail(f"--init: {e}")
    other = [f"--{k} {getattr(args, k)} (it has {getattr(model.args, k)})" for k in ("dim", "n_layers", "n_heads",
             "n_kv_heads") if getattr(args, k) not in (None, getattr(model.args, k))]
    if other:
        fail(f"--init {args.init} gives the model's shape: {', '.join(other)}")
    T = args.seq_len or model.args.max_seq_len
    # long-context stage (Llama 3 section 3.4.2): the same weights go on at a longer context. --rope_factor
    # turns on Llama 3.1's RoPE scaling (model.scale_rope_frequencies): long wavelengths are stretched by the
    # factor, so positions beyond the trained context map to angles the model has seen. The scaling is anchored
    # at the context the model was trained at (Llama 3.1: 8192), here the loaded model's max_seq_len.
    if args.rope_factor and model.args.use_scaled_rope:  # (a second scaling would re-anchor the first)
        fail(f"--init {args.init} scales its RoPE already (by {model.args.rope_scaling_factor} from a context of "
             f"{model.args.rope_original_context}): drop --rope_factor, a longer --seq_len keeps its scaling")
    scaling = dict(use_scaled_rope=True, rope_scaling_factor=args.rope_factor,
                   rope_original_context=model.args.max_seq_len) if args.rope_factor else {}
    model_args = dataclasses.replace(model.args, max_seq_len=T, **scaling)
    try:
        init_tok = tokenizer_path(args.init)  # (a Hugging Face folder: original/tokenizer.model)
    except FileNotFoundError:
        init_tok = None
    try:
        same = Tokenizer.load(init_tok).fingerprint() == tok.fingerprint() if init_tok else \
            model.args.vocab_size == tok.n_words  # (no tokenizer beside it: its vocabulary's size at least)
    except (ValueError, OSError) as e:
        fail(f"--init: {e}")
    if not same:
        fail(f"--tokenizer {args.tokenizer} is not the tokenizer {args.init} was trained with: pass "
             f"--tokenizer {init_tok or 'TOKENIZER'} and --data shards made with it")
    state = model.state_dict()
    model = Transformer(model_args)
    model.load_state_dict(state)
else:
    overrides = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads")
                 if getattr(args, k) is not None}
    T = args.seq_len or PRESETS[args.model].max_seq_len
    try:
        model_args = dataclasses.replace(PRESETS[args.model], vocab_size=tok.n_words, max_seq_len=T, **overrides)
    except ValueError as e:  # (a shape ModelArgs refuses: --dim 100 over 4 heads is an odd head_dim)
        fail(f"--model {args.model} with {' '.join(f'--{k} {v}' for k, v in overrides.items())}: {e}")
    model = Transformer(model_args)
if tok.n_words > model_args.vocab_size:
    fail(f"{args.tokenizer} has {tok.n_words} tokens, more than vocab_size={model_args.vocab_size}")
raw_model = model.to(device)  # fp32 master weights; bf16 only inside autocast / FSDP's compute
if args.act_ckpt:  # recompute each block's activations in backward: memory for ~1/3 more compute
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block)
if args.compile:
    for block in model.layers:
        block.compile()  # in place, per block (as torchtitan does): the state dict keeps its names
if fsdp:  # FSDP2: every block is one all-gather unit; the root holds embeddings, final norm and output
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    bf16 = device.type == "cuda" and args.dtype == "bfloat16"  # then all-gather bf16 copies of the weights
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
elif ddp:
    model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
log(f"model: {raw_model.num_params(exclude_embedding=False) / 1e6:.2f}M parameters "
    f"({raw_model.num_params() / 1e6:.2f}M in matmuls: the N of 6N), {model_args}")

# -----------------------------------------------------------------------------
# optimizer, batches, and the state to resume from
optimizer = raw_model.configure_optimizer(args.lr, args.weight_decay, device_type=device.type)
# Polyak averaging (Llama 3 section 3.4.3: the pre-trained model is the average of checkpoints taken during the
# annealing): the running mean of the weights after each of the last --average_last steps, in fp32 beside them
# (sharded as they are under FSDP), in every checkpoint, and exported in place of the last weights. Keyed by the
# parameters' names without what --act_ckpt's wrapper adds to them (a resume may turn it on or off)
weights = {name.replace("_checkpoint_wrapped_module.", ""): p for name, p in raw_model.named_parameters()}
average = {name: torch.zeros_like(p) for name, p in weights.items()} if args.average_last else {}
average_from = args.max_steps - (args.average_last or 0)  # the first step whose weights are counted
B = args.batch_size
tokens_per_micro = B * T * world_size  # one micro-step of every process
tokens_per_step = args.tokens_per_step or tokens_per_micro
if tokens_per_step % tokens_per_micro:
    fail(f"--tokens_per_step {tokens_per_step} is not a multiple of batch_size * seq_len * processes = "
         f"{tokens_per_micro}")
grad_accum = tokens_per_step // tokens_per_micro
eval_steps = max(1, args.eval_tokens // tokens_per_micro)


# every rank takes its own rows of each global batch; the shards must come from this tokenizer (fingerprint). A mix
# draws each row from one folder by its share (data.MixedLoader). The validation loaders are made here once too, so
# that a split too small for seq_len stops the run now, not at its first evaluation
def loader(folder, split):
    return data.PackedLoader(folder, split, B, T, rank, world_size, args.seed, tok.fingerprint())


try:
    train_loader = loader(folders[0], "train") if len(folders) == 1 else \
        data.MixedLoader([loader(folder, "train") for folder in folders], shares, args.seed)
    for folder in folders:
        loader(folder, "val")
except ValueError as e:
    fail(str(e))
if len(folders) > 1:  # a mix: how often this run reads each folder (a small one with a large share: repeated)
    fractions = {folder: metas[folder]["config"].get("val_fraction") for folder in folders}
    if len(set(fractions.values())) > 1:  # the splits by hash nest, but not as the same sets
        said = ", ".join(f"{f} {v}" for f, v in fractions.items())
        log(f"note: the folders were split with other --val_fraction ({said}): a document in two of their sources "
            "can be in one's val and in another's train")
    for folder, share in zip(folders, shares):
        if share == 0:  # its train split is not read; its place in it is kept for a resume that gives it a share
            log(f"data mix: {folder} 0% of the tokens (evaluated only, not trained on)")
            continue
        n = metas[folder]["train"]["tokens"]
        reads = "" if args.max_minutes else f": {args.max_steps * tokens_per_step * share / n:.2f} epochs in this run"
        log(f"data mix: {folder} {share:.1%} of the tokens ({n:,} tokens in its train split{reads})")
ckpt_dir, log_path = os.path.join(args.out_dir, "ckpt"), os.path.join(args.out_dir, "log.csv")
if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
    fail(f"--out_dir {args.out_dir} is a file")
if args.resume == "last" and not list_checkpoints(ckpt_dir):  # (before the folder is made: a typo leaves none)
    fail(f"--resume: no checkpoint in {ckpt_dir}")
os.makedirs(ckpt_dir, exist_ok=True)
if master:  # away with half-written checkpoints of a run killed while saving
    for name in os.listdir(ckpt_dir):
        if name.endswith(".tmp"):
            shutil.rmtree(os.path.join(ckpt_dir, name))
start_step, last_ckpt, elapsed = 0, None, 0.0
if args.resume:
    last_ckpt = args.resume if args.resume != "last" else list_checkpoints(ckpt_dir)[-1]
    decays = [group["weight_decay"] for group in optimizer.param_groups]  # as this command's flags set them
    state = load_checkpoint(last_ckpt, model, optimizer, model_args, average, args)
    for group, decay in zip(optimizer.param_groups, decays):  # the saved groups bring their settings back: this
        group["weight_decay"] = decay                         # command's --weight_decay wins (lr is set every step)
    start_step, elapsed = state["step"], state.get("elapsed", 0.0)
    schedule = ("lr", "min_lr", "warmup_steps", "schedule", "decay_frac", "max_steps", "max_minutes")
    other = [f"--{k} {getattr(args, k)} (was {state['args'][k]})" for k in schedule
             if k in state.get("args", {}) and state["args"][k] != getattr(args, k)]
    if other:  # this command's flags run the schedule from here: say so, the lr may jump
        log(f"note: {last_ckpt} was trained on another schedule: {', '.join(other)}; the lr follows this command's "
            "flags from here (give the checkpoint's to continue its schedule exactly)")
    if args.max_minutes and "elapsed" not in state:
        log(f"note: {last_ckpt} was written before checkpoints kept the clock: the time budget starts over")
    try:
        train_loader.load_state_dict(state["loader"])
    except ValueError as e:  # another --seed, --seq_len, global batch or --data folders
        fail(f"{last_ckpt}: its data position does not fit this run ({e}); resume with the flags it was saved with")
    # a mix may change its shares on resume, and add folders after its own, as Llama 3's did while training
    was = state["loader"].get("weights") or ([1.0] if "windows" in state["loader"] else None)   # (one folder: all)
    if was is not None and (len(was) != len(shares) or any(abs(a - b) > 1e-9 for a, b in zip(was, shares))):
        added = "".join(f", {folder} new" + (" (evaluated only)" if share == 0 else " from its start")
                        for folder, share in zip(folders[len(was):], shares[len(was):]))
        log(f"note: the data mix changes at step {start_step}: shares {' / '.join(f'{w:.1%}' for w in was)} -> "
            f"{' / '.join(f'{w:.1%}' for w in shares)} (each folder goes on where it was{added}; val loss and bits "
            "per byte are weighed by the new shares from here)")
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and state["cuda_rng"] is not None:  # (None: saved on a CPU)
        torch.cuda.set_rng_state(state["cuda_rng"])
    log(f"resumed from {last_ckpt} at step {start_step}")
# a fresh log, or on resume the rows before the resumed step (the later ones are written again; every rank reads
# it, so that a damaged log stops them all)
log_rows = [r for r in read_log(log_path) if int(r["step"]) < start_step] if args.resume else []
if master:  # checkpoints after the start are another run's future: --resume must never go back to them
    later = [c for c in list_checkpoints(ckpt_dir) if int(os.path.basename(c).removeprefix("step_")) > start_step]
    for c in later:
        shutil.rmtree(c)
    if later:
        log(f"removed {len(later)} checkpoint(s) after step {start_step} in {ckpt_dir}, left by an earlier run")
    atomic_write(os.path.join(args.out_dir, "train_args.json"),   # this run's flags, readable
                 lambda f: f.write(json.dumps(vars(args), indent=1).encode()))
    write_log(log_path, log_rows)
flops_per_token, peak = raw_model.flops_per_token(T), peak_flops(device)
recomputed = sum("CheckpointWrapper" in type(block).__name__ for block in raw_model.layers)  # (as built, not asked)
log(f"{world_size} process(es) on {device.type}, {'FSDP2' if fsdp else 'DDP' if ddp else 'no parallelism'}, "
    + (f"activation checkpointing in {recomputed} blocks, " if recomputed else "") + f"{args.dtype} matmuls; "
    f"{tokens_per_step} tokens per step = {B} x {T} x {world_size} processes x {grad_accum} micro-steps; " +
    (f"MFU against {peak / 1e12:.1f} TFLOP/s per card" if peak else "MFU n/a (no datasheet peak for this device)"))


@torch.no_grad()
def evaluate():
    """Mean loss over about eval_tokens tokens of each folder's validation split (whole global batches, at least
    one; no more than the split holds, so that no window counts twice): the loader's seeded order, so the same
    windows at every evaluation of a run. -> (val loss, bits per byte, [each folder's loss]): the first two weigh
    the folders by their shares (a folder of share 0 counts for nothing in them: its loss is only reported)."""
    model.eval()
    total, steps = torch.zeros(len(folders), device=device), []
    for i, folder in enumerate(folders):
        val_loader = loader(folder, "val")
        steps.append(min(eval_steps, max(1, val_loader.n_windows // (B * world_size))))
        for _ in range(steps[-1]):
            x, y, doc_ids = (t.to(device) for t in val_loader.next_batch())
            with autocast:
                total[i] += model(x, y, doc_ids=doc_ids)
    if distributed:
        dist.all_reduce(total)
    model.train()
    losses = [t / (n * world_size) for t, n in zip(total.tolist(), steps)]
    # bits per byte compare across tokenizers: nats per token / ln 2 / UTF-8 bytes per token (val split). A mix:
    # nats and bytes of each folder by its share of the tokens
    val_loss = sum(share * loss for share, loss in zip(shares, losses))
    val_bpb = val_loss / math.log(2) / sum(share * metas[f]["val"]["bytes"] / metas[f]["val"]["tokens"]
                                           for share, f in zip(shares, folders))
    return val_loss, val_bpb, losses


def val_line(val_loss, val_bpb, losses):
    """What a log line says of an evaluation: each folder's loss too, for a mix."""
    each = "" if len(folders) == 1 else " (" + ", ".join(f"{f} {loss:.4f}" for f, loss in zip(folders, losses)) + ")"
    return f"val loss {val_loss:.4f}, {val_bpb:.4f} bits per byte{each}"


# -----------------------------------------------------------------------------
# the loop
# SIGTERM (a scheduler's preemption, torchrun's shutdown) or SIGINT (Ctrl-C): finish the step, save, exit.
# Ctrl-C again quits at once, without saving. SIGTERM again is ignored, to the end: Slurm signals every process of
# a job and torchrun forwards its own copy, so a worker gets the same preemption twice, and must still save
stop_signal = 0


def on_signal(signum, frame):
    global stop_signal
    if stop_signal and signum == signal.SIGINT:
        raise KeyboardInterrupt
    stop_signal = stop_signal or signum
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
budget = args.max_minutes * 60 if args.max_minutes else None
if unused:
    log(f"note: the schedule runs on the clock of --max_minutes {args.max_minutes:g}"
        f"{' (the default on a CPU without --max_steps)' if clock_default else ''} (warmup: its first tenth): "
        f"{', '.join(unused)} not used")
if not budget and args.warmup_steps >= args.max_steps > start_step:
    log(f"note: --warmup_steps {args.warmup_steps} >= --max_steps {args.max_steps}: the lr never reaches --lr")
step, stopped, t_loop = start_step, False, time.time() - elapsed  # a resumed run's clock goes on where it was
while True:
    last = elapsed >= budget if budget else step >= args.max_steps  # under a budget: one step past it at most
    if (step % args.eval_interval == 0 or last) and not stopped:
        val_loss, val_bpb, losses = evaluate()
        log(f"step {step}: {val_line(val_loss, val_bpb, losses)}")
        if master:
            append_log(log_path, {"step": step, "val_loss": f"{val_loss:.6f}", "val_bpb": f"{val_bpb:.6f}"})
            plot_svg(read_log(log_path), os.path.join(args.out_dir, "loss.svg"))
    if step > start_step and (step % args.ckpt_interval == 0 or last or stopped):
        last_ckpt = os.path.join(ckpt_dir, f"step_{step:06d}")
        # the clock as it stands now (the last step's start would give a resumed run that step and this eval again)
        state = {"step": step, "elapsed": time.time() - t_loop, "loader": train_loader.state_dict(),
                 "rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                 "args": vars(args), "model_args": dataclasses.asdict(model_args)}
        save_checkpoint(last_ckpt, model, optimizer, state, rank, average)
        log(f"step {step}: saved {last_ckpt}")
    if last or stopped:
        break

    # this step's learning rate: by step count or, under a time budget, by the clock (warmup: its first tenth),
    # so that a budgeted run ends on time with its schedule complete whatever the machine's speed. Rank 0's clock
    # for every rank: the same lr everywhere (DDP's replicas must take the same step), and the same last step
    if budget:
        elapsed = torch.tensor(time.time() - t_loop, dtype=torch.float64, device=device)
        if distributed:
            dist.broadcast(elapsed, src=0)
        elapsed = elapsed.item()
        lr = get_lr(elapsed, budget / 10, budget, args)
    else:
        lr = get_lr(step + 1, args.warmup_steps, args.max_steps, args)
    for group in optimizer.param_groups:
        group["lr"] = lr
    t0 = time.time()

    # forward/backward over grad_accum micro-batches; DDP all-reduces gradients only on the last one (FSDP2
    # reduce-scatters them after every one: its gradients are sharded, nothing to accumulate them in locally)
    loss_sum = torch.zeros((), device=device)
    for micro in range(grad_accum):
        x, y, doc_ids = (t.to(device, non_blocking=True) for t in train_loader.next_batch())
        with model.no_sync() if ddp and micro < grad_accum - 1 else nullcontext():
            with autocast:
                loss = model(x, y, doc_ids=doc_ids) / grad_accum  # fp32 mean cross-entropy of this micro-batch
            loss.backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    # one all-reduce carries the loss (mean over ranks) and whether any rank was asked to stop
    stats = torch.stack([loss_sum, torch.tensor(float(stop_signal), device=device)])
    if distributed:
        dist.all_reduce(stats)
    loss, stopped, grad_norm = stats[0].item() / world_size, stats[1].item() > 0, float(grad_norm)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # stop before the update can spoil the weights
        msg = (f"step {step}: loss {loss}, gradient norm {grad_norm}; stopping without taking this step. "
               f"The last good checkpoint is {last_ckpt or 'none (no checkpoint saved yet)'}: resume from it with "
               f"--resume, perhaps with a lower --lr")
        fail(msg)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if average and step >= average_from:  # the k-th counted weights move the mean by 1/k of their distance to it
        with torch.no_grad():
            for name, p in weights.items():
                average[name].lerp_(p, 1 / (step + 1 - average_from))

    dt = time.time() - t0  # on GPU: includes waiting for the previous step's kernels (the .item() above)
    tokens_per_s = tokens_per_step / dt
    mfu = flops_per_token * tokens_per_s / (peak * world_size) if peak else None
    if master:
        append_log(log_path, {"step": step, "train_loss": f"{loss:.6f}", "lr": f"{lr:.3e}",
                              "grad_norm": f"{grad_norm:.4f}", "tokens_per_s": f"{tokens_per_s:.0f}",
                              "mfu": f"{mfu:.4f}" if mfu else ""})
    if step % args.log_interval == 0:
        log(f"step {step:5d} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | {dt * 1000:.0f} ms | "
            f"{tokens_per_s:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu else ""))
    step += 1

if stopped:
    # (stop_signal is this rank's own: 0 on a rank whose process got none, e.g. on a node that was not preempted)
    by = signal.Signals(stop_signal).name if stop_signal else "to another process"
    log(f"stopped by signal {by} at step {step}: "
        f"the same command with --resume continues from {last_ckpt}")
    finish(0)

# -----------------------------------------------------------------------------
# export in Meta's layout (sample.py, align.py and Meta's own loaders read it), then print a sample
if average:  # the averaged weights are the model: they take the last weights' place, with their own val loss
    with torch.no_grad():
        for name, p in weights.items():
            p.copy_(average[name])
    val_loss, val_bpb, losses = evaluate()
    log(f"the mean of the weights of the last {args.average_last} steps: {val_line(val_loss, val_bpb, losses)}")
full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if master:
    save_model(raw_model, args.out_dir, tokenizer_path=args.tokenizer, state_dict=full_state)
    log(f"exported {args.out_dir} (params.json, consolidated.00.pth, tokenizer.model); "
        f"val loss {val_loss:.4f}, {val_bpb:.4f} bits per byte; {time.time() - t_start:.0f}s in all")
    prompt = tok.encode(args.prompt, bos=True)
    n = min(args.sample_tokens, T - len(prompt))
    if n > 0 and fsdp:  # a model sharded to fit would not fit one device whole
        log(f"no sample under FSDP: python sample.py --ckpt {args.out_dir} --prompt {args.prompt!r}")
    elif n > 0:  # from the exported files: what sample.py will load
        out, _ = generate(load_model(args.out_dir, device=device).eval(), [prompt], n, temperature=0.8, top_k=50,
                          stop_ids=tok.stop_ids, generator=torch.Generator(device).manual_seed(args.seed))
        log("-" * 80 + "\n" + args.prompt + tok.decode(out[0]) + "\n" + "-" * 80)
finish(0)
