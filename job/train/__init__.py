"""The model and training stage: load and quantize the base, attach peft, train with trl, checkpoints, SIGTERM."""
