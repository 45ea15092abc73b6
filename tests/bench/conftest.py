"""tests/bench holds hand-run benchmark scripts, not tests: pytest must not import them."""

collect_ignore_glob = ["*.py"]
