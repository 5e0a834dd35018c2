"""The `fbhook` command-line tool: run the services, simulate traffic, inspect Redis."""
