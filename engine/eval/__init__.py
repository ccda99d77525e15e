"""Evaluation: RAP's metrics (captioning, QA, recognition) and the runners that produce them."""
