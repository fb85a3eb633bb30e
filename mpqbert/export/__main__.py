r"""`python -m mpqbert.export --workdir=RUN --out=FILE.safetensors [--check_dev] [--check_int8]`:
a finished run to a packed checkpoint, safetensors (see `mpqbert.methods.export_run`). Prints the
file's bytes against the run's size_mb."""

from __future__ import annotations

import json

from absl import app, flags, logging

from mpqbert.methods.export_run import export_run
from mpqbert.train.results import quiet_library_info_logs

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished run's --workdir.", required=True)
_OUT = flags.DEFINE_string("out", None, "The packed checkpoint to write: FILE.safetensors.",
                           required=True)
_CHECK_DEV = flags.DEFINE_bool("check_dev", False, "Also compare the packed model's dev "
                               "predictions with the fake-quantized model's (needs the data).")
_CHECK_INT8 = flags.DEFINE_bool("check_int8", False, "Also compare the int8 CPU layout's "
                                "(export.lay_out) dev predictions with the fake-quantized "
                                "model's (needs the data).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(quiet_library_info_logs)
  report = export_run(_WORKDIR.value, _OUT.value, check_dev=_CHECK_DEV.value,
                      check_int8=_CHECK_INT8.value)
  print(json.dumps(report, indent=2))
  print(f"{report['file']}: {report['file_bytes']} bytes; packed matrices {report['matrix_bytes']}"
        f" bytes = {report['matrix_bytes_over_size_mb']:.4f} x size_mb")


if __name__ == "__main__":
  app.run(main)
