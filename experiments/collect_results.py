r"""Gathers the `results.json` of finished runs into CSV + Markdown tables.

  python experiments/collect_results.py --runs=workdirs/finetune_fp --name=finetune_fp

Writes experiments/results/<name>.{csv,md}; each row carries the command that produced it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from absl import app, flags

_RUNS = flags.DEFINE_string("runs", "workdirs/finetune_fp", "Folder whose subfolders are workdirs.")
_NAME = flags.DEFINE_string("name", "finetune_fp", "Output file stem under experiments/results/.")

# Config keys that tell runs of one sweep apart, shown in the reproduction command.
_COMMAND_KEYS = ("task", "train.num_epochs", "train.eval_every_steps", "data.train_subset")


def command(result: dict, workdir: Path) -> str:
  config = result["config"]
  get = lambda dotted: __import__("functools").reduce(lambda d, k: d[k], dotted.split("."), config)
  overrides = " ".join(f"--config.{k}={get(k)}" for k in _COMMAND_KEYS)
  return (f"python -m mpqbert.main --config=configs/{result['method']}.py {overrides} "
          f"--config.data.glue_dir=../shared/data/glue --workdir={workdir}")


def rows(runs: Path) -> list[dict]:
  out = []
  for path in sorted(runs.glob("*/results.json")):
    result = json.loads(path.read_text())
    dev = result["dev_metrics"][next(iter(result["dev_metrics"]))]
    out.append({
        "task": result["task"], "method": result["method"], "model": result["model"],
        "metric": result["metric"], "dev": round(result["dev"], 4),
        "all_dev_metrics": " ".join(f"{k}={v:.4f}" for k, v in dev.items() if k != "loss"),
        "size_mb": round(result["size_mb"], 2), "compression": result["compression"],
        "avg_bits": result["avg_bits"], "train_examples": result["train_examples"],
        "steps": result["steps"], "wall_time_s": round(result["wall_time_s"]),
        "git_commit": result["git_commit"][:10], "command": command(result, path.parent)})
  return out


def main(argv):
  del argv
  table = rows(Path(_RUNS.value))
  if not table:
    raise SystemExit(f"no */results.json under {_RUNS.value}; run the experiments first.")
  out = Path(__file__).parent / "results" / _NAME.value
  out.parent.mkdir(parents=True, exist_ok=True)
  with out.with_suffix(".csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
  shown = ("task", "metric", "dev", "all_dev_metrics", "size_mb", "train_examples", "steps",
           "wall_time_s", "git_commit")
  lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
  lines += ["| " + " | ".join(str(r[k]) for k in shown) + " |" for r in table]
  lines += ["", "Commands:", ""] + [f"- {r['task']}: `{r['command']}`" for r in table]
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
