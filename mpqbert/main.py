r"""Entry point: `python -m mpqbert.main --config=configs/<method>.py --workdir=DIR`.

The config's `method` picks the pipeline; `--config.<key>=<value>` overrides any config value.
Example (fine-tune the embedded MiniLM on RTE from the local GLUE TSVs):

  python -m mpqbert.main --config=configs/finetune.py --config.task=rte \
      --config.data.glue_dir=../shared/data/glue --workdir=/tmp/mpqbert/rte
"""

from __future__ import annotations

import json
import sys
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from mpqbert import methods
from mpqbert.methods.common import format_table
from mpqbert.train import compiled, finetune, results
from mpqbert.train.sharding import maybe_initialize_distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/<method>.py file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", str(compiled.DEFAULT_CACHE_DIR),
    "JAX's persistent compilation cache: a resumed or repeated run loads its compiled steps "
    "from here instead of compiling them again. '' turns it off; JAX_COMPILATION_CACHE_DIR, "
    "when set, wins.")

METHODS: dict[str, Callable] = {"finetune": finetune, "automp": methods.automp,
                                "uniform": methods.uniform, "qbert": methods.qbert,
                                "hawq": methods.hawq,
                                "sensimix": methods.sensimix.run}


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a one-line error (not a traceback) for an unknown config key."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    message = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    sys.exit(f"error: unknown config key in {' '.join(a for a in argv[1:] if a.startswith('--config.'))}"
             f": {message}. Run with --helpfull or read the config file for the valid keys.")
  except flags.Error as e:
    sys.exit(f"error: {e}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None or _WORKDIR.value is None:
    raise app.UsageError("both --config=configs/<method>.py and --workdir=DIR are required.")
  if config.method not in METHODS:
    raise app.UsageError(f"config.method={config.method!r} is unknown; use one of "
                         f"{sorted(METHODS)}.")
  logging.get_absl_handler().addFilter(results.quiet_library_info_logs)
  commit = results.git_commit()  # Read once, before any training.
  logging.info("mpqbert at commit %s", commit)
  if commit == "unknown":
    logging.warning("mpqbert's code is not in a git checkout, so results.json will record "
                    "git_commit 'unknown': run from a clone, or set GIT_DIR to the clone's .git, "
                    "for the results to name their code.")
  maybe_initialize_distributed()
  compiled.enable_persistent_cache(_CACHE.value)
  summary = METHODS[config.method](config, _WORKDIR.value)
  logging.info("results: %s", json.dumps({k: v for k, v in summary.items() if k != "config"}))
  if "rows" in summary:
    print(format_table(summary["rows"], summary["metric"]))
  print(f"{summary['task']} {summary['method']} dev {summary['metric']} = {summary['dev']:.4f} "
        f"({summary['size_mb']:.2f} MB encoder matrices, {summary['steps']} steps, "
        f"{summary['wall_time_s']:.0f} s) -> {_WORKDIR.value}/results.json")


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
