"""Training data: the on-disk code store (format.py) and the loaders built on it."""
