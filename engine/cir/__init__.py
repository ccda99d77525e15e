"""Composed image retrieval (CIR): the CIR-LVLM encoder and its contrastive training."""
