"""Issue 6: run.sh preflight, the record tool (statistics, refusals, outputs) and the CPU pipeline."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

from conftest import ROOT, clean_env, tiny_env
from tools import make_record as mr


def test_t_distribution_matches_tables():
    assert mr.t_sf(2.0, 10) == pytest.approx(0.036694, abs=2e-6)
    assert mr.t_sf(1.0, 5) == pytest.approx(0.181609, abs=2e-6)
    assert mr.t_sf(-1.0, 5) == pytest.approx(1 - 0.181609, abs=2e-6)
    assert mr.t_sf(2.764, 10) == pytest.approx(0.01, abs=5e-5)  # one-sided 1% critical value, df 10
    assert mr.t_sf(3.747, 4) == pytest.approx(0.01, abs=5e-5)
    assert mr.t_sf(0.0, 7) == pytest.approx(0.5)


def test_welch_matches_hand_computation():
    new, prev = [1.900, 1.902, 1.898], [1.910, 1.915, 1.905]
    m1, m2 = 1.9, 1.91
    s1, s2 = math.sqrt((0.002 ** 2 * 2) / 2), math.sqrt((0.005 ** 2 * 2) / 2)
    assert mr.mean_std(new) == pytest.approx((m1, s1))
    v1, v2 = s1 ** 2 / 3, s2 ** 2 / 3
    t = (m2 - 0.005 - m1) / math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1 ** 2 / 2 + v2 ** 2 / 2)
    res = mr.welch_one_sided(new, prev, 0.005)
    assert res["t"] == pytest.approx(t) and res["df"] == pytest.approx(df)
    assert res["p_value"] == pytest.approx(mr.t_sf(t, df)) and res["improvement_nats"] == pytest.approx(0.01)
    assert res["significant_p_lt_0_01"] is False  # 0.01 nats better, but 3 noisy seeds do not prove a 0.005 margin
    strong = mr.welch_one_sided([1.8000, 1.8001, 1.7999], prev, 0.005)
    assert strong["significant_p_lt_0_01"] is True
    with pytest.raises(mr.RecordError, match="at least 2 seeds"):
        mr.welch_one_sided([1.9], prev, 0.005)


def _seed_logs(trained_tiny, tmp_path, seeds=(1, 2), edit=None):
    # the tiny run scores a val prefix to stay fast (VAL_TOKEN_LIMIT, which marks it invalid); as record material the
    # logs say what a full-split run says
    src = (trained_tiny["out"] / "logs" / "seed1337.txt").read_text()
    src = re.sub(r" valid:0 reasons:.*", " valid:1", re.sub(r"config: VAL_TOKEN_LIMIT=\d+", "config: VAL_TOKEN_LIMIT=0", src))
    paths = []
    for i, s in enumerate(seeds):
        text = src.replace("config: SEED=1337", f"config: SEED={s}")
        if i == 1:  # the second seed scored a little differently
            text = re.sub(r"quantized_ttt_phased val_loss:([0-9.]+)",
                          lambda m: f"quantized_ttt_phased val_loss:{float(m[1]) + 0.01:.8f}", text)
            if edit:
                text = edit(text)
        p = tmp_path / f"train_seed{s}.log"
        p.write_text(text)
        paths.append(p)
    return paths


def test_record_folder_contents_and_table(trained_tiny, tmp_path):
    logs = _seed_logs(trained_tiny, tmp_path)
    folder = mr.build_record(logs, "Tiny", "A. Person", "aperson", tmp_path / "records", prev_losses=[9.0, 9.1, 9.05],
                             date="2026-11-23")
    assert folder == tmp_path / "records" / "track_10min_16mb" / "2026-11-23_Tiny"
    names = {p.name for p in folder.iterdir()}
    assert {"train_gpt.py", "train_seed1.log", "train_seed2.log", "submission.json", "README.md",
            "train_curves.png", "requirements.txt"} <= names
    assert (folder / "train_gpt.py").read_bytes() == (trained_tiny["out"] / "train_gpt.counted.py").read_bytes()
    sub = json.loads((folder / "submission.json").read_text())
    runs = [mr.parse_log(p) for p in logs]
    losses = [r.values["ttt_loss"] for r in runs]
    assert sub["val_loss"] == pytest.approx(sum(losses) / 2)
    assert sub["val_loss_std"] == pytest.approx(abs(losses[0] - losses[1]) / math.sqrt(2))
    assert sub["seeds"] == [1, 2] and sub["significance"]["significant_p_lt_0_01"] is True
    for k in ("author", "github_id", "name", "date", "val_bpb", "bytes_total", "bytes_code", "per_seed", "hardware",
              "versions", "compliance"):
        assert k in sub
    readme = (folder / "README.md").read_text()
    for r in runs:  # the table shows exactly what the logs say
        row = [l for l in readme.splitlines() if l.startswith(f"| {r.seed} |")][0]
        assert f"{r.values['ttt_bpb']:.5f}" in row and f"{r.values['sliding_bpb']:.5f}" in row
        assert str(int(r.values["bytes_total"])) in row
    assert (folder / "train_curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.split("final_int6_sliding_window_exact")[0], "incomplete"),
    (lambda t: re.sub(r"Total submission size (\S+): \d+", r"Total submission size \1: 16000001", t), "cap"),
    (lambda t: re.sub(r"train\+calibration:[0-9.]+s", "train+calibration:601.0s", t), "training \\+ calibration"),
    (lambda t: re.sub(r"eval_total_time:[0-9.]+s", "eval_total_time:700.0s", t), "evaluation took"),
    (lambda t: t.replace("config: MATRIX_LR=0.02", "config: MATRIX_LR=0.03"), "disagree on configuration: MATRIX_LR"),
    (lambda t: re.sub(r"code_sha256:\w+", "code_sha256:" + "0" * 64, t), "different code"),
    (lambda t: t.replace("config: VAL_TOKEN_LIMIT=0", "config: VAL_TOKEN_LIMIT=8192"), "VAL_TOKEN_LIMIT=8192"),
    (lambda t: t.replace("config: SKIP_TRAIN=False", "config: SKIP_TRAIN=True"), "SKIP_TRAIN re-pack"),
    (lambda t: t + "ERROR: the evaluation modes scored different target counts\n", "invalid run"),
    (lambda t: t.replace(" valid:1", " valid:0"), "invalid run"),
    (lambda t: re.sub(r"quantized_ttt_phased val_loss:.*\n", "", t), "different final evaluations"),
])
def test_record_refusals(trained_tiny, tmp_path, edit, needle):
    logs = _seed_logs(trained_tiny, tmp_path, edit=edit)
    with pytest.raises(mr.RecordError, match=needle):
        mr.build_record(logs, "Tiny", "a", "b", tmp_path / "records")
    assert not (tmp_path / "records").exists() or not any((tmp_path / "records").rglob("submission.json"))


def test_record_refuses_duplicate_seeds_and_cli_reports(trained_tiny, tmp_path, capsys):
    logs = _seed_logs(trained_tiny, tmp_path, seeds=(3, 3))
    assert mr.main(["--log", *map(str, logs), "--name", "x", "--author", "a", "--github-id", "b",
                    "--out-root", str(tmp_path / "r")]) == 1
    assert "duplicate seeds" in capsys.readouterr().err


def test_a_record_is_built_once_from_complete_single_run_logs(trained_tiny, tmp_path, monkeypatch):
    """make_record reused an existing record folder (keeping a stale seed log), wrote NaN (invalid JSON) for one
    log's standard deviation, and accepted a log holding a finished run followed by a killed re-run. A build that
    fails half-way leaves nothing."""
    logs = _seed_logs(trained_tiny, tmp_path)
    folder = mr.build_record(logs, "Tiny", "a", "b", tmp_path / "records", date="2026-11-23")
    with pytest.raises(mr.RecordError, match="exists: a record folder is built once"):
        mr.build_record(logs[:1], "Tiny", "a", "b", tmp_path / "records", date="2026-11-23")
    assert {p.name for p in folder.glob("train_seed*.log")} == {"train_seed1.log", "train_seed2.log"}
    one = mr.build_record(logs[:1], "One", "a", "b", tmp_path / "records", date="2026-11-23")
    sub = json.loads((one / "submission.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert sub["val_bpb_std"] is None and "std n/a (one seed)" in (one / "README.md").read_text()
    twice = tmp_path / "twice" / "train_seed9.log"
    twice.parent.mkdir()
    twice.write_text(logs[0].read_text() + logs[1].read_text().split("quantized_ttt_phased")[0])
    with pytest.raises(mr.RecordError, match="holds 2 runs"):
        mr.build_record([twice], "Twice", "a", "b", tmp_path / "records")
    assert not list((tmp_path / "records" / "track_10min_16mb").glob(".*"))
    def full_disk(*a):
        raise OSError("the disk filled while plotting")

    monkeypatch.setattr(mr, "plot", full_disk)  # a failure after the first files were written
    with pytest.raises(OSError, match="the disk filled"):
        mr.build_record(logs, "Broken", "a", "b", tmp_path / "records", date="2026-11-23")
    names = {p.name for p in (tmp_path / "records" / "track_10min_16mb").iterdir()}
    assert names == {"2026-11-23_Tiny", "2026-11-23_One"}  # no half-built folder, under its name or a temporary one


def _run_sh(env, timeout=120):
    return subprocess.run(["bash", str(ROOT / "run.sh")], env=clean_env() | env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_run_sh_preflight_failures(plain_data, tmp_path):
    base = tiny_env(plain_data) | {"RECORD_DIR": str(tmp_path / "rec"), "RUN_DIR": str(tmp_path / "run")}
    r = _run_sh(base | {"DATA_PATH": str(tmp_path / "missing")})
    assert r.returncode == 2 and "DATA_PATH" in r.stderr and "cached_challenge_fineweb.py" in r.stderr
    r = _run_sh(base)  # data is fine; this machine has no GPU
    assert r.returncode == 2 and "found 0 CUDA GPUs" in r.stderr and "DEVICE=cpu NPROC=1" in r.stderr
    assert "set NPROC=0" not in r.stderr
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "brotli.py").write_text("raise ImportError('simulated missing brotli')\n")
    r = _run_sh(base | {"PYTHONPATH": str(shadow)})
    assert r.returncode == 2 and "pip install -r requirements.txt" in r.stderr
    assert not (tmp_path / "rec" / "train_seed1337.log").exists()


def test_run_sh_never_overwrites_a_seeds_log_or_a_runs_files(plain_data, tmp_path):
    """A re-run of a seed whose log exists (finished, or .partial from a run that was stopped) is refused before
    anything runs, and so is a RUN_DIR that holds another run's files: a run killed mid-way leaves .partial files and
    its checkpoint, and nothing of another run is replaced."""
    rec = tmp_path / "rec"
    rec.mkdir()
    (rec / "train_seed1337.log").write_text("finished\n")
    base = tiny_env(plain_data) | {"RECORD_DIR": str(rec), "RUN_DIR": str(tmp_path / "run"), "DEVICE": "cpu",
                                   "NPROC": "1", "MIN_FREE_GB": "0"}
    r = _run_sh(base)
    assert r.returncode == 2 and "train_seed1337.log is from an earlier run (RUN_ID seed1337;" in r.stderr
    for name in ("train_seed1337.log.partial", "train_seed1337.env.partial"):  # the env file of a run stopped early
        (rec / "train_seed1337.log").rename(rec / name)
        r = _run_sh(base)
        assert r.returncode == 2 and f"{name} is from an earlier run (RUN_ID seed1337;" in r.stderr, r.stderr
        (rec / name).rename(rec / "train_seed1337.log")
    (rec / "train_seed1337.log").unlink()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "final_model.int6.ptz").write_bytes(b"another run's artifact")
    r = _run_sh(base)
    assert r.returncode == 2 and "already holds another run's files (final_model.int6.ptz)" in r.stderr
    assert (tmp_path / "run" / "final_model.int6.ptz").read_bytes() == b"another run's artifact"
    assert not list(rec.iterdir())


@pytest.mark.release
def test_cpu_pipeline_end_to_end(tmp_path):
    """The README's CPU pipeline command, as written, in a scratch directory."""
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "cpu_pipeline.py"), "--work", str(tmp_path / "w")],
                       env=clean_env(), capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    folder = next((tmp_path / "w" / "records" / "track_10min_16mb").iterdir())
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["seeds"] == [1, 2] and sub["score"] == "ttt" and sub["bytes_total"] < 16_000_000
    assert sub["val_bpb"] < 1.2  # the tiny model really learned the corpus (untrained: ~log2(512)*tokens/bytes)
    env_file = (tmp_path / "w" / "records" / "logs" / "train_seed1.env").read_text()
    assert "command:" in env_file and "CASEOPS_ENABLED=1" in env_file
