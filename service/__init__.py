"""genserve: the API, the database, search and the CLI. Never imports torch at import time."""
