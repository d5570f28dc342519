"""Training and evaluation of the auxiliary model (the backbone is never trained here)."""
