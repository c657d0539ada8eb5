#!/usr/bin/env bash
# One seed of the reference run:   SEED=42 bash run.sh
# Preflight (packages, data, tokenizer, the run's output files, GPUs, disk) runs first and fails in seconds with the fix.
# Output: $RECORD_DIR/train_$RUN_ID.log (the console log), train_$RUN_ID.env (exact environment, command, versions),
# and the run's files in $RUN_DIR; RUN_ID is the trainer's: seed$SEED, seed${SEED}_repack for a re-pack of a saved
# checkpoint (SKIP_TRAIN=1 INIT_MODEL_PATH=$RUN_DIR/final_model.pt, same SEED and RUN_DIR), seed${SEED}_eval for
# EVAL_ONLY=1. The exit code is train_gpt.py's, or 128+signal when the run was stopped.
# Nothing is overwritten: a run whose log (finished or .partial) exists, or a RUN_DIR holding a run's files or being
# written by one, is refused. The run writes *.partial files and moves them into place only when train_gpt.py
# finished the pipeline (it wrote the run's summary file); a stopped or failed run keeps its .partial log, which
# ends with how it ended.
# Stopping: Ctrl-C, SIGTERM to this script or to its process group (timeout, a scheduler) reach the trainer, which
# saves its checkpoint (Ctrl-C reaches torchrun as TERM); the log's `tee` ignores them, so the log keeps the run's
# last lines.
# Configuration: any train_gpt.py variable (see README), plus
#   NPROC (8), DEVICE (cuda | cpu), RECORD_DIR, RUN_DIR, PYTHON (python3), MIN_FREE_GB (4).
set -uo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
SEED=${SEED:-1337}
NPROC=${NPROC:-8}
DEVICE=${DEVICE:-cuda}
RECORD_DIR=${RECORD_DIR:-runs/logs}
RUN_DIR=${RUN_DIR:-runs/seed$SEED}
MIN_FREE_GB=${MIN_FREE_GB:-4}
fail() { echo "preflight: FAIL: $*" >&2; exit 2; }

echo "preflight: packages and the run's output files"
# one Python start for three checks; it prints the run's RUN_ID, the CUDA GPU count and the summary's path
PRE=$(SEED=$SEED OUTPUT_DIR=$RUN_DIR "$PY" - <<'PY'
import importlib, os, sys
comp = {"zstd": ["zstandard"]}  # zpaq (counted code) and brotli (artifact header) are needed whatever COMPRESSOR says
missing = []
for m in ["torch", "numpy", "sentencepiece", "zpaq", "brotli"] + comp.get(os.environ.get("COMPRESSOR", "pergroup"), []):
    try:
        importlib.import_module(m)  # a real import: a present but broken package counts as missing
    except ImportError:
        missing.append(m)
if missing:
    print(f"missing Python packages: {' '.join(missing)}", file=sys.stderr)
    sys.exit(3)
import torch
import train_gpt as t
try:
    cfg = t.load_config()[0]
    t.lock_output_dir(cfg, create=False)  # the trainer's own rules: no run writes beside a running one,
    t.check_outputs_free(cfg)  # nor overwrites its files
except t.ConfigError as e:
    sys.exit(str(e))
print(cfg.run_id, torch.cuda.device_count(), t.summary_path(cfg))
PY
)
case $? in
  0) ;;
  3) fail "install the requirements: $PY -m pip install -r requirements.txt" ;;
  *) fail "the configuration or RUN_DIR=$RUN_DIR (see the message above)" ;;
esac
read -r RUN_ID NGPU SUMMARY <<< "$PRE"
# Named by the trainer's RUN_ID: seed$SEED, seed${SEED}_repack for a SKIP_TRAIN re-pack, seed${SEED}_eval for EVAL_ONLY
LOG="$RECORD_DIR/train_$RUN_ID.log"
ENVF="$RECORD_DIR/train_$RUN_ID.env"
for f in "$LOG" "$LOG.partial" "$ENVF" "$ENVF.partial"; do
  [ -e "$f" ] && fail "$f is from an earlier run (RUN_ID $RUN_ID; a .partial one was stopped or failed): choose another SEED or RECORD_DIR, or move it away"
done
echo "preflight: data and tokenizer"
VARIANT=sp8192_caseops; [ "${CASEOPS_ENABLED:-1}" = 0 ] && VARIANT=sp1024
SEED=$SEED "$PY" check_data.py >/dev/null || fail "fix the data above (download: $PY data/cached_challenge_fineweb.py --variant $VARIANT)"
if [ "$DEVICE" = cuda ]; then
  echo "preflight: GPUs"
  if [ "$NGPU" -eq 0 ]; then
    fail "found 0 CUDA GPUs (is this a GPU machine? check nvidia-smi and that torch is a CUDA build), or run on CPU with DEVICE=cpu NPROC=1"
  fi
  [ "$NGPU" -ge "$NPROC" ] || fail "found $NGPU CUDA GPUs, need NPROC=$NPROC (set NPROC=$NGPU, or DEVICE=cpu for a CPU run)"
  "$PY" -c "import flash_attn_interface" 2>/dev/null \
    || echo "preflight: WARNING: FlashAttention 3 (flash_attn_interface) is not importable; training uses PyTorch flex attention and runs slower" >&2
fi
mkdir -p "$RECORD_DIR" "$RUN_DIR"
FREE_GB=$(df -Pk "$RUN_DIR" | awk 'NR==2 {print int($4 / 1048576)}')
[ "$FREE_GB" -ge "$MIN_FREE_GB" ] || fail "only ${FREE_GB} GB free under $RUN_DIR; need MIN_FREE_GB=$MIN_FREE_GB"

CMD=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" train_gpt.py)
# noclobber: the env file and the log are created only if absent (O_EXCL), so of two run.sh of one seed started
# together, the second stops here instead of truncating the first one's files
set -C
{
  echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) seed $SEED"
  echo "command: SEED=$SEED OUTPUT_DIR=$RUN_DIR ${CMD[*]}"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo none) $(git --no-optional-locks status --porcelain 2>/dev/null | grep -q . && echo dirty)"
  "$PY" -c "import torch, platform; print('versions: python', platform.python_version(), 'torch', torch.__version__)"
  env | grep -E "^[A-Z][A-Z0-9_]*=" | grep -vE "^(PATH|HOME|PWD|OLDPWD|SHLVL|TERM|USER|LOGNAME|SHELL|HOSTNAME|LANG|_)=" | sort
} > "$ENVF.partial" || fail "$ENVF.partial appeared after the check above: another run.sh of $RUN_ID started at the same time"
# The trainer runs in the background so that a signal to this script is passed on at once (bash runs a trap only
# between commands, and `wait` is one it can interrupt); tee reads a FIFO and ignores INT and TERM, so stopping the
# run never takes its log (or the trainer's stdout) away before the trainer has saved and said so. A background
# command of a script starts with SIGINT ignored, and torchrun installs its handlers only once it starts workers:
# INT is passed on as TERM, which stops torchrun at any moment; torchrun passes it on to its workers (they run in
# sessions of their own, out of the terminal's reach).
# The traps are set before the "run:" line, so a signal from then on is always passed on.
PID="" TEE="" SIGNALED=0
cleanup() { [ -n "$TEE" ] && kill -9 "$TEE" 2>/dev/null; }
trap cleanup EXIT
forward() { SIGNALED=$1; [ -n "$PID" ] && kill -s TERM "$PID" 2>/dev/null; }
reap() { until wait "$1"; ! kill -0 "$1" 2>/dev/null; do :; done; }  # a trapped signal ends a wait early
trap 'forward 130' INT
trap 'forward 143' TERM
# The log exists before tee starts: a signal that ends tee's subshell before its own trap leaves an empty log.
: > "$LOG.partial" || fail "$LOG.partial appeared after the check above: another run.sh of $RUN_ID started at the same time"
set +C
# The log pipe: a FIFO whose two ends this script opens itself (fd 5 writes, fd 6 reads; neither open waits) and
# unlinks at once, so that no stop, SIGKILL included, leaves it behind. tee reads fd 6, the trainer writes fd 5, and
# tee sees the log's end when the trainer has ended and this script closes fd 5.
FIFO=$(mktemp -u "${TMPDIR:-/tmp}/run_sh.XXXXXX")
mkfifo "$FIFO" || fail "cannot make a FIFO for the log in ${TMPDIR:-/tmp}"
exec 4<>"$FIFO" 5>"$FIFO" 6<"$FIFO" 4>&-
rm -f "$FIFO"
(trap '' INT TERM; exec tee "$LOG.partial" <&6 5>&- 6>&-) &
TEE=$!
exec 6>&-
echo "run: ${CMD[*]} -> $LOG"
if [ "$SIGNALED" -eq 0 ]; then  # a stop before this point never starts the trainer
  SEED=$SEED OUTPUT_DIR=$RUN_DIR "${CMD[@]}" >&5 2>&1 5>&- &
  PID=$!
fi
RC=0
if [ -n "$PID" ]; then
  [ "$SIGNALED" -ne 0 ] && kill -s TERM "$PID" 2>/dev/null  # a signal that came before PID was known
  reap "$PID"
  wait "$PID"; RC=$?  # the trainer's own status (bash keeps it for a child that has exited)
fi
exec 5>&-
reap "$TEE"  # tee drains the pipe, then exits
TEE=""
# The pipeline ran to its end (pass or not) when its summary exists: the preflight made sure none did before.
if [ -f "$SUMMARY" ]; then
  mv -f "$LOG.partial" "$LOG" && mv -f "$ENVF.partial" "$ENVF"
else
  [ "$SIGNALED" -ne 0 ] && RC=$SIGNALED  # torchrun reports a stop by signal as 1
  MSG="run: stopped or failed (exit $RC); its log is $LOG.partial (the checkpoint, if training started, is in $RUN_DIR)"
  echo "$MSG" >&2
  echo "$MSG" >> "$LOG.partial"  # the log says how the run ended, even one stopped before the trainer wrote a line
fi
exit "$RC"
