"""Alembic migrations of the accountant's database, shipped inside the package and run at start-up."""
