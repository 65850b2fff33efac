"""tests/sqla holds the harness that runs SQLAlchemy's own suite (scripts/sqla_suite.sh), not
tests of this project: keep the project's `pytest tests` from collecting anything here."""

collect_ignore_glob = ["*"]
