r"""Issue 20's tables: AutoMPQ against uniform 2-bit at equal size (seeds, paired differences) and
the search diagnostics (old search vs new, same seed and budget).

  python experiments/collect_head_to_head.py [--root=workdirs/head_to_head] \
      [--old_search=sst2=workdirs/search_diagnostics/old_sst2]

Reads `<root>/<task>/{automp,uniform2}_seed<s>/results.json` (experiments/run_head_to_head.sh)
and writes results/head_to_head.{md,csv} (and the bit-width map of each task's AutoMPQ seed 0,
head_to_head_bit_map_<task>.png): per task and method the mean and standard deviation of
the dev metric over seeds, the exact sizes, and the paired difference AutoMPQ - uniform per seed
with its mean and 95% t-interval (n = seeds). `--old_search` adds diagnostic rows of searches
made by an older commit (its workdir), next to seed 0 of the new one: final entropy and mean top
probability of softmax(logits), expected / argmax / derived sizes, pruned groups, dev.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags

_ROOT = flags.DEFINE_string("root", "workdirs/head_to_head", "Root of the runs.")
_OLD = flags.DEFINE_list("old_search", [], "task=workdir of older-commit AutoMPQ runs.")
_OUT = flags.DEFINE_string("out", str(Path(__file__).parent / "results" / "head_to_head"),
                           "Output path without extension.")
BITS_PER_MB = 8 * 2**20
# Two-sided 95% Student t quantiles by degrees of freedom.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _command(task: str, seed: int) -> str:
  """The command that (re)makes one row: the queue script for that task and seed."""
  return f"SEEDS={seed} bash experiments/run_head_to_head.sh {task}"


def _softmax(logits: np.ndarray) -> np.ndarray:
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def search_diagnostics(workdir: Path) -> dict[str, Any]:
  """Decidedness and sizes of a finished AutoMPQ run's search, computed from its files."""
  summary = json.loads((workdir / "results.json").read_text())
  with np.load(workdir / "search" / "arch_logits.npz") as f:
    probs = [_softmax(f[k].astype(np.float64)) for k in f.files]
  entropy = np.concatenate([-(p * np.log(np.maximum(p, 1e-300))).sum(-1) for p in probs])
  top = np.concatenate([p.max(-1) for p in probs])
  info = summary["search"]
  return {"entropy": float(entropy.mean()), "mean_top_prob": float(top.mean()),
          "groups_below_half": int(np.sum(top < 0.5)),
          "expected_size_mb": info["expected_size_mb"], "argmax_size_mb": info["argmax_size_mb"],
          "derived_size_mb": summary["size_mb"], "target_mb": _target(summary),
          "pruned_groups": summary["policy"]["pruned_groups"], "dev": summary["dev"],
          "search_dev": next(iter(info["argmax_dev_metrics"].values()))[summary["metric"]],
          "commit": summary.get("git_commit", "?")[:10]}


def _target(summary: dict[str, Any]) -> float:
  band = summary["search"]["band_mb"]
  return band[1] if "derived_size_mb" in summary["search"] else 0.5 * (band[0] + band[1])


def main(argv):
  del argv
  root = Path(_ROOT.value)
  rows, lines = [], ["# AutoMPQ vs uniform 2-bit at equal size", "",
                     "Made by `bash experiments/run_head_to_head.sh` and "
                     "`python experiments/collect_head_to_head.py`. Every model starts from the "
                     "same teacher per task and gets the same 100 QAT steps with distillation "
                     "(4000 training examples at most); AutoMPQ's size target is the exact size "
                     "of the uniform 2-bit model over the same 12 sub-groups per matrix, and its "
                     "derived policy is at most that size.", ""]
  for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
    per_method: dict[str, dict[int, dict]] = {}
    for run in sorted(task_dir.glob("*_seed*")):
      if not (run / "results.json").is_file():
        continue
      method, seed = run.name.rsplit("_seed", 1)
      summary = json.loads((run / "results.json").read_text())
      per_method.setdefault(method, {})[int(seed)] = summary
      rows.append({"task": task_dir.name, "method": method, "seed": int(seed),
                   "dev": summary["dev"], "metric": summary["metric"],
                   "size_mb": summary["size_mb"], "compression": summary["compression"],
                   "avg_bits": summary["avg_bits"],
                   "pruned_groups": summary.get("policy", {}).get("pruned_groups"),
                   "commit": summary.get("git_commit"),
                   "command": _command(task_dir.name, int(seed)),
                   "workdir": str(run)})
    if not per_method:
      continue
    metric = next(iter(next(iter(per_method.values())).values()))["metric"]
    lines += [f"## {task_dir.name} ({metric})", "",
              "| method | seeds | dev mean | dev std | size_mb (max) | compression (min) |",
              "|---|---:|---:|---:|---:|---:|"]
    for method, by_seed in sorted(per_method.items()):
      devs = [s["dev"] for s in by_seed.values()]
      lines.append(f"| {method} | {len(devs)} | {statistics.mean(devs):.4f} | "
                   f"{statistics.stdev(devs) if len(devs) > 1 else float('nan'):.4f} | "
                   f"{max(s['size_mb'] for s in by_seed.values()):.4f} | "
                   f"{min(s['compression'] for s in by_seed.values()):.2f}x |")
    if {"automp", "uniform2"} <= set(per_method):
      seeds = sorted(set(per_method["automp"]) & set(per_method["uniform2"]))
      diffs = [per_method["automp"][s]["dev"] - per_method["uniform2"][s]["dev"] for s in seeds]
      paired = ("Paired difference AutoMPQ - uniform 2-bit per seed: " +
                ", ".join(f"seed {s}: {d:+.4f}" for s, d in zip(seeds, diffs)))
      if len(diffs) > 1:
        mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
        half = T95[len(diffs) - 1] * sd / math.sqrt(len(diffs))
        paired += (f"; mean {mean:+.4f}, 95% t-interval [{mean - half:+.4f}, "
                   f"{mean + half:+.4f}] (n = {len(diffs)} seeds).")
      lines += ["", paired]
    bit_map = task_dir / "automp_seed0" / "bit_map.png"
    if bit_map.is_file():  # Where the searched bits went (layers x matrices x sub-groups).
      target = Path(_OUT.value).parent / f"head_to_head_bit_map_{task_dir.name}.png"
      target.write_bytes(bit_map.read_bytes())
      lines += ["", f"Bit-width map of AutoMPQ seed 0: `{target.name}`."]
    lines.append("")
  old = dict(item.split("=", 1) for item in _OLD.value)
  if old:
    lines += ["## Search diagnostics (16x, seed 0, the quickstart's budget)", "",
              "| task | search | commit | entropy (nats) | mean top prob | groups top < 0.5 | "
              "expected MB | argmax MB | derived MB | target MB | pruned groups | "
              "argmax policy dev after search | dev after retrain |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for task, workdir in sorted(old.items()):
      for label, path in (("old", Path(workdir)), ("new", root / task / "automp_seed0")):
        if not (path / "results.json").is_file():
          continue
        d = search_diagnostics(path)
        lines.append(f"| {task} | {label} | {d['commit']} | {d['entropy']:.3f} | "
                     f"{d['mean_top_prob']:.3f} | {d['groups_below_half']} | "
                     f"{d['expected_size_mb']:.4f} | {d['argmax_size_mb']:.4f} | "
                     f"{d['derived_size_mb']:.4f} | {d['target_mb']:.4f} | "
                     f"{d['pruned_groups']} | {d['search_dev']:.4f} | {d['dev']:.4f} |")
    lines.append("")
  out = Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  if rows:
    with out.with_suffix(".csv").open("w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
