"""
The model's side of a request: jobs, the worker that owns the model thread, the
scheduler that steps every running job, and the metrics that watch them.

Covered by tests/unit/test_exports.py.
"""
