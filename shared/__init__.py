"""What the API, the worker and direct publishers must agree on."""
