"""What the ``kdjax`` command runs for a config: ``config.runner`` names it (default
``pipeline``, the teacher -> scratch -> distilled job; ``hinton2015``, that paper's section 3;
``zoo``, a table of distillers side by side).

A runner takes ``(config, workdir, *, overwrite)``, checks everything before any work, writes
``results.json`` and ``results.md`` into ``workdir`` and returns the results.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from kdjax.registry import Registry

Runner = Callable[..., dict[str, Any]]
RUNNERS: Registry[Runner] = Registry("runner")


def get_runner(config: Mapping[str, Any]) -> Runner:
    # Imported here so that registering costs nothing until a run starts.
    from kdjax import pipeline, zoo
    from kdjax.papers import hinton2015

    if "pipeline" not in RUNNERS:
        RUNNERS.register("pipeline")(pipeline.run)
        RUNNERS.register("hinton2015")(hinton2015.reproduce)
        RUNNERS.register("zoo")(zoo.reproduce)
    return RUNNERS.get(config.get("runner", "pipeline"), field="runner")
