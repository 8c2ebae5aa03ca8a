"""Video and text encoders, the contrastive loss, training and inference (issue 3)."""
