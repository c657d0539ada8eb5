"""Assemble a submission folder from seed logs (as written by run.sh).

  python tools/make_record.py --name FlatCrawler --author "Ada L" --github-id ada \
      --log runs/logs/train_seed*.log \
      --prev-losses 1.9532,1.9541,1.9528

Builds <out-root>/track_10min_16mb/<date>_<name>/ with train_gpt.py (the counted wrapper the logs
measured), the logs, submission.json, README.md (results table, statistics) and train_curves.png.
Refuses, with the reason, when a log is incomplete, over the size cap, over a time budget, or when the
logs disagree on configuration or code. Significance: one-sided Welch t-test that the new mean val_loss
beats the previous record's by at least --margin nats (challenge rule: 0.005 nats at p < 0.01).
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_RUN_KEYS = {"SEED", "RUN_ID", "OUTPUT_DIR", "INIT_MODEL_PATH"}  # may differ between seeds


class RecordError(ValueError):
    pass


@dataclass
class SeedRun:
    path: Path
    config: dict[str, str] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def seed(self) -> int:
        return int(self.config["SEED"])

    @property
    def score_key(self) -> str:
        return next(k for k in ("ttt", "sliding", "roundtrip") if f"{k}_bpb" in self.values)


NUM = r"([-+0-9.eE]+)"
PATTERNS = {
    "bytes_code": rf"^Code size: {NUM} bytes",
    "bytes_model": rf"^Serialized model \S+: {NUM} bytes",
    "bytes_total": rf"^Total submission size \S+: {NUM} bytes",
    "roundtrip_loss": rf"^final_int6_roundtrip_exact val_loss:{NUM} val_bpb:{NUM}",
    "sliding_loss": rf"^final_int6_sliding_window_exact val_loss:{NUM} val_bpb:{NUM}",
    "ttt_loss": rf"^quantized_ttt_phased val_loss:{NUM} val_bpb:{NUM}",
    "train_plus_cal_s": rf"^gptq:calibration time:{NUM}s train\+calibration:{NUM}s",
    "eval_total_s": rf"^eval_total_time:{NUM}s",
    "model_params": rf"^model_params:{NUM}",
}
REQUIRED = ("bytes_code", "bytes_total", "roundtrip_loss", "train_plus_cal_s", "eval_total_s")  # sliding/TTT as planned


def parse_log(path: Path) -> SeedRun:
    run = SeedRun(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    starts = sum(line.startswith("versions:") for line in lines)  # the first line every run logs
    if starts > 1:
        raise RecordError(f"{path} holds {starts} runs (a re-run appended to it): a record takes one run per log; "
                          "give the log of the run you mean")
    for line in lines:
        if line.startswith("config: ") and "=" in line:
            k, v = line[8:].split("=", 1)
            run.config[k] = v
        elif line.startswith(("code_sha256:", "hardware:", "versions:")):
            key, _, rest = line.partition(":")
            run.text[key] = rest.strip()
        m = re.match(rf"^step:(\d+)/\d+ train_loss:{NUM}", line)
        if m:
            run.train_curve.append((int(m[1]), float(m[2])))
        m = re.match(rf"^step:(\d+)/\d+ val_loss:{NUM} val_bpb:{NUM}", line)
        if m:
            run.val_curve.append((int(m[1]), float(m[3])))
        for key, pat in PATTERNS.items():
            m = re.match(pat, line)
            if m:
                if key in ("bytes_code", "bytes_model", "bytes_total", "model_params"):
                    run.values[key] = int(m[1])
                elif key.endswith("_loss"):
                    run.values[key] = float(m[1])
                    run.values[key.replace("_loss", "_bpb")] = float(m[2])
                elif key == "train_plus_cal_s":
                    run.values[key] = float(m[2])
                else:
                    run.values[key] = float(m[1])
    missing = [k for k in REQUIRED if k not in run.values] + [k for k in ("code_sha256",) if k not in run.text]
    run.text["errors"] = "\n".join(l for l in lines if l.startswith("ERROR:") or " valid:0" in l)
    if missing or "SEED" not in run.config:
        raise RecordError(f"{path} is incomplete (missing {', '.join(missing) or 'config'}): the run did not "
                          "finish; re-run that seed")
    return run


def check_runs(runs: list[SeedRun], size_cap: int, train_budget: float, eval_budget: float) -> None:
    for r in runs:
        if r.text.get("errors"):
            raise RecordError(f"{r.path} reports an invalid run: {r.text['errors'].splitlines()[0][:200]}")
        if r.config.get("VAL_TOKEN_LIMIT", "0") not in ("0", ""):
            raise RecordError(f"{r.path} scored only VAL_TOKEN_LIMIT={r.config['VAL_TOKEN_LIMIT']} val tokens (a smoke "
                              "test, and the split's fingerprint check was skipped): re-run with VAL_TOKEN_LIMIT=0")
        if r.config.get("SKIP_TRAIN") in ("1", "True", "true"):
            raise RecordError(f"{r.path} is a SKIP_TRAIN re-pack: its training time is not in the log; submit the "
                              "log of the run that trained")
        if r.values["bytes_total"] > size_cap:
            raise RecordError(f"{r.path}: {int(r.values['bytes_total'])} bytes > cap {size_cap}")
        if r.values["train_plus_cal_s"] > train_budget:
            raise RecordError(f"{r.path}: training + calibration took {r.values['train_plus_cal_s']:.1f}s > {train_budget:.0f}s")
        if r.values["eval_total_s"] > eval_budget:
            raise RecordError(f"{r.path}: evaluation took {r.values['eval_total_s']:.1f}s > {eval_budget:.0f}s")
    modes = {r.path.name: r.score_key for r in runs}
    if len(set(modes.values())) > 1:
        raise RecordError(f"the logs were scored by different final evaluations {modes} (a plan cut by the "
                          "evaluation budget?): every seed must end with the same one")
    seeds = [r.seed for r in runs]
    if len(set(seeds)) != len(seeds):
        raise RecordError(f"duplicate seeds {seeds}: each log must be a different seed")
    base = runs[0]
    for r in runs[1:]:
        diff = sorted(k for k in (set(base.config) | set(r.config)) - PER_RUN_KEYS
                      if base.config.get(k) != r.config.get(k))
        if diff:
            raise RecordError(f"{r.path} and {base.path} disagree on configuration: " + ", ".join(
                f"{k}={base.config.get(k)} vs {r.config.get(k)}" for k in diff))
        if r.text["code_sha256"] != base.text["code_sha256"]:
            raise RecordError(f"{r.path} and {base.path} ran different code (code_sha256 differs)")


# --- statistics -------------------------------------------------------------------------------


def mean_std(xs: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value: no spread can be estimated from it)."""
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return m, s


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1 + aa * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1 - math.exp(lbeta) * _betacf(b, a, 1 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t > 0 else 1 - tail


def welch_one_sided(new: list[float], prev: list[float], margin: float) -> dict:
    """H1: mean(new) < mean(prev) - margin (lower loss is better)."""
    if len(new) < 2 or len(prev) < 2:
        raise RecordError("the significance test needs at least 2 seeds on each side")
    (m1, s1), (m2, s2) = mean_std(new), mean_std(prev)
    v1, v2 = s1 * s1 / len(new), s2 * s2 / len(prev)
    se = math.sqrt(v1 + v2)
    t = (m2 - margin - m1) / se
    df = (v1 + v2) ** 2 / (v1 * v1 / (len(new) - 1) + v2 * v2 / (len(prev) - 1))
    p = t_sf(t, df)
    return {"t": t, "df": df, "p_value": p, "margin_nats": margin, "prev_mean_val_loss": m2,
            "improvement_nats": m2 - m1, "significant_p_lt_0_01": p < 0.01}


# --- outputs ------------------------------------------------------------------------------------


def plot(runs: list[SeedRun], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        if r.train_curve:
            a.plot(*zip(*r.train_curve), label=f"seed {r.seed}", lw=1)
        if r.val_curve:
            b.plot(*zip(*r.val_curve), marker="o", label=f"seed {r.seed}")
        b.scatter([r.val_curve[-1][0] if r.val_curve else 0], [r.values[f"{r.score_key}_bpb"]], marker="*", s=120,
                  label=f"seed {r.seed} final ({r.score_key})")
    a.set(xlabel="step", ylabel="train loss (nats/token)", title="training loss")
    b.set(xlabel="step", ylabel="val bpb", title="validation bits per byte")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def readme(name: str, runs: list[SeedRun], sub: dict) -> str:
    rows = ["| seed | steps | train+cal (s) | eval (s) | roundtrip bpb | sliding bpb | TTT bpb | val_loss | bytes_total |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        v = r.values
        steps = r.val_curve[-1][0] if r.val_curve else 0
        ttt = f"{v['ttt_bpb']:.5f}" if "ttt_bpb" in v else "-"
        sliding = f"{v['sliding_bpb']:.5f}" if "sliding_bpb" in v else "-"
        rows.append(f"| {r.seed} | {steps} | {v['train_plus_cal_s']:.1f} | {v['eval_total_s']:.1f} | "
                    f"{v['roundtrip_bpb']:.5f} | {sliding} | {ttt} | {v[f'{r.score_key}_loss']:.5f} | "
                    f"{int(v['bytes_total'])} |")
    sig = sub.get("significance")
    sig_text = (f"One-sided Welch t-test against the previous record (mean val_loss {sig['prev_mean_val_loss']:.5f}) "
                f"with a {sig['margin_nats']} nat margin: t = {sig['t']:.3f}, df = {sig['df']:.1f}, "
                f"p = {sig['p_value']:.2e} ({'significant' if sig['significant_p_lt_0_01'] else 'NOT significant'} at p < 0.01)."
                if sig else "No previous record given: no significance claim.")
    cfg = runs[0].config
    return "\n".join([
        f"# {name}", "",
        f"Flat + crawler GPT, {cfg.get('NUM_FLAT_LAYERS')} flat blocks + {cfg.get('NUM_CRAWLER_LAYERS')} crawler "
        f"x {cfg.get('CRAWLER_LOOPS')} loops, dim {cfg.get('MODEL_DIM')}, vocab {cfg.get('VOCAB_SIZE')}"
        f"{' (CaseOps)' if cfg.get('CASEOPS_ENABLED') == 'True' else ''}; loop-aware GPTQ int6 + {cfg.get('COMPRESSOR')}.", "",
        f"**val_bpb {sub['val_bpb']:.5f}** (mean of {len(runs)} seeds, std "
        f"{'n/a (one seed)' if sub['val_bpb_std'] is None else format(sub['val_bpb_std'], '.5f')}), "
        f"val_loss {sub['val_loss']:.5f} nats; largest artifact {sub['compliance']['max_bytes_total']} bytes.", "",
        *rows, "", sig_text, "", "![training curves](train_curves.png)", "",
        "## Reproduce", "", "```bash",
        *[f"SEED={r.seed} bash run.sh" for r in runs], "```", "",
        "with the environment recorded in each `train_seed<SEED>.env` beside the logs (when run through run.sh).", "",
        f"Hardware: {runs[0].text.get('hardware', '?')}. Versions: {runs[0].text.get('versions', '?')}.",
        f"Counted code: `train_gpt.py` in this folder is the self-extracting wrapper whose size the logs report "
        f"({int(runs[0].values['bytes_code'])} bytes, sha256 {runs[0].text['code_sha256'][:16]}...).", ""])


def build_record(logs: list[Path], name: str, author: str, github_id: str, out_root: Path,
                 prev_losses: list[float] | None = None, margin: float = 0.005, size_cap: int = 16_000_000,
                 train_budget: float = 600.0, eval_budget: float = 600.0, date: str | None = None) -> Path:
    runs = sorted((parse_log(p) for p in logs), key=lambda r: r.seed)
    check_runs(runs, size_cap, train_budget, eval_budget)
    code = Path(runs[0].config["OUTPUT_DIR"]) / "train_gpt.counted.py"
    if not code.is_file():
        raise RecordError(f"{code} (the counted code of the runs) is missing")
    blob = code.read_bytes()
    if hashlib.sha256(blob).hexdigest() != runs[0].text["code_sha256"] or len(blob) != runs[0].values["bytes_code"]:
        raise RecordError(f"{code} is not the code the logs measured (size or sha256 differs)")
    date = date or dt.date.today().isoformat()
    folder = out_root / "track_10min_16mb" / f"{date}_{name}"
    if folder.exists():
        raise RecordError(f"{folder} exists: a record folder is built once, whole, from its logs; move it away or "
                          "choose another --name or --date")
    build = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")  # renamed into place once every file is written
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    try:
        write_record_files(build, runs, blob, name, author, github_id, date, prev_losses, margin, size_cap)
        os.replace(build, folder)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return folder


def write_record_files(folder: Path, runs: list[SeedRun], blob: bytes, name: str, author: str, github_id: str,
                       date: str, prev_losses: list[float] | None, margin: float, size_cap: int) -> None:
    (folder / "train_gpt.py").write_bytes(blob)
    for r in runs:
        shutil.copyfile(r.path, folder / f"train_seed{r.seed}.log")
    extras = [ROOT / "requirements.txt"]
    if runs[0].config.get("CASEOPS_ENABLED") == "True":
        extras.append(ROOT / "lossless_caps.py")
    tok = Path(runs[0].config.get("TOKENIZER_PATH", ""))
    if tok.is_file():
        extras.append(tok)
    for f in extras:
        shutil.copyfile(f, folder / f.name)
    key = runs[0].score_key
    losses = [r.values[f"{key}_loss"] for r in runs]
    bpbs = [r.values[f"{key}_bpb"] for r in runs]
    (ml, sl), (mb, sb) = mean_std(losses), mean_std(bpbs)
    sub = {
        "author": author, "github_id": github_id, "name": name, "date": date,
        "val_bpb": mb, "val_loss": ml, "val_bpb_std": sb, "val_loss_std": sl, "score": key,
        "bytes_total": int(max(r.values["bytes_total"] for r in runs)), "bytes_code": int(runs[0].values["bytes_code"]),
        "seeds": [r.seed for r in runs],
        "per_seed": {str(r.seed): {k: r.values[k] for k in sorted(r.values)} for r in runs},
        "hardware": runs[0].text.get("hardware"), "versions": runs[0].text.get("versions"),
        "compliance": {"max_bytes_total": int(max(r.values["bytes_total"] for r in runs)), "cap_bytes": size_cap,
                       "max_train_plus_calibration_s": max(r.values["train_plus_cal_s"] for r in runs),
                       "max_eval_s": max(r.values["eval_total_s"] for r in runs)},
    }
    if prev_losses:
        sub["significance"] = welch_one_sided(losses, prev_losses, margin)
    (folder / "submission.json").write_text(json.dumps(sub, indent=1, allow_nan=False))
    plot(runs, folder / "train_curves.png")
    (folder / "README.md").write_text(readme(name, runs, sub))
    for f in folder.iterdir():  # on disk before the folder is renamed into place
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", nargs="+", required=True, type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("--author", required=True)
    ap.add_argument("--github-id", required=True)
    ap.add_argument("--out-root", type=Path, default=ROOT / "records")
    ap.add_argument("--prev-losses", help="comma list of the previous record's per-seed val_loss (nats)")
    ap.add_argument("--prev-record", type=Path, help="the previous record's submission.json (per_seed val_loss)")
    ap.add_argument("--margin", type=float, default=0.005)
    ap.add_argument("--size-cap", type=int, default=16_000_000)
    ap.add_argument("--train-budget", type=float, default=600.0)
    ap.add_argument("--eval-budget", type=float, default=600.0)
    ap.add_argument("--date")
    a = ap.parse_args(argv)
    prev = [float(x) for x in a.prev_losses.split(",")] if a.prev_losses else None
    if a.prev_record:
        p = json.loads(a.prev_record.read_text())
        prev = [v[f"{p.get('score', 'sliding')}_loss"] for v in p["per_seed"].values()]
    try:
        folder = build_record(a.log, a.name, a.author, a.github_id, a.out_root, prev, a.margin, a.size_cap,
                              a.train_budget, a.eval_budget, a.date)
    except RecordError as e:
        print(f"record refused: {e}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
