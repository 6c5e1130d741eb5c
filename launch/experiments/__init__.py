"""Analysis experiments run by `launch.analyze`: each module has `run(config, workdir) -> dict`.

A config selects one with `config.experiment = '<module name>'`.
"""
