"""Method benchmarks run by `launch.bench`: each module has `run(config) -> dict`.

A config selects one with `config.bench = '<module name>'`; without it,
`launch.bench` times the config's training step.
"""
