"""Training engines, one module each; they register in the ``kerasonspark.backends`` entry points."""
