"""The shared machinery: the sharpness-aware mechanism, the loss_fn contract, numerics."""
