"""The Flax GLUE fine-tuning example for optax-sam."""
