"""Packing: the self-describing artifact (per-group, #1855), its loss-free round trip, the counted code
wrapper, SKIP_TRAIN from the checkpoint's own architecture, and rate control."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import train_gpt as tg
from conftest import ROOT, clean_env, log_value, run_trainer


def _same_weights(qa: dict, qb: dict) -> None:
    da, db = tg.dequantize_state(qa), tg.dequantize_state(qb)
    assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)


def test_pergroup_packing_is_lossless_and_smaller_than_brotli(trained_tiny):
    """#1855: role streams (rows similarity-sorted, column-major) through ZPAQ beat one brotli stream."""
    cfg, qm = tg.unpack_artifact((trained_tiny["out"] / "final_model.int6.ptz").read_bytes())
    assert any(isinstance(v, tg.QTensor) and v.lqer is not None for v in qm.values())
    assert any(isinstance(v, tg.QTensor) and v.hi_start >= 0 for v in qm.values())
    grouped, single = tg.pack_artifact(qm, cfg, "pergroup"), tg.pack_artifact(qm, cfg, "brotli")
    _same_weights(qm, tg.unpack_artifact(grouped)[1])
    print(f"pergroup {len(grouped)} bytes, brotli {len(single)} bytes")
    assert len(grouped) < len(single)


def test_similarity_order_is_a_permutation_that_chains_near_rows():
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-5, 6, (4, 64), generator=g)
    rows = torch.cat([base[i % 4] + torch.randint(-1, 2, (64,), generator=g) for i in range(40)]).view(40, 64)
    order = tg.similarity_order(rows.to(torch.int8))
    assert sorted(order.tolist()) == list(range(40)) and order[0] == 0
    chained = (rows[order][1:] - rows[order][:-1]).abs().sum()
    assert chained < (rows[1:] - rows[:-1]).abs().sum()


def test_artifact_roundtrip_in_fresh_process(trained_tiny, tmp_path):
    art = trained_tiny["out"] / "final_model.int6.ptz"
    cfg, qm = tg.unpack_artifact(art.read_bytes())
    ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    code = (f"import sys, torch; sys.path.insert(0, {str(ROOT)!r}); import train_gpt as tg\n"
            f"rt = tg.Runtime.cpu()\n"
            f"cfg, m = tg.load_artifact_model({str(art)!r}, rt)\n"
            f"torch.save({{'sd': m.state_dict(), 'logits': m.eval().logits(torch.load({str(tmp_path / 'ids.pt')!r}))}}, "
            f"{str(tmp_path / 'fresh.pt')!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=clean_env())
    fresh = torch.load(tmp_path / "fresh.pt")
    model = tg.model_from_quantized(cfg, qm, tg.Runtime.cpu())
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh["sd"][k]), k
    assert torch.equal(model.eval().logits(ids), fresh["logits"])
    # and the artifact's config is the run's config
    assert cfg.model_dim == 64 and cfg.crawler_loops == 2


def test_corrupt_and_truncated_artifacts_are_rejected(trained_tiny):
    blob = (trained_tiny["out"] / "final_model.int6.ptz").read_bytes()
    with pytest.raises(tg.ArtifactError, match="truncated"):
        tg.unpack_artifact(blob[:-1000])
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    with pytest.raises(tg.ArtifactError, match="corrupted"):
        tg.unpack_artifact(bytes(flipped))
    with pytest.raises(tg.ArtifactError, match="magic"):
        tg.unpack_artifact(b"PK\x03\x04" + blob[4:])


@pytest.mark.parametrize("comp", ["brotli", "zstd", "lzma", "pergroup"])
def test_other_compressors_roundtrip(trained_tiny, comp):
    cfg, qm = tg.unpack_artifact((trained_tiny["out"] / "final_model.int6.ptz").read_bytes())
    cfg2, qm2 = tg.unpack_artifact(tg.pack_artifact(qm, cfg, comp))
    for k in qm:
        a, b = tg.dequantize_state({k: qm[k]})[k], tg.dequantize_state({k: qm2[k]})[k]
        assert torch.equal(a, b)


def test_log_reports_sizes_and_roundtrip(trained_tiny):
    out, log = trained_tiny["out"], trained_tiny["stdout"]
    assert log_value(log, "Code size:", "Code size:") == (out / "train_gpt.counted.py").stat().st_size
    assert log_value(log, "Serialized model", "pergroup:") == (out / "final_model.int6.ptz").stat().st_size
    total = log_value(log, "Total submission size", "pergroup:")
    assert total == (out / "train_gpt.counted.py").stat().st_size + (out / "final_model.int6.ptz").stat().st_size
    assert "gptq:phase2" in log and "final_int6_roundtrip_exact val_loss:" in log


def test_counted_wrapper_runs_the_pipeline_from_checkpoint(trained_tiny, tmp_path):
    """SKIP_TRAIN through the shipped wrapper: re-calibrate, quantize, pack and evaluate without training."""
    out = trained_tiny["out"]
    wrapper = tmp_path / "train_gpt.py"
    wrapper.write_bytes((out / "train_gpt.counted.py").read_bytes())
    env = trained_tiny["env"] | {"SKIP_TRAIN": "1", "INIT_MODEL_PATH": str(out / "final_model.pt"),
                                 "OUTPUT_DIR": str(tmp_path / "o")}
    full = clean_env() | {"OMP_NUM_THREADS": "1"} | env
    r = subprocess.run([sys.executable, str(wrapper)], env=full, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skip_train: loaded" in r.stdout and "final_int6_roundtrip_exact" in r.stdout
    assert "step:1/" not in r.stdout, "SKIP_TRAIN must not train"
    assert log_value(r.stdout, "Code size:", "Code size:") == wrapper.stat().st_size
    # same checkpoint, same calibration data -> the same quantized tensors (the header records SKIP_TRAIN)
    _, a = tg.unpack_artifact((tmp_path / "o" / "final_model.int6.ptz").read_bytes())
    _, b = tg.unpack_artifact((out / "final_model.int6.ptz").read_bytes())
    assert all(torch.equal(x, y) for x, y in zip(tg.dequantize_state(a).values(), tg.dequantize_state(b).values()))


def test_over_limit_is_evaluated_kept_and_exits_non_zero(trained_tiny, tmp_path):
    """An artifact over the cap is still evaluated (the user wants the number) and kept, but the run is marked
    invalid and exits non-zero (it exited 0 before). A cap the counted code alone reaches is refused at the start
    (it was found only after the whole training)."""
    code = len(tg.shipped_code())
    env = trained_tiny["env"] | {"SKIP_TRAIN": "1", "INIT_MODEL_PATH": str(trained_tiny["out"] / "final_model.pt"),
                                 "ARTIFACT_LIMIT_BYTES": str(code + 1000), "ARTIFACT_FIT": "0", "TTT_ENABLED": "0",
                                 "SLIDING_EVAL": "0"}
    r = run_trainer(env | {"ARTIFACT_LIMIT_BYTES": str(code)}, tmp_path)
    assert r.returncode != 0 and f"cannot be met: the counted code alone is {code} bytes" in r.stderr
    assert "model_params:" not in r.stdout and not list(tmp_path.iterdir())
    r = run_trainer(env, tmp_path)
    assert r.returncode != 0 and "broke a rule of the challenge" in r.stderr
    assert "ARTIFACT OVER LIMIT" in r.stdout and "NOT a valid submission" in r.stdout
    assert "final_int6_roundtrip_exact" in r.stdout and (tmp_path / "final_model.int6.ptz").is_file()
    summary = json.loads((tmp_path / "logs" / "seed1337_repack.summary.json").read_text())
    assert summary["valid"] is False and any(f"> {code + 1000}" in x for x in summary["invalid_reasons"])
    assert any("SKIP_TRAIN" in x for x in summary["invalid_reasons"])


def test_skip_train_with_other_model_fails_early(trained_tiny, tmp_path):
    env = trained_tiny["env"] | {"SKIP_TRAIN": "1", "INIT_MODEL_PATH": str(trained_tiny["out"] / "final_model.pt"),
                                 "MODEL_DIM": "128"}
    r = run_trainer(env, tmp_path)
    assert r.returncode != 0 and "MODEL_DIM=128 (checkpoint: 64)" in r.stderr


def test_minified_source_is_equivalent():
    src = (ROOT / "train_gpt.py").read_text()
    mini = tg.minify_source(src)
    assert '"""' not in mini.split("\n", 3)[0] and len(mini) < len(src)
    compile(mini, "train_gpt_min", "exec")
    # annotations nothing reads are gone; the ones read at run time stay: dataclass fields (the config loader),
    # custom ops' signatures (their schema), Triton's tl.constexpr
    assert "def check_code_fits(cfg):" in mini and "def check_code_fits(cfg: Config)" in src
    assert "    max_wallclock_seconds: float = " in mini
    assert "def _softcap_ce(x: Tensor, y: Tensor, cap: float, impl: str)" in mini
    assert "tl.constexpr" in mini
    assert "max_wallclock_seconds: float = _f('600.0', ''," in mini  # help lines are the README table's only


def test_entropy_estimate_tracks_the_compressor(trained_tiny):
    cfg, qm = tg.unpack_artifact((trained_tiny["out"] / "final_model.int6.ptz").read_bytes())
    est = sum(tg.entropy_bytes(v.q) + 2 * v.scale.numel() if isinstance(v, tg.QTensor) else 2 * v.numel()
              for v in qm.values())
    actual = len(tg.pack_artifact(qm, cfg, "brotli"))
    # an upper bound (so the fit errs towards fitting), and not a loose one
    assert actual <= est < 1.10 * actual, (est, actual)


def test_artifact_fit_brings_a_run_under_the_cap(trained_tiny, tmp_path):
    total = int(log_value(trained_tiny["stdout"], "Total submission size", "pergroup:"))
    limit = int(total * 0.9)
    env = trained_tiny["env"] | {"SKIP_TRAIN": "1", "INIT_MODEL_PATH": str(trained_tiny["out"] / "final_model.pt"),
                                 "ARTIFACT_LIMIT_BYTES": str(limit), "TTT_ENABLED": "0"}
    r = run_trainer(env, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    mult = float(r.stdout.split("int6 step multiplier ")[1].split()[0])
    assert mult > 1.0
    assert log_value(r.stdout, "Total submission size", "pergroup:") <= limit
    assert "ARTIFACT OVER LIMIT" not in r.stdout
    assert "int6 step multiplier 1.0000" in trained_tiny["stdout"]  # the default cap needed no widening


def test_rate_control_repacks_when_the_packer_does_worse_than_the_estimate(trained_tiny, plain_data, monkeypatch):
    """A pack over the cap is not final: the step is re-fitted with the measured packed/estimated ratio and the
    model packed again, and the first attempt keeps the native steps whenever the estimate fits."""
    cfg, _ = tg.load_config(trained_tiny["env"])
    rt = tg.Runtime.cpu()
    model = tg.GPT(cfg)
    model.load_state_dict(torch.load(trained_tiny["out"] / "final_model.pt")["state_dict"])
    batches = tg.TrainData(tg.shard_paths(str(plain_data["data_path"]), "train"), cfg, rt, 1).calibration_batches()
    cal = tg.calibrate(model, cfg, rt, batches, lambda s: None)
    estimate = tg.int6_bytes(cal.int6_rows(rt), 1.0) + cal.fixed_bytes()
    real = tg.pack_artifact
    native = len(real(tg.quantize_model(model, cal, cfg, rt, lambda s: None), cfg, cfg.compressor))
    grow = 1.1 * estimate / native  # a packer that lands 10% over the estimate at the native steps

    def worse(qm, c, comp):
        blob = real(qm, c, comp)
        return blob + bytes(int(len(blob) * (grow - 1)))

    monkeypatch.setattr(tg, "pack_artifact", worse)
    cfg = dataclasses.replace(cfg, artifact_limit_bytes=int(estimate) + 2000)  # the estimate fits: native first
    lines = []
    blob = tg.pack_within_cap(model, cal, cfg, rt, 1000, lines.append)
    fits = [l for l in lines if l.startswith("artifact_fit: attempt")]
    assert fits[0].startswith("artifact_fit: attempt 1 int6 step multiplier 1.0000"), fits
    assert len(fits) >= 2 and float(fits[1].split("multiplier ")[1].split()[0]) > 1.0
    assert len(blob) + 1000 <= cfg.artifact_limit_bytes
    assert int(fits[-1].rsplit(": ", 1)[1].split()[0]) == len(blob) + 1000
    # calibration makes two passes over its batches whatever the rate control does (as calibration_reserve projects):
    # phase 1, and phase 2 for the first pack, which the re-packs reuse (each re-collected it before)
    passes, collect = [], tg.collect_hessians
    monkeypatch.setattr(tg, "collect_hessians", lambda *a, **k: (passes.append(1), collect(*a, **k))[1])
    cal = tg.calibrate(model, cfg, rt, batches, lambda s: None)
    lines = []
    tg.pack_within_cap(model, cal, cfg, rt, 1000, lines.append)
    assert len([l for l in lines if l.startswith("artifact_fit: attempt")]) >= 2 and len(passes) == 2


def test_skip_train_rebuilds_the_checkpoints_architecture(trained_tiny, tmp_path):
    """A model field the environment does not set comes from the checkpoint (ROPE_DIMS, QK_GAIN_INIT, ... all of
    them, not a hand-kept list), so the rebuilt model is the trained one. The re-pack runs with host and device told
    apart (tests/host_device.py): the checkpoint is read on the host and its weights copied to the device."""
    env = {k: v for k, v in trained_tiny["env"].items() if k not in ("ROPE_DIMS", "INST_DIM", "MLP_MULT")}
    env |= {"SKIP_TRAIN": "1", "INIT_MODEL_PATH": str(trained_tiny["out"] / "final_model.pt"), "TTT_ENABLED": "0",
            "SLIDING_EVAL": "0"}
    r = run_trainer(env, tmp_path, emulate=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "config: ROPE_DIMS=8" in r.stdout and "config: INST_DIM=8" in r.stdout and "config: MLP_MULT=2.0" in r.stdout
    r = run_trainer(env | {"ROPE_DIMS": "4"}, tmp_path)
    assert r.returncode != 0 and "ROPE_DIMS=4 (checkpoint: 8)" in r.stderr
