"""Gathers experiments/run_sensimix.sh runs into the SensiMix tables.

  python experiments/collect_sensimix.py [--root workdirs/sensimix] [--out experiments/results]

Writes sensimix.{md,csv}: per task the full-precision teacher and SensiMix 3 + 3 (dev metric,
encoder-matrix size, total size with embeddings, compression of each against float32, agreement
of the packed model with the fake-quantized one), the Table 4 ablation and the split / 1-bit
variants on SST-2 and MRPC, and each row's command and commit. Rows already in sensimix.csv
whose run is not under --root are kept.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from collect_compression import command, merge_committed

REPO = Path(__file__).resolve().parents[1]
RUNS = {"sensimix": "SensiMix 3+3 (ABWR, PT, ILF)", "no_abwr": "without ABWR",
        "no_pt": "without PT", "no_ilf": "without ILF",
        "auto_split": "sensitivity-chosen split, size of 3+3",
        "xnor_scale": "1-bit weights with a mean-abs scale per 12 sub-groups",
        "ffn_inputs_8bit": "1-bit FFN weights, 8-bit FFN inputs",
        "clipped_input_ste": "binarized inputs, hard-tanh STE (no gradient outside [-1, 1])",
        "double_steps": "SensiMix 3+3 (ABWR, PT, ILF), twice the steps"}
FIELDS = ["task", "run", "metric", "dev", "accuracy", "stage_dev", "size_mb", "compression",
          "size_mb_total", "compression_total", "binary_layers", "layer_sensitivity", "agreement",
          "steps", "wall_time_s", "git_commit", "command"]
NUMERIC = {"dev": float, "accuracy": lambda v: float(v) if v else "", "size_mb": float, "compression": float, "size_mb_total": float,
           "compression_total": float, "agreement": float, "steps": int, "wall_time_s": float}


def _accuracy(result: dict) -> float | str:
  """Dev accuracy of a classification run ("" for STS-B): on MRPC it shows what F1 hides, a
  model that predicts only the majority class (F1 0.812, accuracy 0.684)."""
  return result["dev_metrics"]["validation"].get("accuracy", "")


def _sensitivity(split: dict) -> str:
  """"layer:loss increase" for each layer the automatic split measured ("" for a fixed split)."""
  return " ".join(f"{layer}:{value:.3f}" for layer, value in sorted(
      split.get("sensitivity", {}).items(), key=lambda item: int(item[0])))


def load_rows(root: Path) -> list[dict]:
  rows = []
  for path in sorted(root.glob("*/*/results.json")):
    r = json.loads(path.read_text())
    base = {"task": r["task"], "metric": r["metric"], "git_commit": r["git_commit"][:10]}
    workdir = path.parent.relative_to(REPO) if path.is_relative_to(REPO) else path.parent
    rows.append({**base, "run": path.parent.name, "accuracy": _accuracy(r),
                 "stage_dev": " / ".join(f"{s['dev']:.4f} ({s['steps']})" for s in r["stages"]), **{k: r[k] for k in (
        "dev", "size_mb", "compression", "size_mb_total", "compression_total", "steps",
        "wall_time_s")}, "binary_layers": " ".join(map(str, r["split"]["binary_layers"])),
        "layer_sensitivity": _sensitivity(r["split"]),
        "agreement": r["export"]["agreement"], "command": command(r["config"], workdir)})
    if not any(x["task"] == r["task"] and x["run"] == "full precision" for x in rows):
      fp = r["rows"][0]
      teacher = json.loads((path.parent / "full_precision.json").read_text())
      rows.append({**base, "run": "full precision", "dev": fp["dev"],
                   "accuracy": _accuracy(teacher), "stage_dev": "", "size_mb": fp["size_mb"],
                   "compression": 1.0, "size_mb_total": r["full_precision_total_mb"],
                   "compression_total": 1.0, "binary_layers": "", "layer_sensitivity": "",
                   "agreement": 1.0, "steps": 0, "wall_time_s": 0.0,
                   "command": f"experiments/run_finetune_fp.sh (teacher of {path.parent.name})"})
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", type=Path, default=REPO / "workdirs" / "sensimix")
  parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results")
  args = parser.parse_args()
  rows = merge_committed(load_rows(args.root), args.out / "sensimix.csv", NUMERIC)
  if not rows:
    sys.exit(f"no results.json under {args.root}/<task>/<run>/; run experiments/run_sensimix.sh")
  order = ["full precision", *RUNS]
  rows.sort(key=lambda r: (r["task"], order.index(r["run"]) if r["run"] in order else 99))
  args.out.mkdir(parents=True, exist_ok=True)
  with (args.out / "sensimix.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows({k: r[k] for k in FIELDS} for r in rows)
  lines = ["# SensiMix on MiniLM", "",
           "Produced by `bash experiments/run_sensimix.sh` then "
           "`python experiments/collect_sensimix.py`. size_mb: the encoder's 36 weight matrices; "
           "total: every parameter (8-bit word and position tables, the rest in float16); "
           "compression against float32. agreement: dev examples on which the packed model "
           "(packed 8-bit codes through `packed_matmul`, packed sign bits through "
           "`xnor_matmul`) predicts what the fake-quantized model does. "
           "dev after each stage (its steps): PT, then one more binary FFN per ILF stage; "
           "without PT the first stage already binarizes the last FFN, without ILF the stage "
           "after PT binarizes all three at once.", "",
           "| task | run | dev | accuracy | dev after each stage (steps) | size_mb | compression | "
           "total MB | total compression | binary FFN layers | agreement |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    accuracy = f"{r['accuracy']:.4f}" if r["accuracy"] != "" else ""
    lines.append(f"| {r['task']} | {RUNS.get(r['run'], r['run'])} | {r['metric']} "
                 f"{r['dev']:.4f} | {accuracy} | {r['stage_dev']} | "
                 f"{r['size_mb']:.3f} | {r['compression']:.2f}x | "
                 f"{r['size_mb_total']:.2f} | {r['compression_total']:.2f}x | "
                 f"{r['binary_layers']} | {r['agreement']:.4f} |")
  measured = [r for r in rows if r["layer_sensitivity"]]
  if measured:
    lines += ["", "## Layer sensitivity (automatic split)", "",
              "Loss increase on the search split (carved from train) when only that layer's FFN "
              "is binarized; the least sensitive layers are binarized up to the size of 3+3.", "",
              "| task | layer: loss increase | chosen binary FFN layers |", "|---|---|---|"]
    lines += [f"| {r['task']} | {r['layer_sensitivity']} | {r['binary_layers']} |"
              for r in measured]
  lines += ["", "## Commands", ""] + [f"- {r['task']} {r['run']}: `{r['command']}` "
                                     f"({r['git_commit']})" for r in rows]
  (args.out / "sensimix.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines[:len(rows) + 6]))


if __name__ == "__main__":
  main()
