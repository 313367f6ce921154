"""The benchmark scripts' library: models, systems, timing, profiling, predictions and reports
(the module map is in `benchmarks/__init__.py`)."""
