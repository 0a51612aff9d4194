"""autofit's benchmarks: each module exposes `main(quick: bool) -> dict` and writes benchmarks/results/<name>.json.

`python -m benchmarks.run --quick` runs them all and prints the README summary table.
"""
