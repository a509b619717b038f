"""Custom operators: one PyTorch operator each, with its own forward and
backward and a PyTorch fallback (see :mod:`.depthwise_conv`)."""
