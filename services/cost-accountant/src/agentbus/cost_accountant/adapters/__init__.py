"""Adapters of the cost-accountant: the SQL store and its schema."""
