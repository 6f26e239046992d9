"""Configs that ship inside the package (the bare ``kdjax`` command's default)."""
