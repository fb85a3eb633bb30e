r"""The study's tables and plots from the runs of `experiments/run_study.sh`.

  python experiments/collect_study.py [--root=workdirs/study] [--bootstrap=2000]

First archives every finished run of `<root>/<task>/<run>_seed<s>/`: its results.json,
policy.json and final dev predictions (`retrain/dev_predictions.npz`, SensiMix's in its last
`stage<k>/`), about 25 KB a run, go to results/study_runs/<task>/<run>_seed<s>/ (each teacher's
results.json to <task>/teacher/), which is committed. The tables are made from that archive, so
they survive the loss of the workdirs (a machine that goes away with weeks of runs) and a later
session's runs add to them. Then it writes results/study.{md,csv}, the Pareto plot of each task
(dev metric against size, mean and standard deviation over seeds: study_pareto_<task>.png) and
the bit-width map of the best mixed-precision policy per task at 16x (study_bit_map_<task>.png).
For each task and size column: every method's mean and standard deviation over seeds, its exact
size, and its paired difference to the column's uniform model (same seeds): the mean over seeds,
with a 95% percentile interval of a bootstrap that resamples seeds and dev examples together;
under each table, AutoMPQ's paired difference to every other method of the column, the same way.
Then whether the study's aims are met, as far as run: an aim is decided before all of its
seeds have run only when no score of the missing seeds could change it.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags

from mpqbert import data, files
from mpqbert.methods.report import pareto_figure, plot_bit_map
from mpqbert.quant import Policy

_ROOT = flags.DEFINE_string("root", "workdirs/study", "Root of the study's runs.")
_OUT = flags.DEFINE_string("out", str(Path(__file__).parent / "results" / "study"),
                           "Output path without extension.")
_ARCHIVE = flags.DEFINE_string("archive", str(Path(__file__).parent / "results" / "study_runs"),
                               "Where each finished run's small files are kept; the tables are "
                               "made from it.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 2000, "Bootstrap resamples per paired interval.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds a row needs before an aim is judged on it.")

MIXED = ("automp", "hawq", "qbert")
SENSIMIX = ("sensimix", "sensimix_no_abwr", "sensimix_no_pt", "sensimix_no_ilf", "automp")
# Column -> its uniform rows (bits, and how their size compares with the column's target; the
# paired differences are to the first) and its methods.
COLUMNS: dict[Any, tuple] = {8: (((4, "equal"),), MIXED), 12: (((3, "larger"),), MIXED),
                             16: (((2, "equal"),), MIXED), 24: (((2, "larger"),), MIXED),
                             "smx": (((4, "smaller"), (8, "larger")), SENSIMIX)}
TASKS = ("sst2", "mrpc", "stsb", "cola")
NOT_RUN = {("qbert", 16): "= uniform 2-bit ({2,3,4,8}, no pruning: the only policy at this size)",
           ("qbert", 24): "cannot reach 24x (2 bits at least)"}


def run_name(method: str, column: Any) -> str:
  """The run directory's prefix: SensiMix runs have one size, the others one per column."""
  return method if method.startswith("sensimix") else f"{method}{column}"


def _command(task: str, column: Any, method: str, seed: int) -> str:
  method = method.split("_")[0]  # The ablations are runs of the sensimix method.
  return (f"CELLS={task}:{column} SEEDS={seed} METHODS={method} "
          "bash experiments/run_study.sh")


def archive_runs(root: Path, archive: Path) -> int:
  """Copies each finished run's results.json (with its workdir), policy.json and final dev
  predictions, and each teacher's results.json, from `root` to `archive`; returns how many runs
  it copied (teachers not counted)."""
  teachers = [t for t in sorted(root.glob("*/teacher/results.json"))
              if t.parent.parent.name in TASKS]
  archived = {t: archive / t.parent.parent.name / "teacher" / "results.json" for t in teachers}
  for results in teachers:  # Checked first: a refusal leaves the archive as it was.
    _check_same_teacher(results, archived[results])
  for results in teachers:  # The first teacher archived stays the task's reference.
    if not archived[results].is_file():
      files.write_atomic(archived[results], results.read_bytes())
  copied = 0
  for results in sorted(root.glob("*/*_seed*/results.json")):
    run = results.parent
    if run.parent.name not in TASKS:
      continue
    target = archive / run.parent.name / run.name
    # A run copied back from the archive (to mark it done for run_study.sh) keeps its workdir.
    summary = {"workdir": str(run), **json.loads(results.read_text())}
    files.write_atomic(target / "results.json", json.dumps(summary, indent=1) + "\n")
    for source, name in ((run / "policy.json", "policy.json"),
                         (_final_predictions(run), "dev_predictions.npz")):
      if source is not None and source.is_file():
        files.write_atomic(target / name, source.read_bytes())
    copied += 1
  return copied


# A retrain of a teacher with the same command and commit on another CPU model (AMD against
# Intel: other matmul kernels) is the same teacher up to rounding: the study's SST-2 teacher
# retrained at 481bbdf on an AMD EPYC has its Intel Xeon original's dev accuracy and a dev loss
# 7e-8 away. Another commit, budget or device moves the dev metrics by far more (a single SST-2
# example is 1.1e-3).
TEACHER_ROUNDING = 1e-5


def _teacher_identity(results: dict[str, Any]) -> dict[str, Any]:
  """What tells two teachers apart: their dev results."""
  return {key: results.get(key) for key in ("dev", "dev_metrics", "loss")}


def teacher_difference(new: Any, old: Any) -> float:
  """The largest absolute difference between two teachers' dev results (nested dicts of
  numbers); infinite where their structure or a non-number differs."""
  if isinstance(new, dict) and isinstance(old, dict):
    if new.keys() != old.keys():
      return float("inf")
    return max((teacher_difference(new[k], old[k]) for k in new), default=0.0)
  numbers = (int, float)
  if isinstance(new, numbers) and isinstance(old, numbers) and not isinstance(new, bool):
    return abs(float(new) - float(old))
  return 0.0 if new == old else float("inf")


def _check_same_teacher(source: Path, archived: Path) -> None:
  """Refuses to archive a task's runs next to another teacher's: their rows would not be pairs.
  A retrain that matches the archived teacher up to rounding (`TEACHER_ROUNDING`) is accepted,
  and said."""
  if not archived.is_file():
    return
  new, old = (_teacher_identity(json.loads(p.read_text())) for p in (source, archived))
  difference = teacher_difference(new, old)
  task = archived.parent.parent
  if difference > TEACHER_ROUNDING:
    raise SystemExit(
        f"{source} is not the teacher of the runs archived in {task} ({new} against {old}): "
        f"their rows would not pair. Collect this task when its column from this teacher is "
        f"complete, after moving the archived runs out (git rm -r {task}), or collect from a root "
        f"without it.")
  if difference:
    print(f"{source} matches the teacher archived in {task} up to rounding (dev results at most "
          f"{difference:.1e} apart: a retrain on another CPU); the archived one is kept")


def _final_predictions(workdir: Path) -> Path | None:
  """The final model's dev predictions in a workdir: the retrain's, or SensiMix's last stage's."""
  stages = sorted(workdir.glob("stage*/dev_predictions.npz"),
                  key=lambda path: int(path.parent.name.removeprefix("stage")))
  paths = [workdir / "retrain" / "dev_predictions.npz"] + stages[-1:]
  return next((path for path in paths if path.is_file()), None)


def load_runs(task_dir: Path) -> dict[str, dict[int, dict[str, Any]]]:
  """`{run name: {seed: results.json plus "archived" (its folder)}}` of a task's archived runs."""
  runs: dict[str, dict[int, dict[str, Any]]] = {}
  for run in sorted(task_dir.glob("*_seed*")):
    if (run / "results.json").is_file():
      name, seed = run.name.rsplit("_seed", 1)
      summary = json.loads((run / "results.json").read_text())
      runs.setdefault(name, {})[int(seed)] = {**summary, "archived": run}
  return runs


def _predictions(run: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
  """The final model's dev predictions and labels, or None where they were not kept."""
  path = Path(run["archived"]) / "dev_predictions.npz"
  if not path.is_file():
    return None
  with np.load(path) as f:
    return f["predictions"], f["labels"]


def paired_bootstrap(task: str, metric: str, method: dict[int, dict], reference: dict[int, dict],
                     resamples: int, seed: int = 0) -> dict[str, Any] | None:
  """Mean over common seeds of metric(method) - metric(reference), and a 95% percentile interval
  from resampling the seeds and the dev examples (the same examples for both models); the mean
  alone (interval None) where a run's predictions were not kept."""
  seeds = sorted(set(method) & set(reference))
  if not seeds:
    return None
  pairs = [(_predictions(method[s]), _predictions(reference[s])) for s in seeds]
  if any(a is None or b is None for a, b in pairs):
    diffs = [method[s]["dev"] - reference[s]["dev"] for s in seeds]
    return {"seeds": seeds, "per_seed": diffs, "mean": float(np.mean(diffs)), "low": None,
            "high": None}
  labels = pairs[0][0][1]
  score = lambda p, idx: data.glue_metrics(task, p[idx], labels[idx])[metric]
  every = np.arange(len(labels))
  diffs = [score(a[0], every) - score(b[0], every) for a, b in pairs]
  rng = np.random.default_rng(seed)
  samples = []
  for _ in range(resamples):
    chosen = rng.integers(0, len(seeds), len(seeds))
    idx = rng.integers(0, len(labels), len(labels))
    samples.append(np.mean([score(pairs[c][0][0], idx) - score(pairs[c][1][0], idx)
                            for c in chosen]))
  low, high = np.percentile(samples, [2.5, 97.5])
  return {"seeds": seeds, "per_seed": diffs, "mean": float(np.mean(diffs)), "low": float(low),
          "high": float(high)}


def _delta(paired: dict[str, Any] | None) -> str:
  """A paired difference in points: mean [95% interval] (n seeds), or '' when it has none."""
  if paired is None:
    return ""
  if paired["low"] is None:
    return f"{100 * paired['mean']:+.2f} (n={len(paired['seeds'])}) †"
  return (f"{100 * paired['mean']:+.2f} [{100 * paired['low']:+.2f}, "
          f"{100 * paired['high']:+.2f}] (n={len(paired['seeds'])})")


def _stats(by_seed: dict[int, dict]) -> dict[str, Any]:
  devs = [r["dev"] for r in by_seed.values()]
  return {"n": len(devs), "devs": devs, "mean": statistics.mean(devs),
          "std": statistics.stdev(devs) if len(devs) > 1 else float("nan"),
          "size_mb": max(r["size_mb"] for r in by_seed.values()),
          "compression": min(r["compression"] for r in by_seed.values()),
          "commits": sorted({r.get("git_commit", "?")[:10] for r in by_seed.values()})}


def _mean_bounds(stats: dict[str, Any] | None, metric: str) -> tuple[float, float]:
  """The lowest and the highest mean over `--seeds` seeds that the seeds not run yet still allow,
  each anywhere in the metric's range ([-1, 1] for a correlation, else [0, 1]); once every seed
  has run, both are the mean. An aim is decided only when no such outcome could change it."""
  devs = stats["devs"] if stats else []
  missing = max(0, _SEEDS.value - len(devs))
  lowest = -1.0 if metric in ("mcc", "pearson", "spearman") else 0.0
  return ((sum(devs) + missing * lowest) / (len(devs) + missing),
          (sum(devs) + missing * 1.0) / (len(devs) + missing))


def _cell(stats: dict[str, Any] | None, scale: float) -> str:
  if stats is None:
    return "| not run yet | | | |"
  std = "" if stats["n"] < 2 else f" ± {scale * stats['std']:.2f}"
  return (f"| {scale * stats['mean']:.2f}{std} | {stats['n']} | {stats['size_mb']:.4f} | "
          f"{stats['compression']:.2f}x |")


def main(argv):
  del argv
  root, out, archive = Path(_ROOT.value), Path(_OUT.value), Path(_ARCHIVE.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  print(f"archived {archive_runs(root, archive)} finished runs of {root} in {archive}")
  csv_rows, plot_rows = [], []
  lines = ["# The study: every method against uniform quantization at equal size", "",
           "Made by `bash experiments/run_study.sh` (the protocol is in its header) and "
           "`python experiments/collect_study.py`. Dev metric x 100, mean ± standard deviation "
           "over seeds (n); size: the largest over seeds of the encoder matrices with their "
           "scales (MB), compression: the smallest. Δ uniform: the paired difference to the "
           "column's uniform model on the same seeds, mean [95% bootstrap interval over seeds "
           "and dev examples]. The 12x and 24x columns have no uniform model of their size: "
           "their uniform row is the nearest larger one (3-bit, 2-bit), which favours it. "
           "†: no interval, a run's dev predictions were lost with its workdir before "
           "results/study_runs/ kept them; `git show c503685:experiments/results/study.md` has "
           "the interval computed from them, on the seeds finished then.", ""]
  aims: dict[str, Any] = {}
  for task in TASKS:
    runs = load_runs(archive / task)
    if not runs:
      continue
    first = next(iter(next(iter(runs.values())).values()))
    metric = first["metric"]
    full_precision = first["rows"][0]["dev"]
    devices = sorted({r.get("device", "not recorded (the runs predate the field)")
                      for by_seed in runs.values() for r in by_seed.values()})
    lines += [f"## {task} ({metric}); full precision {100 * full_precision:.2f}", "",
              f"Run on: {'; '.join(devices)}.", ""]
    plot_rows.append({"task": task, "run": "full precision", "size_mb": first["rows"][0]["size_mb"],
                      "dev": full_precision, "metric": metric})
    aims[task] = {"full_precision": full_precision}
    for column, (uniforms, methods) in COLUMNS.items():
      present = {m: runs[run_name(m, column)] for m in methods if run_name(m, column) in runs}
      if not present:
        continue
      lines += [f"### {column}x" if column != "smx" else "### SensiMix 3+3's size", "",
                "| method | dev | n | size MB | compression | Δ uniform | commits |",
                "|---|---:|---:|---:|---:|---:|---|"]
      means = {}
      for bits, relation in uniforms:
        ustats = _stats(runs[f"uniform{bits}"]) if f"uniform{bits}" in runs else None
        label = f"uniform {bits}-bit" + ("" if relation == "equal" else f" ({relation})")
        lines.append(f"| {label} {_cell(ustats, 100)} | "
                     f"{', '.join(ustats['commits']) if ustats else ''} |")
        if relation == "equal":  # Only a uniform model of the column's size competes.
          means["uniform"] = _mean_bounds(ustats, metric)
        for seed, run in sorted(runs.get(f"uniform{bits}", {}).items()):
          csv_rows.append(_csv_row(task, column, "uniform", seed, run))
      reference = runs.get(f"uniform{uniforms[0][0]}", {})
      for method in methods:
        if method.startswith("sensimix_") and task != "sst2":
          continue  # The Table 4 ablation runs on SST-2 only.
        if (method, column) in NOT_RUN:
          lines.append(f"| {method} | {NOT_RUN[(method, column)]} | | | | | |")
          continue
        if method not in present:
          lines.append(f"| {method} | not run yet | | | | | |")
          means[method] = _mean_bounds(None, metric)
          continue
        stats = _stats(present[method])
        means[method] = _mean_bounds(stats, metric)
        paired = paired_bootstrap(task, metric, present[method], reference, _BOOTSTRAP.value)
        lines.append(f"| {method} {_cell(stats, 100)} {_delta(paired)} | "
                     f"{', '.join(stats['commits'])} |")
        plot_rows.append({"task": task, "run": run_name(method, column),
                          "size_mb": stats["size_mb"], "dev": stats["mean"],
                          "dev_std": stats["std"] if stats["n"] > 1 else 0.0, "metric": metric})
        for seed, run in sorted(present[method].items()):
          csv_rows.append(_csv_row(task, column, method, seed, run))
      aims[task][column] = means
      lines.append("")
      rivals = [m for m in present if m != "automp" and not m.startswith("sensimix_")]
      if "automp" in present and rivals:
        versus = []
        for rival in rivals:
          paired = paired_bootstrap(task, metric, present["automp"], present[rival],
                                    _BOOTSTRAP.value)
          versus.append(f"AutoMPQ − {rival}: {_delta(paired) or 'no common seed'}")
        lines += ["Paired, same seeds: " + "; ".join(versus) + ".", ""]
    for bits in sorted({b for uniforms, _ in COLUMNS.values() for b, _ in uniforms}):
      if f"uniform{bits}" in runs:
        stats = _stats(runs[f"uniform{bits}"])
        plot_rows.append({"task": task, "run": f"uniform{bits}", "size_mb": stats["size_mb"],
                          "dev": stats["mean"], "dev_std": stats["std"] if stats["n"] > 1
                          else 0.0, "metric": metric})
    if sum(r["task"] == task for r in plot_rows) > 1:
      png = out.parent / f"study_pareto_{task}.png"
      pareto_figure(plot_rows, task, title=f"{task}: size vs dev {metric} (mean ± std over "
                                           "seeds)").savefig(png, dpi=120)
      lines += [f"Pareto plot: `{png.name}`.", ""]
    best = _best_bit_map(runs, task, out.parent)
    if best:
      lines += [f"Bit-width map of the best mixed-precision policy at 16x: `{best}`.", ""]
  lines += _aims(aims)
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  # Rows dedupe: the uniform 2-bit runs serve both the 16x and the 24x column.
  unique = {(r["task"], r["run"], r["seed"]): r for r in csv_rows}
  if unique:
    with out.with_suffix(".csv").open("w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(next(iter(unique.values()))))
      writer.writeheader()
      writer.writerows(unique.values())
  print("\n".join(lines))


def _csv_row(task: str, column: Any, method: str, seed: int, run: dict) -> dict[str, Any]:
  name = Path(run["workdir"]).name.rsplit("_seed", 1)[0]
  return {"task": task, "run": name, "seed": seed, "metric": run["metric"], "dev": run["dev"],
          "size_mb": run["size_mb"], "compression": run["compression"],
          "avg_bits": run["avg_bits"], "pruned_groups": run.get("policy", {}).get("pruned_groups"),
          "steps": run.get("steps"), "wall_time_s": round(run.get("wall_time_s", 0.0)),
          "commit": run.get("git_commit"), "command": _command(task, column, method, seed),
          "workdir": str(run["workdir"])}


def _best_bit_map(runs: dict, task: str, folder: Path) -> str | None:
  """Draws the bit map of the best seed of the best mixed method at 16x; returns its name."""
  candidates = [(statistics.mean(r["dev"] for r in runs[f"{m}16"].values()), m)
                for m in MIXED if f"{m}16" in runs]
  if not candidates:
    return None
  method = max(candidates)[1]
  best = max(runs[f"{method}16"].values(), key=lambda r: r["dev"])
  source = Path(best["archived"]) / "policy.json"
  target = folder / f"study_bit_map_{task}.png"
  if source.is_file():
    plot_bit_map(Policy.load(source), target,
                 title=f"{method} {task}: {best['size_mb']:.3f} MB, {best['compression']:.1f}x, "
                       f"dev {best['dev']:.4f}")
  elif not target.is_file():
    return None
  return f"{target.name} ({method} 16x, {Path(best['workdir']).name})"


def _verdict(values: list[bool | None]) -> str:
  if any(v is None for v in values):
    return "open (not all runs finished)"
  return "met" if all(values) else "not met"


def _aims(aims: dict[str, Any]) -> list[str]:
  """The issue's aims, each met / not met / open, computed from the means above."""
  def wins(task, column):  # AutoMPQ's mean >= every other method's in the column, or None.
    bounds = aims.get(task, {}).get(column, {})
    if "automp" not in bounds:
      return None
    low, high = bounds["automp"]
    others = [b for k, b in bounds.items() if k != "automp"]
    if any(other_low > high for other_low, _ in others):
      return False  # Decided: another method is ahead whatever the missing seeds score.
    if others and all(other_high <= low for _, other_high in others):
      return True
    return None

  def within(task, column, points, method="automp"):
    bounds = aims.get(task, {}).get(column, {}).get(method)
    if bounds is None:
      return None
    gaps = [100 * (aims[task]["full_precision"] - mean) for mean in bounds]
    return True if gaps[0] <= points else False if gaps[1] > points else None

  at16 = {t: wins(t, 16) for t in TASKS}
  decided = [v for v in at16.values() if v is not None]
  count = sum(decided)
  verdict16 = ("met" if count >= 3 else "not met" if count + (4 - len(decided)) < 3
               else "open (not all runs finished)")
  return ["## Aims", "",
          "Judged on the means over seeds; the paired differences under each table say which "
          "of these orderings the seeds and dev examples can tell apart. Before every seed has "
          "run, an aim is decided only if no score of the missing seeds could change it.", "",
          f"- AutoMPQ >= every other method at equal size at 16x on at least 3 of 4 tasks: "
          f"**{verdict16}** ({', '.join(f'{t}: {_yes(v)}' for t, v in at16.items())}).",
          f"- ... and on SST-2 at 12x: **{_verdict([wins('sst2', 12)])}**.",
          f"- AutoMPQ at 8x within 0.5 point of full precision on SST-2: "
          f"**{_verdict([within('sst2', 8, 0.5)])}**.",
          f"- AutoMPQ at 16x within 1.5 points of full precision on SST-2: "
          f"**{_verdict([within('sst2', 16, 1.5)])}**.",
          f"- SensiMix 3+3 within 1 point of full precision on SST-2: "
          f"**{_verdict([within('sst2', 'smx', 1.0, method='sensimix')])}**.", ""]


def _yes(value: bool | None) -> str:
  return "open" if value is None else "yes" if value else "no"


if __name__ == "__main__":
  app.run(main)
