"""``kdjax`` command line: flags only; the work is :func:`kdjax.pipeline.run`.

    kdjax [--config=PATH[:VARIANT]] [--config.FIELD=VALUE ...] [--workdir=DIR] [--overwrite]
"""

from __future__ import annotations

import datetime
import os
import sys

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    DEFAULT_CONFIG,
    "Experiment config file (a Python file with get_config()); append ':smoke' for the "
    "config's smoke variant. Override fields with --config.FIELD=VALUE. Default: the embedded "
    "digits job.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where the run writes checkpoints and results (default: runs/NAME-TIME)."
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace an earlier run's checkpoints and results in --workdir."
)


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from kdjax.errors import KdjaxError  # imports jax; after flag parsing keeps --help fast
    from kdjax.pipeline import run

    # kdjax's own progress at INFO; other libraries (orbax, TFDS) only from WARNING up, unless
    # the user sets --verbosity.
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("kdjax").setLevel(logging.INFO)
    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join(
        "runs", f"{config.get('name', 'kdjax')}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    logging.getLogger("kdjax").info("Work directory: %s", workdir)
    try:
        results = run(config, workdir, overwrite=_OVERWRITE.value)
    except KdjaxError as err:
        print(f"kdjax: error: {err}", file=sys.stderr)
        sys.exit(2)
    with open(os.path.join(workdir, "results.md")) as f:
        print(f.read())
    print(f"Results, checkpoints and metrics are in {workdir}/ "
          f"({results['wall_time_s']:.0f} s in all).")


def main() -> None:
    # Progress lines at INFO go to stderr unless the user asks for less (--verbosity=-1).
    flags.FLAGS.set_default("logtostderr", True)
    app.run(_main)


if __name__ == "__main__":
    main()
