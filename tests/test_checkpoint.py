"""Model checkpoints: written with orbax, read back exactly, from absolute or relative paths."""

import jax
import numpy as np

from kdjax import checkpoint
from kdjax.models import build_model, init_variables


def test_checkpoint_roundtrip_from_a_relative_path(tmp_path, monkeypatch):
    model = build_model({"name": "mlp", "hidden_sizes": (8,)}, num_classes=3, field="m")
    images = np.zeros((1, 4, 4, 1), np.float32)
    variables = init_variables(model, jax.random.key(0), images)
    checkpoint.save_model(str(tmp_path / "run" / "teacher"), variables, {"stage": "teacher"})
    # A work directory given as runs/NAME is relative; orbax itself only takes absolute paths.
    monkeypatch.chdir(tmp_path)
    abstract = jax.eval_shape(lambda: init_variables(model, jax.random.key(1), images))
    restored = checkpoint.restore_variables("run/teacher", abstract)
    for a, b in zip(
        jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(restored), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert checkpoint.read_metadata("run/teacher") == {"stage": "teacher"}
