"""Configs for `python -m launch.compile`: pod-sized programs compiled without TPUs."""
