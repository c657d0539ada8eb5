"""Fit the evaluation plan on each rank of a torchrun group from costs that differ by rank (used by
test_gpu_paths): writes what each rank alone would plan and what the group agrees on to $PLAN_OUT."""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

cfg, _ = tg.load_config({"PHASED_TTT_NUM_PHASES": "3", "PHASED_TTT_PREFIX_DOCS": "2000"})
rt = tg.setup_runtime(cfg)
docs = [(i * 1000, i * 1000 + 999) for i in range(2000)]
# rank 1 measured itself 30% slower: 90 s (90% of a 100 s budget) fits rank 0's projection of TTT with its phases
# (75 s on two ranks) but not rank 1's (94 s)
costs = tg.EvalCosts(0.25, 0.25, 3e-6 * (1 + 0.3 * rt.rank), 0.0, 0.0125)
alone = tg.fit_plan(cfg, docs, 2_000_000, rt.world_size, costs, 100.0, lambda s: None)
agreed = tg.agreed_plan(cfg, docs, 2_000_000, rt, tg.slowest_costs(costs, rt), 100.0, lambda s: None)
out = Path(os.environ["PLAN_OUT"]) / f"rank{rt.rank}.json"  # a file each: two ranks' prints interleave on a pipe
out.write_text(json.dumps({"rank": rt.rank, "alone": alone.describe(), "agreed": agreed.describe()}))
torch.distributed.barrier()
torch.distributed.destroy_process_group()
