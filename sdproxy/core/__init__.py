"""Pure logic (sans-IO): admission, routing, request costing, autoscaling policy.

Nothing here performs I/O, reads a clock or draws randomness; time and randomness come in
as arguments. The import rule is enforced by import-linter (see pyproject.toml).
"""
