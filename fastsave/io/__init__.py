"""Writing a checkpoint's files: weights, the non-weight files, the model card."""
