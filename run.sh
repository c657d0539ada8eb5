#!/usr/bin/env bash
# One seed of the reference run:   SEED=42 bash run.sh
# Preflight (packages, data, tokenizer, the run's output files, GPUs, disk) runs first and fails in seconds with the fix.
# Output: $RECORD_DIR/train_seed$SEED.log (the console log), train_seed$SEED.env (exact environment, command,
# versions), and the run's files in $RUN_DIR. The exit code is train_gpt.py's, or 128+signal when the run was stopped.
# Nothing is overwritten: a seed whose log (finished or .partial) exists, or a RUN_DIR holding a run's files, is
# refused. The run writes *.partial files and moves them into place only when train_gpt.py finished the pipeline
# (its summary line is in the log); a stopped or failed run keeps its .partial log, which says what happened.
# Stopping: Ctrl-C, SIGTERM to this script or to its process group (timeout, a scheduler) reach the trainer, which
# saves its checkpoint; the log's `tee` ignores them, so the log keeps the run's last lines.
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
LOG="$RECORD_DIR/train_seed$SEED.log"
ENVF="$RECORD_DIR/train_seed$SEED.env"
fail() { echo "preflight: FAIL: $*" >&2; exit 2; }

for f in "$LOG" "$LOG.partial"; do
  [ -e "$f" ] && fail "$f is the log of an earlier run of seed $SEED (a .partial one was stopped or failed): choose another SEED or RECORD_DIR, or move it away"
done
echo "preflight: packages and the run's output files"
# one Python start for three checks; it prints the CUDA GPU count for the GPU check below
NGPU=$(SEED=$SEED OUTPUT_DIR=$RUN_DIR "$PY" - <<'PY'
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
    t.check_outputs_free(t.load_config()[0])  # the trainer's own rule: no run overwrites another's files
except t.ConfigError as e:
    sys.exit(str(e))
print(torch.cuda.device_count())
PY
)
case $? in
  0) ;;
  3) fail "install the requirements: $PY -m pip install -r requirements.txt" ;;
  *) fail "the configuration or RUN_DIR=$RUN_DIR (see the message above)" ;;
esac
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
{
  echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) seed $SEED"
  echo "command: SEED=$SEED OUTPUT_DIR=$RUN_DIR ${CMD[*]}"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo none) $(git status --porcelain 2>/dev/null | grep -q . && echo dirty)"
  "$PY" -c "import torch, platform; print('versions: python', platform.python_version(), 'torch', torch.__version__)"
  env | grep -E "^[A-Z][A-Z0-9_]*=" | grep -vE "^(PATH|HOME|PWD|OLDPWD|SHLVL|TERM|USER|LOGNAME|SHELL|HOSTNAME|LANG|_)=" | sort
} > "$ENVF.partial"
echo "run: ${CMD[*]} -> $LOG"

# The trainer runs in the background so that a signal to this script is passed on at once (bash runs a trap only
# between commands, and `wait` is one it can interrupt); tee reads a FIFO and ignores INT and TERM, so stopping the
# run never takes its log (or the trainer's stdout) away before the trainer has saved and said so.
FIFO=$(mktemp -u "${TMPDIR:-/tmp}/run_sh.XXXXXX")
mkfifo "$FIFO" || fail "cannot make a FIFO for the log"
(trap '' INT TERM; exec tee "$LOG.partial" < "$FIFO") &
TEE=$!
SIGNALED=0
forward() { SIGNALED=$1; kill -s "$2" "$PID" 2>/dev/null; }
trap 'forward 130 INT' INT
trap 'forward 143 TERM' TERM
SEED=$SEED OUTPUT_DIR=$RUN_DIR "${CMD[@]}" > "$FIFO" 2>&1 &
PID=$!
while :; do
  wait "$PID"
  RC=$?
  kill -0 "$PID" 2>/dev/null || break  # a trapped signal ended the wait, not the trainer: wait again
done
wait "$PID"; RC=$?  # the trainer's own status (bash keeps it for a child that has exited)
wait "$TEE"
rm -f "$FIFO"
[ "$SIGNALED" -ne 0 ] && RC=$SIGNALED  # torchrun reports a stop by signal as 1
if [ "$SIGNALED" -eq 0 ] && grep -q "^summary:" "$LOG.partial"; then  # the pipeline ran to its end (pass or not)
  mv -f "$LOG.partial" "$LOG" && mv -f "$ENVF.partial" "$ENVF"
else
  echo "run: stopped or failed (exit $RC); its log is $LOG.partial (the checkpoint, if training started, is in $RUN_DIR)" >&2
fi
exit "$RC"
