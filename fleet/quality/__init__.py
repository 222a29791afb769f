"""Model quality in the field: ground truth, live accuracy, label-free estimates, cost."""
