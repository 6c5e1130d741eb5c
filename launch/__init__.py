"""Thin entry points: `python -m launch.train|analyze|bench --config=FILE[:ARG] ...`."""
