"""``python -m benchmarks``: the benchmark suite, benchmarks/run.py."""
from benchmarks.run import main

main()
