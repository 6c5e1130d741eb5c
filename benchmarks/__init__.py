"""Side-by-side comparisons of lossland with the libraries researchers would use instead.

Run from the repository root, in an environment with lossland and the pinned
peers (`benchmarks/requirements.txt`; they are never lossland's dependencies):

    pip install -e . -r benchmarks/requirements.txt
    python -m benchmarks.cka_vs_numpy        # CKA matrices vs NumPy and the bare products
    python -m benchmarks.kfac_vs_peers       # K-FAC factors vs kfac-jax and curvlinops
    python -m benchmarks.sd_vs_diffusers     # SD sampling (plain, Attend-and-Excite) vs diffusers
    python -m benchmarks.shakespeare_vs_torch  # the Shakespeare run vs the PyTorch baseline
    python -m benchmarks.cpu_devices         # the launchers' jobs at 1 and N emulated CPU devices

Each prints the contenders' min and median over alternated rounds, lossland's
ratio to each peer, and the machine (`side_by_side.machine()`). Results and
profiles: docs/results/peers.md.
"""
