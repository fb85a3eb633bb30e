"""Gathers experiments/run_compression.sh runs into tables and Pareto plots.

  python experiments/collect_compression.py [--root workdirs/compression] [--out experiments/results]

Writes compression.{md,csv}: a row per (task, method) with the command that reproduces it (the
run's config as overrides of its config file) and the git commit; pareto_<task>.png: dev metric
against size_mb for every method; the ablation table of SST-2 inside compression.md. Rows already
in compression.csv whose run is not under --root are kept, so the table grows across machines
and sessions (workdirs are not committed, the CSV is).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from mpqbert import defaults  # noqa: E402
from mpqbert.methods import report  # noqa: E402

METHOD_ORDER = ["full precision", "uniform8", "uniform4", "uniform2", "hessian8", "automp8",
                "hessian16", "automp16", "automp20", "automp30"]
# AQ-BERT on DistilBERT (Zhao et al. 2021, Table 3, SST-2 dev accuracy at encoder-weight sizes),
# the published points MiniLM's smallest AutoMPQ models are compared with.
DISTILBERT_AQBERT = [(15.0, 0.912), (12.5, 0.907), (10.0, 0.897)]
SMALLEST = ("automp16", "automp20", "automp30")
ABLATIONS = {"automp16": "12 groups, {0,2,4,8}, Adam", "ablation_groups1": "1 group",
             "ablation_groups128": "128 groups", "ablation_bits024": "bit choices {0,2,4}",
             "ablation_sgd": "SGD lr 0.1 on the logits"}


def flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def command(config: dict, workdir: Path) -> str:
  """`python -m mpqbert.main` with the overrides that turn the config file into this run."""
  method = config["method"]
  base = (defaults.sensimix_config() if method == "sensimix" else
          defaults.compression_config(method))
  if method in ("automp", "hessian"):
    base.search.target_compression = 16.0
  want, have = flatten(config), flatten(base.to_dict())
  fmt = lambda v: f'"({",".join(map(str, v))})"' if isinstance(v, (list, tuple)) else v
  flags = [f"--config.{k}={fmt(v)}" for k, v in sorted(want.items()) if have.get(k) != v
           and not (isinstance(v, list) and tuple(v) == tuple(have.get(k) or ()))]
  return " ".join([f"python -m mpqbert.main --config=configs/{method}.py",
                   f"--workdir={workdir}", *flags])


def load_rows(root: Path) -> list[dict]:
  rows = []
  for path in sorted(root.glob("*/*/results.json")):
    result = json.loads(path.read_text())
    run = path.parent.name
    base = {"task": result["task"], "metric": result["metric"],
            "git_commit": result["git_commit"][:10]}
    rows.append({**base, "run": run, "size_mb": result["size_mb"],
                 "compression": result["compression"], "avg_bits": result["avg_bits"],
                 "dev": result["dev"], "pruned_groups": result.get("policy", {}).get(
                     "pruned_groups", 0), "wall_time_s": result["wall_time_s"],
                 "command": command(result["config"], path.parent.relative_to(REPO)
                                    if path.is_relative_to(REPO) else path.parent)})
    if not any(r["task"] == result["task"] and r["run"] == "full precision" for r in rows):
      fp = result["rows"][0]
      rows.append({**base, "run": "full precision", **{k: fp[k] for k in (
          "size_mb", "compression", "avg_bits", "dev")}, "pruned_groups": 0, "wall_time_s": 0.0,
                   "command": f"experiments/run_finetune_fp.sh (teacher, evaluated by {run})"})
  return rows


NUMERIC = {"dev": float, "size_mb": float, "compression": float, "avg_bits": float,
           "pruned_groups": int, "wall_time_s": float}


def merge_committed(rows: list[dict], csv_path: Path, numeric: dict = NUMERIC) -> list[dict]:
  """`rows` plus the rows of an earlier CSV table that `rows` does not redo (`numeric`: the
  columns to read back as numbers, with their types)."""
  if not csv_path.is_file():
    return rows
  fresh = {(r["task"], r["run"]) for r in rows}
  with csv_path.open(newline="") as f:
    kept = [{k: numeric.get(k, str)(v) for k, v in r.items()} for r in csv.DictReader(f)
            if (r["task"], r["run"]) not in fresh]
  return rows + kept


def write_pareto(rows: list[dict], task: str, out: Path) -> None:
  report.pareto_figure(rows, task, title=f"MiniLM on {task}: size vs accuracy").savefig(
      out / f"pareto_{task}.png", dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", type=Path, default=REPO / "workdirs" / "compression")
  parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results")
  args = parser.parse_args()
  rows = merge_committed(load_rows(args.root), args.out / "compression.csv")
  if not rows:
    sys.exit(f"no results.json under {args.root}/<task>/<run>/; run experiments/run_compression.sh")
  args.out.mkdir(parents=True, exist_ok=True)
  order = lambda r: (r["task"], METHOD_ORDER.index(r["run"]) if r["run"] in METHOD_ORDER else 99,
                     r["run"])
  rows.sort(key=order)
  fields = ["task", "run", "metric", "dev", "size_mb", "compression", "avg_bits",
            "pruned_groups", "wall_time_s", "git_commit", "command"]
  with (args.out / "compression.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows({k: r[k] for k in fields} for r in rows)
  main_rows = [r for r in rows if not r["run"].startswith("ablation")]
  lines = ["# MiniLM: size / accuracy of every method", "",
           "Produced by `bash experiments/run_compression.sh` then "
           "`python experiments/collect_compression.py`. size_mb, compression and avg_bits "
           "count the encoder's 36 weight matrices (scales included), as AQ-BERT does.", "",
           "| task | method | dev | size_mb | compression | avg_bits | pruned groups | "
           "wall s | commit |", "|---|---|---|---|---|---|---|---|---|"]
  for r in main_rows:
    lines.append(f"| {r['task']} | {r['run']} | {r['metric']} {r['dev']:.4f} | "
                 f"{r['size_mb']:.3f} | {r['compression']:.2f}x | {r['avg_bits']:.3f} | "
                 f"{r['pruned_groups']} | {r['wall_time_s']:.0f} | {r['git_commit']} |")
  ablation = [r for r in rows if r["task"] == "sst2" and r["run"] in ABLATIONS]
  if len(ablation) > 1:
    lines += ["", "## Ablation (SST-2, AutoMPQ at 16x)", "",
              "| setting | dev | size_mb | avg_bits | pruned groups |", "|---|---|---|---|---|"]
    for r in sorted(ablation, key=lambda r: list(ABLATIONS).index(r["run"])):
      lines.append(f"| {ABLATIONS[r['run']]} | {r['dev']:.4f} | {r['size_mb']:.3f} | "
                   f"{r['avg_bits']:.3f} | {r['pruned_groups']} |")
  smallest = [r for r in rows if r["task"] in ("sst2", "mrpc") and r["run"] in SMALLEST]
  if any(r["run"] != "automp16" for r in smallest):
    full = {r["task"]: r["dev"] for r in rows if r["run"] == "full precision"}
    lines += ["", "## Smallest models: MiniLM + AutoMPQ against DistilBERT + AQ-BERT", "",
              "MiniLM is itself distilled (from a larger teacher), as DistilBERT is; AQ-BERT's "
              "Table 3 quantizes DistilBERT. Sizes are encoder weight matrices in both.", "",
              "| model | task | size_mb | compression | dev | drop vs full precision |",
              "|---|---|---|---|---|---|"]
    for r in sorted(smallest, key=lambda r: (r["task"], SMALLEST.index(r["run"]))):
      lines.append(f"| MiniLM + AutoMPQ {r['run'][6:]}x | {r['task']} | {r['size_mb']:.3f} | "
                   f"{r['compression']:.1f}x | {r['metric']} {r['dev']:.4f} | "
                   f"{100 * (full[r['task']] - r['dev']):.1f} points |")
    for size, acc in DISTILBERT_AQBERT:
      lines.append(f"| DistilBERT + AQ-BERT (published) | sst2 | {size:.1f} | | accuracy "
                   f"{acc:.3f} | |")
  lines += ["", "## Commands", ""] + [f"- {r['task']} {r['run']}: `{r['command']}`"
                                     for r in rows]
  (args.out / "compression.md").write_text("\n".join(lines) + "\n")
  for task in sorted({r["task"] for r in rows}):
    write_pareto(rows, task, args.out)
  print("\n".join(lines[:len(main_rows) + 6]))


if __name__ == "__main__":
  main()
