"""Training engines, one module each; they register in the ``kerasonspark.backends`` entry
points."""

__all__: list[str] = []
