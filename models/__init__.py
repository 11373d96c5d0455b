"""Model layer of genserve: the model registry and the loaders and runtimes behind it.

Importing this package is cheap; torch and transformers are imported only by the backend
modules, which `models.backends.load_model` imports on demand.
"""
