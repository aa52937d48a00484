"""The training-throughput benchmark (bench/train_throughput.py is its entry point): common helpers, model
folders, data, a FLOP model, per-arm runners and the report."""
