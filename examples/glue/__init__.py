"""The Flax GLUE fine-tuning example for optax-sam."""

import os

# transformers serves only tokenizers and configs here (the encoder is ours), so its
# import-time advice that PyTorch models are unavailable is noise on every run. This is
# transformers' own switch for advisory warnings; real warnings still print, and a value
# the user set wins.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
