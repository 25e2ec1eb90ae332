"""Throughput / memory / overhead measurements. Run each as `python -m benchmarks.NAME`;
every benchmark writes reports/benchmarks/NAME.json and prints one JSON object as its last line."""
