"""Concept stores: a protocol and its implementations (FAISS for local mode)."""
