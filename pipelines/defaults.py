"""Defaults of the quick start and the speed benchmark, defined once for the functions and for the
command line (kept free of torch so ``maxa --help`` does not load it)."""

#: The quick start: a tiny random-init backbone, a few epochs per task.
QUICKSTART_BACKBONE = "test_vit"
QUICKSTART_MAX_EPOCHS = 8

#: The speed benchmark (the paper's Table 1 protocol): reference backbone, timed batches, images per batch.
SPEED_REFERENCE = "imagenet_b16"
SPEED_BATCHES = 10
SPEED_BATCH_SIZE = 8
