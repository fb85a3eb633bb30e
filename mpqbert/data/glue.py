"""GLUE task registry and loaders for local TSVs and the Hugging Face hub.

Two sources are supported:

* a local directory in the standard GLUE layout (`<glue_dir>/<TASK>/train.tsv`,
  `dev.tsv`, ...), read with the `csv` module exactly as GLUE ships the files;
* the `nyu-mll/glue` dataset on the Hugging Face hub (when no directory is set).

Both produce the same `Examples` with integer label ids in the order of the hub's
`ClassLabel`, so models trained from either source are interchangeable.

Why one module over 300 lines: the task table and both readers (local TSVs, the hub); each task's
parsing quirks sit next to its table entry.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

HUB_DATASET = "nyu-mll/glue"
GLUE_DIR_ENV_VAR = "MPQBERT_GLUE_DIR"

_GLUE_DIR_FIX = (
    f"Fix: point `config.data.glue_dir` (or the {GLUE_DIR_ENV_VAR} environment "
    "variable) at a directory in the standard GLUE layout "
    "(<glue_dir>/<TASK>/train.tsv, dev.tsv, ...), or leave both unset to download "
    f"`{HUB_DATASET}` from the Hugging Face hub."
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GlueTask:
  """Static description of one GLUE task.

  Attributes:
    name: Lowercase registry key, e.g. "sst2".
    glue_dir_name: Folder name in the standard GLUE layout, e.g. "SST-2".
    hub_config: Config name of `nyu-mll/glue` on the Hugging Face hub.
    text_columns: One or two TSV column names holding the input text(s).
    label_column: TSV column name holding the label.
    label_names: Class names in hub `ClassLabel` order (None for regression).
    is_regression: True for STS-B (float targets).
    metric_names: Metrics reported by `metrics.glue_metrics`.
    main_metric: The metric used for model selection.
    train_file: File name of the training split.
    eval_files: Eval split name (as on the hub) -> file name.
    has_header: Whether the TSVs start with a header line.
    columns: Column names to use when `has_header` is False (CoLA).
    tsv_labels: The label string written in the TSV for each class id, in
      `label_names` order (None for regression).
    hub_text_columns: The text column names of the hub dataset.
  """

  name: str
  glue_dir_name: str
  hub_config: str
  text_columns: tuple[str, ...]
  label_column: str
  label_names: tuple[str, ...] | None
  is_regression: bool = False
  metric_names: tuple[str, ...]
  main_metric: str
  train_file: str = "train.tsv"
  # Excluded from the hash (dicts are unhashable) so tasks stay hashable.
  eval_files: dict[str, str] = dataclasses.field(
      default_factory=lambda: {"validation": "dev.tsv"}, hash=False
  )
  has_header: bool = True
  columns: tuple[str, ...] | None = None
  tsv_labels: tuple[str, ...] | None = None
  hub_text_columns: tuple[str, ...]

  def __post_init__(self):
    if len(self.text_columns) not in (1, 2):
      raise ValueError(f"{self.name}: text_columns must have 1 or 2 names.")
    if len(self.hub_text_columns) != len(self.text_columns):
      raise ValueError(f"{self.name}: hub_text_columns must match text_columns.")
    if self.main_metric not in self.metric_names:
      raise ValueError(f"{self.name}: main_metric must be one of metric_names.")
    if self.is_regression != (self.label_names is None):
      raise ValueError(f"{self.name}: label_names must be None iff regression.")
    if not self.is_regression and (
        self.tsv_labels is None or len(self.tsv_labels) != len(self.label_names)
    ):
      raise ValueError(f"{self.name}: tsv_labels must parallel label_names.")
    if not self.has_header and self.columns is None:
      raise ValueError(f"{self.name}: headerless tasks need `columns`.")
    if not self.eval_files:
      raise ValueError(f"{self.name}: eval_files must not be empty.")

  @property
  def num_labels(self) -> int:
    """Number of model outputs: classes, or 1 for regression."""
    return 1 if self.label_names is None else len(self.label_names)

  @property
  def is_pair(self) -> bool:
    """Whether examples are sentence pairs."""
    return len(self.text_columns) == 2

  @property
  def eval_splits(self) -> tuple[str, ...]:
    """Eval split names, the first one being the default ("dev")."""
    return tuple(self.eval_files)

  @property
  def splits(self) -> tuple[str, ...]:
    """All labelled split names: "train" then the eval splits."""
    return ("train",) + self.eval_splits

  def split_file(self, split: str) -> str:
    """File name of `split` (aliases "dev"/"validation" allowed)."""
    split = self.canonical_split(split)
    return self.train_file if split == "train" else self.eval_files[split]

  def canonical_split(self, split: str) -> str:
    """Maps a split name or alias to a name in `self.splits`."""
    if split in self.splits:
      return split
    if split in ("dev", "validation"):
      return self.eval_splits[0]
    raise ValueError(
        f"Unknown split {split!r} for GLUE task {self.name!r}. Valid splits: "
        f"{', '.join(self.splits)} (or 'dev'/'validation' for "
        f"{self.eval_splits[0]!r})."
    )


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
_NLI3 = ("entailment", "neutral", "contradiction")


def _build_tasks() -> dict[str, GlueTask]:
  tasks = [
      GlueTask(
          name="cola",
          glue_dir_name="CoLA",
          hub_config="cola",
          text_columns=("sentence",),
          label_column="label",
          label_names=("unacceptable", "acceptable"),
          tsv_labels=_BINARY,
          metric_names=("mcc",),
          main_metric="mcc",
          has_header=False,
          columns=("source", "label", "original_annotation", "sentence"),
          hub_text_columns=("sentence",),
      ),
      GlueTask(
          name="sst2",
          glue_dir_name="SST-2",
          hub_config="sst2",
          text_columns=("sentence",),
          label_column="label",
          label_names=("negative", "positive"),
          tsv_labels=_BINARY,
          metric_names=("accuracy",),
          main_metric="accuracy",
          hub_text_columns=("sentence",),
      ),
      GlueTask(
          name="mrpc",
          glue_dir_name="MRPC",
          hub_config="mrpc",
          text_columns=("#1 String", "#2 String"),
          label_column="Quality",
          label_names=("not_equivalent", "equivalent"),
          tsv_labels=_BINARY,
          metric_names=("accuracy", "f1"),
          main_metric="f1",
          hub_text_columns=("sentence1", "sentence2"),
      ),
      GlueTask(
          name="qqp",
          glue_dir_name="QQP",
          hub_config="qqp",
          text_columns=("question1", "question2"),
          label_column="is_duplicate",
          label_names=("not_duplicate", "duplicate"),
          tsv_labels=_BINARY,
          metric_names=("accuracy", "f1"),
          main_metric="f1",
          hub_text_columns=("question1", "question2"),
      ),
      GlueTask(
          name="stsb",
          glue_dir_name="STS-B",
          hub_config="stsb",
          text_columns=("sentence1", "sentence2"),
          label_column="score",
          label_names=None,
          is_regression=True,
          metric_names=("pearson", "spearman"),
          main_metric="pearson",
          hub_text_columns=("sentence1", "sentence2"),
      ),
      GlueTask(
          name="mnli",
          glue_dir_name="MNLI",
          hub_config="mnli",
          text_columns=("sentence1", "sentence2"),
          label_column="gold_label",
          label_names=_NLI3,
          tsv_labels=_NLI3,
          metric_names=("accuracy",),
          main_metric="accuracy",
          eval_files={
              "validation_matched": "dev_matched.tsv",
              "validation_mismatched": "dev_mismatched.tsv",
          },
          hub_text_columns=("premise", "hypothesis"),
      ),
      GlueTask(
          name="qnli",
          glue_dir_name="QNLI",
          hub_config="qnli",
          text_columns=("question", "sentence"),
          label_column="label",
          label_names=_NLI2,
          tsv_labels=_NLI2,
          metric_names=("accuracy",),
          main_metric="accuracy",
          hub_text_columns=("question", "sentence"),
      ),
      GlueTask(
          name="rte",
          glue_dir_name="RTE",
          hub_config="rte",
          text_columns=("sentence1", "sentence2"),
          label_column="label",
          label_names=_NLI2,
          tsv_labels=_NLI2,
          metric_names=("accuracy",),
          main_metric="accuracy",
          hub_text_columns=("sentence1", "sentence2"),
      ),
      GlueTask(
          name="wnli",
          glue_dir_name="WNLI",
          hub_config="wnli",
          text_columns=("sentence1", "sentence2"),
          label_column="label",
          # Hub ClassLabel order; the TSV writes 0 = not entailment, 1 = entailment.
          label_names=("not_entailment", "entailment"),
          tsv_labels=_BINARY,
          metric_names=("accuracy",),
          main_metric="accuracy",
          hub_text_columns=("sentence1", "sentence2"),
      ),
  ]
  return {t.name: t for t in tasks}


TASKS: Mapping[str, GlueTask] = _build_tasks()


def _normalize_name(name: str) -> str:
  return name.strip().lower().replace("-", "").replace("_", "")


def get_task(name: str | GlueTask) -> GlueTask:
  """Looks up a task by name, case-insensitively ("SST-2", "sts-b", "sst2")."""
  if isinstance(name, GlueTask):
    return name
  key = _normalize_name(name)
  for task in TASKS.values():
    if key in (task.name, _normalize_name(task.glue_dir_name)):
      return task
  raise ValueError(
      f"Unknown GLUE task {name!r}. Valid names: {', '.join(TASKS)} "
      "(case-insensitive; GLUE folder names such as 'SST-2' also work)."
  )


@dataclasses.dataclass(frozen=True)
class Examples:
  """Raw text examples of one split, in file/hub order.

  Attributes:
    text_a: First segment of each example.
    text_b: Second segment (pair tasks) or None (single-sentence tasks).
    labels: int32 class ids, or float32 targets for regression.
  """

  text_a: list[str]
  text_b: list[str] | None
  labels: np.ndarray

  def __post_init__(self):
    n = len(self.text_a)
    if self.text_b is not None and len(self.text_b) != n:
      raise ValueError(
          f"text_b has {len(self.text_b)} entries but text_a has {n}."
      )
    if np.ndim(self.labels) != 1 or len(self.labels) != n:
      raise ValueError(
          f"labels must be 1-D with {n} entries, got shape "
          f"{np.shape(self.labels)}."
      )

  def __len__(self) -> int:
    return len(self.text_a)

  def select(self, indices: np.ndarray) -> "Examples":
    """The examples at `indices`, in that order."""
    return Examples(text_a=[self.text_a[i] for i in indices],
                    text_b=None if self.text_b is None else [self.text_b[i] for i in indices],
                    labels=np.asarray(self.labels)[np.asarray(indices, dtype=np.int64)])


def resolve_glue_dir(glue_dir: str | os.PathLike | None) -> str | None:
  """Returns the local GLUE directory to use, or None to use the hub.

  Order: `glue_dir` if given, else the MPQBERT_GLUE_DIR environment variable,
  else None. Empty strings count as unset (handy for config files).

  Raises:
    FileNotFoundError: if the chosen directory does not exist.
  """
  source = "glue_dir"
  if glue_dir is None or str(glue_dir) == "":
    glue_dir = os.environ.get(GLUE_DIR_ENV_VAR) or None
    source = f"the {GLUE_DIR_ENV_VAR} environment variable"
  if glue_dir is None:
    return None
  glue_dir = os.fspath(glue_dir)
  if not os.path.isdir(glue_dir):
    raise FileNotFoundError(
        f"GLUE directory {glue_dir!r} (from {source}) does not exist or is not "
        f"a directory. {_GLUE_DIR_FIX}"
    )
  return glue_dir


def load_split(
    task: GlueTask | str,
    split: str,
    glue_dir: str | os.PathLike | None = None,
) -> Examples:
  """Loads one labelled split of a GLUE task.

  Args:
    task: A `GlueTask` or a name accepted by `get_task`.
    split: "train", one of `task.eval_splits`, or "dev"/"validation" for the
      first eval split.
    glue_dir: Local GLUE directory; None downloads `nyu-mll/glue` from the hub.
      (This function does not read MPQBERT_GLUE_DIR; pass the result of
      `resolve_glue_dir` to honour it.)

  Returns:
    The split's `Examples`.

  Raises:
    FileNotFoundError: the local file is missing (message has the fix).
    ValueError: unknown task/split, or a malformed row (names file and line).
  """
  task = get_task(task)
  split = task.canonical_split(split)
  if glue_dir is None:
    return _load_from_hub(task, split)
  return read_tsv(task, split_path(task, split, glue_dir))


def split_path(task: GlueTask | str, split: str, glue_dir: str | os.PathLike) -> Path:
  """The local TSV file of `split` of `task` under `glue_dir`; a clear error if it is missing."""
  task = get_task(task)
  split = task.canonical_split(split)
  path = Path(glue_dir) / task.glue_dir_name / task.split_file(split)
  if not path.is_file():
    needed = ", ".join(
        f"{task.glue_dir_name}/{f}" for f in (task.train_file, *task.eval_files.values())
    )
    raise FileNotFoundError(
        f"GLUE file not found: {path} (task {task.name!r}, split {split!r}). "
        f"Task {task.name!r} needs {needed} under the GLUE directory. "
        f"{_GLUE_DIR_FIX}"
    )
  return path


def _parse_label(task: GlueTask, value: str, where: str) -> int | float:
  if task.is_regression:
    try:
      return float(value)
    except ValueError:
      raise ValueError(
          f"{where}: label {value!r} is not a number (task {task.name!r} is "
          "regression). Fix: check the file is the original GLUE TSV."
      ) from None
  try:
    return task.tsv_labels.index(value.strip())
  except ValueError:
    raise ValueError(
        f"{where}: unknown label {value!r} for task {task.name!r}; expected "
        f"one of {list(task.tsv_labels)}. Fix: check the file is the original "
        "GLUE TSV."
    ) from None


def _column_indices(
    task: GlueTask, header: Sequence[str], path: Path
) -> tuple[list[int], int]:
  wanted = (*task.text_columns, task.label_column)
  missing = [c for c in wanted if c not in header]
  if missing:
    raise ValueError(
        f"{path}:1: header lacks column(s) {missing} needed by task "
        f"{task.name!r}; found {list(header)}. Fix: use the original GLUE TSV "
        "for this task."
    )
  return [header.index(c) for c in task.text_columns], header.index(
      task.label_column
  )


def iter_tsv(task: GlueTask | str, path: str | os.PathLike
             ) -> Iterator[tuple[str, str | None, int | float]]:
  """The examples of a GLUE TSV file of `task`, one `(text_a, text_b or None, label)` at a time.

  Files are read as UTF-8 with any BOM stripped (MRPC) and with
  `csv.QUOTE_NONE`, because GLUE fields contain bare '"' characters. Blank
  lines are skipped; every other row must have the header's column count.
  """
  task = get_task(task)
  path = Path(path)
  with open(path, encoding="utf-8-sig", newline="") as f:
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    if task.has_header:
      header = next(reader, None)
      if header is None:
        raise ValueError(f"{path}: file is empty; expected a header line.")
      header = [h.strip() for h in header]
    else:
      header = list(task.columns)
    text_idx, label_idx = _column_indices(task, header, path)
    for row in reader:
      if not row:
        continue
      where = f"{path}:{reader.line_num}"
      if len(row) != len(header):
        raise ValueError(
            f"{where}: expected {len(header)} tab-separated columns, got "
            f"{len(row)}. Fix: use the original GLUE TSV (read with "
            "quoting=csv.QUOTE_NONE; a re-saved file may have quoted fields)."
        )
      texts = [row[i] for i in text_idx]
      yield (texts[0], texts[1] if task.is_pair else None,
             _parse_label(task, row[label_idx], where))


def read_tsv(task: GlueTask | str, path: str | os.PathLike) -> Examples:
  """Reads a GLUE TSV file of `task` into `Examples` (`iter_tsv` says how)."""
  task = get_task(task)
  rows = list(iter_tsv(task, path))
  return Examples(
      text_a=[a for a, _, _ in rows],
      text_b=[b for _, b, _ in rows] if task.is_pair else None,
      labels=_labels_array(task, [label for _, _, label in rows]),
  )


def _labels_array(task: GlueTask, labels: Sequence[int | float]) -> np.ndarray:
  dtype = np.float32 if task.is_regression else np.int32
  return np.asarray(labels, dtype=dtype).reshape(-1)


def _load_from_hub(task: GlueTask, split: str) -> Examples:
  """Loads `split` of `task` from `nyu-mll/glue` via `datasets.load_dataset`."""
  import datasets  # Imported lazily: slow, and unneeded for local TSVs.

  try:
    ds = datasets.load_dataset(HUB_DATASET, task.hub_config, split=split)
  except Exception as err:
    raise RuntimeError(
        f"Could not load {HUB_DATASET!r} config {task.hub_config!r} split "
        f"{split!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
        "Fix: check network access / the HF cache, or set `config.data.glue_dir` "
        f"or {GLUE_DIR_ENV_VAR} to a local GLUE directory."
    ) from err
  wanted = (*task.hub_text_columns, "label")
  missing = [c for c in wanted if c not in ds.column_names]
  if missing:
    raise ValueError(
        f"Hub dataset {HUB_DATASET}/{task.hub_config} split {split!r} lacks "
        f"column(s) {missing}; has {ds.column_names}."
    )
  texts = [list(ds[c]) for c in task.hub_text_columns]
  labels = _labels_array(task, list(ds["label"]))
  if not task.is_regression and len(labels):
    bad = (labels < 0) | (labels >= task.num_labels)
    if bad.any():
      raise ValueError(
          f"Hub dataset {HUB_DATASET}/{task.hub_config} split {split!r} has "
          f"label {int(labels[bad][0])} outside [0, {task.num_labels}) at row "
          f"{int(np.argmax(bad))} (test splits are unlabelled: use 'train' or "
          f"one of {list(task.eval_splits)})."
      )
  return Examples(
      text_a=texts[0],
      text_b=texts[1] if task.is_pair else None,
      labels=labels,
  )
