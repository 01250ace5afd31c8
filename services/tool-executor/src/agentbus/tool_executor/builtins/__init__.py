"""Built-in python tools, named by `python.callable` in tool files."""
