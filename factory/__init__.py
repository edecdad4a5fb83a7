"""factory: a domain-specialized synthetic data factory with validation."""
__version__ = "0.1.0"
