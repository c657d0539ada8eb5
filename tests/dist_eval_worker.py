"""Run every eval mode on an artifact under torchrun and print the exact sums (used by test_eval)."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

art, env = sys.argv[1], json.loads(sys.argv[2])
cfg, _ = tg.load_config(env)
rt = tg.setup_runtime(cfg)
sp = tg.load_sentencepiece(cfg.tokenizer_path)
val = tg.load_validation(cfg, sp)
out = {}
for name in ("roundtrip", "sliding", "ttt"):
    _, m = tg.load_artifact_model(art, rt)
    s = tg.run_stage(name, m, m, val, cfg, rt, lambda msg: None)
    out[name] = [s.nll, s.tokens, s.bytes]
if rt.is_main:
    print("RESULT " + json.dumps(out))
if torch.distributed.is_initialized():
    torch.distributed.barrier()  # as train_gpt.main: no rank tears gloo down while another still talks
    torch.distributed.destroy_process_group()
