"""Check a dataset before paying for a run: the same checks train_gpt.py's preflight makes.

  python check_data.py                       # reads DATA_DIR / DATA_PATH / TOKENIZER_PATH / VOCAB_SIZE / CASEOPS_ENABLED
  python check_data.py --data-path D --tokenizer T --vocab-size 8192 --caseops
Exit status 0 and a JSON report when the data is usable; 1 and the reason (with the fix) when not.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import train_gpt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-path")
    ap.add_argument("--tokenizer")
    ap.add_argument("--vocab-size", type=int)
    ap.add_argument("--caseops", action="store_true")
    a = ap.parse_args(argv)
    env = dict(os.environ)
    for key, val in (("DATA_PATH", a.data_path), ("TOKENIZER_PATH", a.tokenizer), ("VOCAB_SIZE", a.vocab_size)):
        if val is not None:
            env[key] = str(val)
    if a.caseops:
        env["CASEOPS_ENABLED"] = "1"
    try:
        cfg, _ = train_gpt.load_config(env)
        sp = train_gpt.check_tokenizer(cfg)
        rep = train_gpt.check_dataset(cfg, sp)
    except (train_gpt.ConfigError, train_gpt.DataError) as e:
        print(f"data check failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(dataclasses.asdict(rep) | {"data_path": cfg.data_path, "tokenizer": cfg.tokenizer_path}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
