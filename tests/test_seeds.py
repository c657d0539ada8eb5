"""The README's "Reproduce a seed" section: every env block builds, and its parameter count is the one the table
gives, with the difference to the seed's own log explained to the parameter."""
from __future__ import annotations

import re
import shlex

import pytest
import torch

import train_gpt as tg
from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
SECTION = README[README.index("## Reproduce a seed"):README.index("\n## ", README.index("## Reproduce a seed") + 5)]
LOGGED = {  # the counts in the seeds' own logs (ClownCar: counted from its script, it published no log)
    "crawler_leg3": 14_462_508, "clowncar": 13_430_316, "clowncar_ii": 14_487_088, "nightcrawler": 16_889_396,
    "ouroboros": 26_253_908, "pr1736": 35_989_658, "pr1855": 35_945_671, "pr2014": 35_945_673, "pr2135": 35_945_673,
}


def table() -> dict[str, tuple[int, int, int]]:
    """key -> (our params, logged params, explained difference) from the README table."""
    rows = {}
    for line in SECTION.splitlines():
        m = re.match(r"\| `(\w+)` \|", line)
        if m:
            cells = [c.strip() for c in line.strip("|").split("|")]
            num = lambda s: int(s.replace(",", ""))  # noqa: E731
            rows[m[1]] = (num(cells[3]), num(cells[4]), int(re.match(r"([\d,]+):", cells[5])[1].replace(",", "")))
    return rows


def env_blocks() -> dict[str, dict[str, str]]:
    """key -> the environment of its `env ... bash run.sh` line, with $CRAWLER_SEED expanded as the shell would."""
    base = shlex.split(re.search(r'^CRAWLER_SEED="([^"]*)"$', SECTION, re.M)[1])
    blocks, key = {}, None
    for line in SECTION.splitlines():
        if line.startswith("# "):
            key = line[2:].strip()
        elif line.startswith("env ") and line.endswith("bash run.sh"):
            words = [w for part in shlex.split(line[4:-len("bash run.sh")]) for w in (base if part == "$CRAWLER_SEED"
                                                                                       else [part])]
            blocks[key] = dict(w.split("=", 1) for w in words)
    return blocks


def test_the_table_and_the_blocks_cover_every_seed():
    assert set(table()) == set(env_blocks()) == set(LOGGED)


@pytest.mark.parametrize("key", sorted(LOGGED))
def test_seed_block_builds_with_the_documented_parameter_count(key):
    cfg, unknown = tg.load_config(env_blocks()[key])
    assert not unknown
    with torch.device("meta"):
        ours = sum(p.numel() for p in tg.GPT(cfg).parameters())
    claimed, logged, diff = table()[key]
    assert ours == claimed, f"{key}: the model has {ours} parameters, the README says {claimed}"
    assert logged == LOGGED[key] and ours + diff == logged


def test_crawler_seeds_keep_their_published_mechanisms():
    blocks = env_blocks()
    for key in ("crawler_leg3", "clowncar", "clowncar_ii", "nightcrawler", "ouroboros"):
        cfg, _ = tg.load_config(blocks[key])
        assert cfg.vocab_size == 1024 and not cfg.caseops_enabled and not cfg.ttt_enabled
        with torch.device("meta"):
            model = tg.GPT(cfg)
        assert [b.attn.xsa for b in model.blocks] == [tg.is_crawler(f"blocks.{i}.x", cfg) for i in range(cfg.n_blocks)]
    assert tg.load_config(blocks["clowncar_ii"])[0].delta_net_heads == 4
    assert tg.load_config(blocks["nightcrawler"])[0].loop_rope_scales == (9.0, 1.0, 1.0)
    assert tg.load_config(blocks["pr1855"])[0].ttt_lora_rank == 80


def test_our_default_is_1855s_model_and_topology():
    defaults, _ = tg.load_config({})
    with torch.device("meta"):
        assert sum(p.numel() for p in tg.GPT(defaults).parameters()) == table()["pr1855"][0] == table()["pr2135"][0]
    assert (defaults.n_encoder, defaults.n_crawler, defaults.n_decoder, defaults.n_loops) == (3, 3, 5, 3)


def test_the_default_is_2135s_settings_and_pr2014_keeps_the_previous_default():
    """Issue 19: #2135's settings (read from its code and seed-42 log) are the defaults; `pr2014` restores the
    previous (#2014-based) default exactly."""
    d, _ = tg.load_config({})
    assert (d.matrix_lr, d.qk_gain_init, d.lqer_group, d.lqer_top_k, d.lqer_rank) == (0.028, 5.0, 32, 3, 4)
    assert (d.ttt_lora_lr * d.ttt_local_lr_mult, d.ttt_weight_decay, d.ttt_lora_rank, d.ttt_mask) == (8e-5, 2.0, 80, "no_k")
    assert (d.phased_ttt_num_phases, d.phased_ttt_prefix_docs, d.eval_seq_len, d.train_seq_len) == (1, 2500, 2560, 2048)
    assert d.seq_stages == [(2048, 1.0)] and (d.ttt_chunk_size, d.ttt_batch_docs) == (48, 64) and d.ngram_tilt
    assert set(tg.lora_shapes(d, d.ttt_mask)) >= {"0.q", "0.v", "0.o", "0.mlp", "head"}
    assert not any(k.endswith(".k") for k in tg.lora_shapes(d, d.ttt_mask))
    old, _ = tg.load_config(env_blocks()["pr2014"] | {"SEED": "1337"})
    assert old.qk_gain_init == 5.25
    assert (old.matrix_lr, old.lqer_group, old.gptq_cal_samples, old.eval_seq_len, old.ttt_mask) == (0.026, 64, 768, 3072, "no_qv")
    assert old.seq_stages == [(1024, 0.1), (2048, 0.7), (3072, 1.0)] and old.short_chunks == [(256, 8), (2000, 24)]
    assert (old.ttt_lora_lr, old.ttt_local_lr_mult, old.ttt_weight_decay, old.ttt_batch_docs) == (1e-4, 0.75, 0.5, 24)
    assert not old.ngram_tilt
