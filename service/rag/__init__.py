"""Retrieval-augmented generation: collections of documents, their chunks, and grounded answers."""
