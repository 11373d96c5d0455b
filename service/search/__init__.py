"""Search over past generations: the FAISS vector index kept caught up from SQL."""
