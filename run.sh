#!/usr/bin/env bash
# One seed of the reference run:   SEED=42 bash run.sh
# Preflight (packages, data, tokenizer, GPUs, disk) runs first and fails in seconds with the fix.
# Output: $RECORD_DIR/train_seed$SEED.log (the console log), train_seed$SEED.env (exact environment,
# command, versions), and the run's files in $RUN_DIR. The exit code is train_gpt.py's.
# A seed's finished log and env are never overwritten: the run writes *.partial files and moves them into place
# when train_gpt.py exits by itself (a killed run leaves only the .partial files); OVERWRITE=1 replaces a log.
# Configuration: any train_gpt.py variable (see README), plus
#   NPROC (8), DEVICE (cuda | cpu), RECORD_DIR, RUN_DIR, PYTHON (python3), MIN_FREE_GB (4), OVERWRITE (0).
set -uo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
SEED=${SEED:-1337}
NPROC=${NPROC:-8}
DEVICE=${DEVICE:-cuda}
RECORD_DIR=${RECORD_DIR:-records/track_10min_16mb/$(date +%Y-%m-%d)_FlatCrawler}
RUN_DIR=${RUN_DIR:-runs/seed$SEED}
MIN_FREE_GB=${MIN_FREE_GB:-4}
LOG="$RECORD_DIR/train_seed$SEED.log"
ENVF="$RECORD_DIR/train_seed$SEED.env"
fail() { echo "preflight: FAIL: $*" >&2; exit 2; }

if [ -e "$LOG" ] && [ "${OVERWRITE:-0}" != 1 ]; then
  fail "$LOG is a finished run of seed $SEED: choose another SEED or RECORD_DIR, move it away, or set OVERWRITE=1"
fi
echo "preflight: packages"
"$PY" - <<'PY' || fail "install the requirements: $PY -m pip install -r requirements.txt"
import importlib, os, sys
comp = {"zstd": ["zstandard"]}  # zpaq (counted code) and brotli (artifact header) are needed whatever COMPRESSOR says
missing = []
for m in ["torch", "numpy", "sentencepiece", "zpaq", "brotli"] + comp.get(os.environ.get("COMPRESSOR", "pergroup"), []):
    try:
        importlib.import_module(m)  # a real import: a present but broken package counts as missing
    except ImportError:
        missing.append(m)
if missing:
    sys.exit(f"missing Python packages: {' '.join(missing)}")
PY
echo "preflight: data and tokenizer"
VARIANT=sp8192_caseops; [ "${CASEOPS_ENABLED:-1}" = 0 ] && VARIANT=sp1024
SEED=$SEED "$PY" check_data.py >/dev/null || fail "fix the data above (download: $PY data/cached_challenge_fineweb.py --variant $VARIANT)"
if [ "$DEVICE" = cuda ]; then
  echo "preflight: GPUs"
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
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
SEED=$SEED OUTPUT_DIR=$RUN_DIR "${CMD[@]}" 2>&1 | tee "$LOG.partial"
RC=${PIPESTATUS[0]}
if [ "$RC" -lt 128 ]; then  # train_gpt.py ended by itself (a pass, an invalid run, an error it reported)
  mv -f "$LOG.partial" "$LOG" && mv -f "$ENVF.partial" "$ENVF"
else
  echo "run: killed (exit $RC); its log is $LOG.partial, and $LOG was left as it was" >&2
fi
exit "$RC"
