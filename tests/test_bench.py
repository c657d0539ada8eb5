"""The benchmark tools run every stage they report on (figures are printed, never asserted against a clock)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import train_gpt as tg
from conftest import ROOT, clean_env

sys.path.insert(0, str(ROOT / "tools"))
import gpu_bench  # noqa: E402


@pytest.mark.slow
def test_gpu_bench_tiny_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_bench.py"), "--tiny", "--steps", "1", "--out", str(out)],
                       env=clean_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    b = json.loads(out.read_text())
    shapes = [k.removeprefix("train_ms_per_step_") for k in b if k.startswith("train_ms_per_step_")]
    assert shapes == ["seq32_loops1", "seq32_loops2", "seq64_loops2"]  # every (context, depth) of the schedule
    assert all(b[f"train_tokens_per_s_{s}"] > 0 and b[f"train_mfu_vs_790tflops_{s}"] > 0 for s in shapes)
    assert b["model_params"] > 0 and b["real_train_steps"] >= 1 and b["real_train_loss_curve"]
    assert b["real_train_recompiled"] is False and b["wrapper_ok"] is True
    for k in ("roundtrip", "sliding", "ttt"):
        assert b[f"eval_slice_{k}_measured_s"] > 0 and b[f"eval_slice_{k}_projected_s"] > 0
        assert b[f"eval_projected_{k}_s_on_8_gpus"] > 0
    assert b["artifact_total_bytes"] == b["artifact_model_bytes"] + b["code_bytes"]
    assert b["ngram_tilt_pass_s"] > 0 and b["ngram_tilt_pass_targets"] == 999_999 and "snapshot_host_ms" in b
    assert b["artifact_fit"][0].startswith("attempt 1 int6 step multiplier 1.0000")
    assert "| figure | value |" in r.stdout  # one summary table


def test_flop_count_matches_a_hand_count():
    env = {"VOCAB_SIZE": "64", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "NUM_FLAT_LAYERS": "2",
           "FLAT_ENCODER_LAYERS": "1", "NUM_CRAWLER_LAYERS": "1", "CRAWLER_LOOPS": "3", "CRAWLER_LOOP_ROPE_SCALES":
           "1,1,1", "MLP_MULT": "2", "CRAWLER_MLP_MULT": "4", "PARALLEL_RESIDUAL_START": "-1", "ROPE_DIMS": "4",
           "GATE_WINDOW": "8"}
    cfg, _ = tg.load_config(env)
    model = tg.GPT(cfg)
    d, kv = 32, 16
    attn = d * d + 2 * kv * d + d * d  # q, k, v, out (the 4x8 sparse gate is not a linear layer: not counted)
    flat, crawler = attn + 2 * 2 * d * d, attn + 2 * 4 * d * d
    want = 6 * (2 * flat + 3 * crawler + 64 * d) + 6 * 5 * d * 128
    assert gpu_bench.train_flops_per_token(model, cfg, 128, 3) == want


@pytest.mark.slow
def test_compressor_bench_repacks_losslessly(trained_tiny):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "compressor_bench.py"),
                        str(trained_tiny["out"] / "final_model.int6.ptz")],
                       env=clean_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith("candidate:")]
    assert len(lines) == 9 and all(l.endswith("lossless:1") for l in lines)
    default = int(next(l for l in lines if l.startswith("candidate:pergroup:zpaq,brotli:sorted")).split("bytes:")[1].split()[0])
    assert default == len(tg.pack_artifact(*reversed(tg.unpack_artifact(
        (trained_tiny["out"] / "final_model.int6.ptz").read_bytes())), "pergroup"))


def test_tilt_bench_times_the_pass():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "tilt_bench.py"), "--tokens", "50000"], env=clean_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(l for l in r.stdout.splitlines() if l.startswith("ngram_tilt_pass device:cpu"))
    assert "targets:49999" in line and float(line.split("pass_s:")[1]) > 0


def test_fault_bench_measures_the_guards(tmp_path, capsys):
    """tools/fault_bench.py, small: it runs and prints every figure (its numbers are for a person to read)."""
    from tools import fault_bench

    assert fault_bench.main(["--tokens", "300000", "--steps", "200", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for key in ("check_train_shards:", "heartbeat:", "snapshot:", "shared_state", "happy-path guards"):
        assert key in out, out
