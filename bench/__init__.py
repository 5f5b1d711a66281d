"""The comfywatch benchmark: run with ``python -m bench`` (see the README, "Benchmark")."""
