"""Config: one typed object from the environment, validated at once, every mistake named."""
from __future__ import annotations

import sys

import pytest

import train_gpt as tg
from conftest import ROOT


@pytest.mark.parametrize("env,needle", [  # variables as typed in a shell, and what the error must name
    ("MODEL_DIM=100 NUM_HEADS=8", "NUM_HEADS"),
    ("NUM_HEADS=8 NUM_KV_HEADS=3", "NUM_KV_HEADS"),
    ("TRAIN_BATCH_TOKENS=1000", "TRAIN_SEQ_LEN"),
    ("WARMDOWN_ITER=100", "did you mean WARMDOWN_ITERS"),
    ("CRAWLER_MLP_CHOKE_DIM=0", "CRAWLER_MLP_CHOKE_DIM"),
    ("TIED_EMBED_LR=0.03", "here it is EMBED_LR"),
    ("MATRIX_LR=fast", "MATRIX_LR"),
    ("CRAWLER_LOOPS=4", "CRAWLER_LOOP_ROPE_SCALES"),
    ("WARMDOWN_ITERS=10 WARMDOWN_FRAC=0.2", "both set"),
    ("MAX_WALLCLOCK_SECONDS=10 GPTQ_RESERVE_SECONDS=20", "GPTQ_RESERVE_SECONDS"),
    ("GATED_ATTN_ENABLED=1", "choose one attention gate"),
    ("TRAIN_SEQ_SCHEDULE=1024@0.5,1536@1.0", "must end with TRAIN_SEQ_LEN=2048@1.0"),
    ("TRAIN_SEQ_SCHEDULE=1024,3072", "LEN@FRACTION"),
    ("PARALLEL_RESIDUAL_START=2", "flat decoder block"),
    ("VE_LAYERS=3", "set VE_DIM"),
    ("USE_CRAWLER=0 DELTA_NET_HEADS=4", "belong to the crawler"),
    ("DOC_MASKED_ATTN=0 TRAIN_SEQ_SCHEDULE=1024@0.5,2048@1.0", "needs DOC_MASKED_ATTN=1"),
    ("GPTQ_CAL_SEQ_LEN=100000", "GPTQ_CAL_SEQ_LEN"),  # killed for memory after training, before issue 17
    # issue 25: a traceback, or a variable silently ignored, before
    ("NUM_HEADS=0", "NUM_HEADS=0 is below its minimum 1"),  # was a ZeroDivisionError
    ("NUM_KV_HEADS=0", "NUM_KV_HEADS=0 is below its minimum 1"),
    ("MATRIX_LR=nan", "MATRIX_LR='nan' is not a finite number"),  # nan passes every range check
    ("NUM_LAYERS=1e999", "NUM_LAYERS='1e999' is not an integer"),  # was an OverflowError
    ("matrix_lr=0.05", "matrix_lr is not read: variable names are upper case; did you mean MATRIX_LR"),
    ("INIT_MODEL_PATH=/x/final_model.pt", "INIT_MODEL_PATH=/x/final_model.pt is read only with SKIP_TRAIN=1"),
    ("ARTIFACT_PATH=/x/a.ptz", "read only with EVAL_ONLY=1"),
    ("SKIP_TRAIN=1 EVAL_ONLY=1", "choose one"),
])
def test_bad_config_names_the_variable(env, needle):
    with pytest.raises(tg.ConfigError, match=needle):
        tg.load_config(dict(kv.split("=", 1) for kv in env.split()))


def test_defaults_are_valid_and_the_frontier_crawler_form():
    cfg, warnings = tg.load_config({})
    assert not warnings
    assert (cfg.n_encoder, cfg.n_crawler, cfg.n_loops, cfg.n_decoder) == (3, 3, 3, 5)
    assert cfg.caseops_enabled and cfg.vocab_size == 8192 and cfg.crawler_start_frac == 0.35
    assert cfg.seq_stages == [(2048, 1.0)] and cfg.short_chunks == [] and cfg.eval_seq_len == 2560  # #2135


def test_world_divisibility_error():
    cfg, _ = tg.load_config({"TRAIN_BATCH_TOKENS": str(2048 * 12), "TRAIN_SEQ_LEN": "2048",
                             "TRAIN_SEQ_SCHEDULE": ""})
    with pytest.raises(tg.ConfigError, match="multiple of"):
        tg.validate_world(cfg, 8)


def test_unrelated_env_is_ignored():
    assert tg.unknown_env_report({"PATH": "/bin", "HOME": "/root", "LOCAL_RANK": "0", "NCCL_DEBUG": "1",
                                  "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "0",
                                  "MATCHED_FINEWEB_REPO_ID": "x"}) == []


def test_config_survives_a_dict_round_trip():
    import dataclasses

    cfg, _ = tg.load_config({"VE_DIM": "8", "VE_LAYERS": "1,4"})
    assert tg.config_from_dict(dataclasses.asdict(cfg)) == cfg


def test_a_saved_config_of_another_version_is_named_not_a_traceback():
    """A checkpoint or artifact whose config has a field this version does not know raised a TypeError; one that lacks
    a model field would have loaded into a different model."""
    import dataclasses

    saved = dataclasses.asdict(tg.load_config({})[0])
    with pytest.raises(tg.ConfigError, match="another version of train_gpt.py .*does not know: future_knob"):
        tg.config_from_dict(saved | {"future_knob": 3}, "ckpt.pt")
    with pytest.raises(tg.ConfigError, match="model fields it lacks: rope_dims"):
        tg.config_from_dict({k: v for k, v in saved.items() if k != "rope_dims"}, "ckpt.pt")
    older = {k: v for k, v in saved.items() if k != "ngram_tilt_boost"}  # a missing non-model field takes its default
    assert tg.config_from_dict(older).ngram_tilt_boost == 2.625


def test_config_reference_lists_every_field():
    ref = tg.config_reference_markdown()
    for name in tg.ENV_NAMES:
        assert f"`{name}`" in ref


def test_readme_config_table_is_current():
    assert tg.config_reference_markdown() in (ROOT / "README.md").read_text(), "run python3 tools/update_readme.py"


@pytest.mark.parametrize("compressor", ["pergroup", "brotli", "lzma"])
def test_the_counted_codes_zpaq_is_checked_whatever_the_compressor(compressor, monkeypatch):
    """The counted code is always ZPAQ-compressed and the header brotli: both are checked before training, and the
    advice is to install them, never to switch COMPRESSOR (issue 17)."""
    cfg, _ = tg.load_config({"COMPRESSOR": compressor})
    tg.check_compressor(cfg)
    monkeypatch.setitem(sys.modules, "zpaq", None)  # import zpaq now raises ImportError
    with pytest.raises(tg.ConfigError, match="pip install zpaq") as e:
        tg.check_compressor(cfg)
    assert "COMPRESSOR=brotli" not in str(e.value).replace(f"COMPRESSOR={compressor}", "")
