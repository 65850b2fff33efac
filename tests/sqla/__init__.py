"""The SQLAlchemy-suite harness (see plugin.py): not part of the project's own tests."""
