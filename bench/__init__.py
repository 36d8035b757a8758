"""The benchmark suite of issue #5: `make bench` runs `python -m bench.run`."""
