#!/usr/bin/env bash
# Everything that needs a GPU, as one prepared run: the GPU tests, the GPU benchmarks and a short
# train.py run. Made for a lent device with little time (15 minutes in all, start-up included), so each part
# has its own time limit, writes its whole log to $OUT/<part>.log as it goes, and a part that fails or runs
# out of time does not stop the next. The last lines printed are each part's status and the tail of its log.
#
#     bash tests/gpu_check.sh env tests bench_kernels          # the kernels: limits sum to 590 s (timeout_s 600)
#     bash tests/gpu_check.sh train graph bench_train bench_train_b4 bench_sample bench_train_compile \
#         bench_loss                                           # the model: 560 s, run in this order (the most
#                                                              # needed first: what the device has left may be less)
# (two calls, each under the device's 10-minute cap; with no arguments it runs every part. The limits add up to
# more than the 15 minutes of device time, so they are ceilings, not plans: on an H200, 2026-11-28, the kernels
# call took 307 s (with --against), the model call 402 s, and the device tool's lease counted 745 s for both with
# the machine's start (2026-11-27: 270, 361, 674 s): no time is left for a third call. Run the kernels call first, and the next at once: a machine idle for
# 30 s goes back. The device returns at most 8 files from $OUT: the model call writes exactly 8.)
#
# bench_kernels also times another version of the kernels beside ours when out/base/ holds its attention.py and
# rmsnorm.py (carry it). c75f879 (2026-11-27, before the 64-row dk/dv tiles) was the last one timed, on 2026-11-28;
# b818606 has the fastest causal rows before HEAD_LOOPS, b4e136d the one-kernel backward:
#     mkdir -p out/base && for f in attention rmsnorm; do git show c75f879:kernels/$f.py > out/base/$f.py; done
#
# Parts, in the order they run: env, tests, bench_kernels, train, graph, bench_train, bench_train_b4, bench_sample,
# bench_train_compile, bench_loss.
# `train` uses data/stdlib when it is there (carry it: making the tokenizer and shards first took 23 s of 2 CPU
# cores here) and starts afresh in out/gpu_check/train.
set -u
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
PARTS=${*:-env tests bench_kernels train graph bench_train bench_train_b4 bench_sample bench_train_compile bench_loss}
export PYTHONUNBUFFERED=1  # logs stay complete up to the moment a time limit kills a part

run() {  # run PART LIMIT_S CMD...: CMD under a time limit, its output in $OUT/PART.log
    local part=$1 limit=$2 t0=$SECONDS
    shift 2
    case " $PARTS " in *" $part "*) ;; *) return ;; esac
    echo "== $part (limit ${limit}s): $*"
    timeout -k 10 "$limit" "$@" >"$OUT/$part.log" 2>&1
    local rc=$?
    local status="ok"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="TIME LIMIT"
    [ $rc -ne 0 ] && [ "$status" = ok ] && status="FAILED (exit $rc)"
    echo "$part: $status in $((SECONDS - t0))s" | tee -a "$OUT/status.txt"
}

: >"$OUT/status.txt"
run env 30 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, \
torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, \"SMs\")'"
# kernel tests at GPU shapes (bf16, head_dim 128, every autotune config once), the CUDA dispatch test, the model
# on the kernels against the same weights on CPU (test_model.py), and align's chunked log-probs on CUDA; -v so
# that a time limit still shows which test it reached, --durations for where the time went (compiling every
# config); 8 processes when pytest-xdist is there, since compiling is CPU work (39 s on the H100 machine at
# b818606, 55 s at b4e136d, 107 s at c75f879 on the H200, when dk/dv had 5 configs; 73 s with 7 at 3df7f67;
# bench_kernels took 153 s at c75f879 with --against, compiling and autotuning two versions' spaces on an empty
# cache, and 228 s at 3df7f67, FlexAttention compiled with static shapes, once per (T, mask) row, 10 where it was ~3:
# rows print as they end, so a time limit loses only the longest T's. Since 90ed676 the space has 21 configs, not
# 14 (HEADS_INNER): expect both parts to take longer, by a guess a quarter)
XDIST=$($PY -c 'import xdist' 2>/dev/null && echo "-n 8")
run tests 210 $PY -m pytest -v -x --durations=10 $XDIST tests/test_kernels.py tests/test_model.py \
    tests/test_align.py::test_token_logprobs_chunked_equal_the_full_log_softmax
AGAINST=$([ -f out/base/attention.py ] && echo "--against out/base")
run bench_kernels 350 $PY tests/bench_kernels.py $AGAINST
case " $PARTS " in *" train "*) rm -rf out/gpu_check/train ;; esac  # a fresh run dir, only when it runs
run train 60 $PY train.py --out_dir out/gpu_check/train --max_steps 60 --eval_interval 30 --ckpt_interval 30 \
    --log_interval 10 --sample_tokens 40 --average_last 10  # (and the average's CUDA path)
# appended to its log, not a file of its own: the device sends back at most 8 files
[ -f out/gpu_check/train/log.csv ] && { echo "== log.csv"; cat out/gpu_check/train/log.csv; } >>"$OUT/train.log"
# generate's decode step as a CUDA graph: its test first, then (bench_sample) the benchmark that times it
run graph 50 $PY -m pytest -v -x tests/test_sample.py -k "cuda or replay"
run bench_train 90 $PY tests/bench_train.py --skip_cpu              # B = 1, 8 micro-steps a step
# B = 4 as in the README's 1-GPU train.py line: per micro-step costs (autocast's bf16 copies of the weights,
# adding the bf16 gradients into the fp32 ones) spread over 4x the tokens, longer matrix products
run bench_train_b4 90 $PY tests/bench_train.py --skip_cpu --batch_size 4 --micro_steps 2
run bench_sample 60 $PY tests/bench_sample.py --device cuda   # (3 models since 2026-11-28)
run bench_train_compile 100 $PY tests/bench_train.py --skip_cpu --batch_size 4 --micro_steps 2 --compile
# chunked loss and log-probs: time, memory (the log-prob rows need more than 60 s: 86 s for all on the H200)
run bench_loss 110 $PY tests/bench_loss.py --device cuda

for part in $PARTS; do
    [ -f "$OUT/$part.log" ] || continue
    echo
    echo "######## $part: $(grep "^$part:" "$OUT/status.txt")"
    tail -n 30 "$OUT/$part.log"
done
