"""The score-ingest benchmark: `make bench`, or `python -m bench.run`; see BENCHMARKS.md."""
