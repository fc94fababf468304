"""normswap: rewrite the normalisation of trained PyTorch models."""
