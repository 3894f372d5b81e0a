"""The benchmarks: ``python -m benchmarks`` runs the suite (benchmarks/run.py); each other file runs alone."""
