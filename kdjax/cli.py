"""kdjax: fit a teacher, train a student from scratch, distill it, evaluate, report.

Usage: kdjax [--config=PATH[:VARIANT]] [--config.FIELD=VALUE ...] [--workdir=DIR] [--overwrite]
             [--distributed]

  kdjax                                        the embedded digits job (about 10 s on a CPU)
  kdjax --config=experiments/mnist_short.py --config.dataset.raw_dir=PATH/TO/mnist
  kdjax --config=experiments/mnist_short.py:smoke --config.student.temperature=8

Every device is used (config.parallel: sharded jit by default, or pmap); a job of several
processes (hosts) is described in BUILD.md.

A work directory holding an unfinished run of the same config is resumed where it stopped;
--overwrite starts it again from scratch instead. SIGTERM or Ctrl-C saves a checkpoint at the
next step and stops (a second one stops at once).

Exit codes: 0 done; 1 crash; 2 bad input (nothing was trained or written); 3 interrupted by a
signal (a checkpoint was saved: rerun the same command to resume); 4 stopped at a NaN/Inf loss
or gradient (the last good checkpoint is kept); 128 + N killed by signal N (a second signal, or
one outside training).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")
FLAGS = flags.FLAGS
# Errors that flag and config-override parsing raise for a user's typo.
_PARSE_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError)


def _define_flags() -> None:
    # Defining the config flag already applies --config.FIELD overrides, so a typo in one
    # raises here: main() calls this inside its error handling, not at import.
    config_flags.DEFINE_config_file(
        "config",
        DEFAULT_CONFIG,
        "Experiment config file (a Python file with get_config()); append ':smoke' for the "
        "config's smoke variant. Override fields with --config.FIELD=VALUE. Default: the "
        "embedded digits job.",
        lock_config=True,
    )
    flags.DEFINE_string(
        "workdir", None, "Where the run writes checkpoints and results (default: runs/NAME-TIME)."
    )
    flags.DEFINE_bool(
        "distributed",
        False,
        "Join the other processes of a multi-host job found by JAX's cluster detection "
        "(SLURM, Open MPI, TPU pod slices). Without it a job is multi-process when "
        "JAX_COORDINATOR_ADDRESS, KDJAX_NUM_PROCESSES and KDJAX_PROCESS_ID are set (BUILD.md).",
    )
    flags.DEFINE_bool(
        "overwrite",
        False,
        "Replace what --workdir holds (a finished run, or an unfinished one that would "
        "otherwise be resumed) and start from scratch.",
    )


def _fail(message: str, code: int = 2) -> None:
    print(f"kdjax: error: {message}", file=sys.stderr)
    sys.exit(code)


def _innermost(err: BaseException) -> BaseException:
    while err.args and isinstance(err.args[0], BaseException):
        err = err.args[0]
    return err


def _plain_message(err: BaseException) -> str:
    """The innermost message of a (possibly wrapped) parse error, on one line; of a config
    file that raised, its exception's last line rather than the whole traceback."""
    err = _innermost(err)
    text = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
    if "Traceback (most recent call last)" in text:
        text = [line for line in text.splitlines() if line.strip()][-1]
    return " ".join(text.split())


def _parse_error_message(err: BaseException, argv: list[str]) -> str:
    """What went wrong with the command line, naming the argument at fault."""
    message = _plain_message(err)
    unknown = re.match(r"'([^']+)'\s*(.*)", message)
    if isinstance(_innermost(err), KeyError | AttributeError) and unknown:
        key, hint = unknown.groups()
        for arg in argv:
            field = arg.split("=", 1)[0]
            if field.startswith("--config.") and key in field.split("."):
                hint = f" {hint}" if hint else " (the config file lists every field)"
                return f"{field}: the config has no field {key!r}.{hint}"
    return message


def _check_config_path(argv: list[str]) -> None:
    """``--config=PATH[:VARIANT]`` must name a file (ml_collections' own error is opaque)."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        else:
            continue
        path = value.split(":", 1)[0]
        if not os.path.isfile(path):
            _fail(f"--config={value}: there is no file {path} (see experiments/ for configs).")


def _parse_flags(argv: list[str]) -> list[str]:
    if any(arg in ("-h", "--help", "-help") for arg in argv[1:]):
        print(__doc__.strip(), FLAGS.module_help(__name__), sep="\n\n")
        sys.exit(0)
    try:
        return FLAGS(argv)
    except _PARSE_ERRORS as err:
        _fail(f"{_parse_error_message(err, argv)} (see kdjax --help)")


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])} (see kdjax --help)")
    # Imports jax: after flag parsing keeps --help fast.
    import jax

    from kdjax import distributed
    from kdjax.errors import Interrupted, KdjaxError, NonFiniteError
    from kdjax.runners import get_runner
    from kdjax.train.preemption import stop_on_signals

    # kdjax's own progress at INFO; other libraries (orbax, TFDS) from WARNING up, unless the
    # user sets --verbosity.
    if not FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("kdjax").setLevel(logging.INFO)
    try:
        distributed.initialize(auto_detect=FLAGS.distributed)  # before any device is used
    except KdjaxError as err:
        _fail(str(err))
    if not distributed.is_primary():
        logging.getLogger("kdjax").setLevel(logging.WARNING)  # progress is logged once
    try:
        config = FLAGS.config
        name = config.get("name", "kdjax")  # a config file that failed to load raises here
    except OSError as err:
        _fail(f"cannot load --config: {_plain_message(err)}")
    if FLAGS.workdir is None and jax.process_count() > 1:
        _fail("a job of several processes needs --workdir, the same shared folder in each.")
    if FLAGS.workdir is not None and not FLAGS.workdir.strip():
        _fail("--workdir is empty: give a folder, or leave the flag out for runs/NAME-TIME.")
    workdir = FLAGS.workdir or os.path.join(
        "runs", f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    )
    from kdjax.workdir import plain_config

    try:
        distributed.check_same_job(config=plain_config(config), workdir=os.path.abspath(workdir))
    except KdjaxError as err:
        _fail(str(err))
    try:
        with stop_on_signals():
            results = get_runner(config)(config, workdir, overwrite=FLAGS.overwrite)
    except Interrupted as err:
        if FLAGS.workdir is None:  # the same command would pick a new, empty work directory
            err = f"{err} Add --workdir={workdir} to it: without it a new run starts."
        _fail(str(err), code=3)
    except NonFiniteError as err:
        _fail(str(err), code=4)
    except KdjaxError as err:
        _fail(str(err))
    if not distributed.is_primary():
        return  # the primary process prints the results
    with open(os.path.join(workdir, "results.md")) as f:
        print(f.read())
    print(f"Results, checkpoints and metrics are in {workdir}/ ({results['wall_time_s']:.0f} s).")


def main() -> None:
    _check_config_path(sys.argv)
    try:
        _define_flags()
    except _PARSE_ERRORS as err:
        _fail(f"{_parse_error_message(err, sys.argv)} (see kdjax --help)")
    # Progress lines go to stderr; --verbosity=-1 silences them.
    FLAGS.set_default("logtostderr", True)
    app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
    main()
