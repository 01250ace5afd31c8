"""HTTP handlers of the gateway: the API (api.py), the console (console.py), authentication, errors, health."""
