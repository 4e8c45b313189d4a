"""Platform contracts (SageMaker)."""
