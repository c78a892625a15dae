"""Examples of fine-tuning with optax-sam."""
