"""The co-training MONAI Label app's library: task configs, trainer, infer, scoring, strategy."""
