"""Speed, memory and training-quality measurements of lookahead-dist (results in ``benchmarks/RESULTS.md``).

Each script is a module run from the repository root, ``python -m benchmarks.<script> --help``; what the
scripts share is in :mod:`benchmarks.common`.
"""
