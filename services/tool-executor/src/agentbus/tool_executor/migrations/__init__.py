"""Alembic migrations of the executor's database, shipped inside the package and run at start-up."""
