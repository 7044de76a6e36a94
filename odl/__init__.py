"""ODL shared contracts: config, schemas, names, control plane, launcher and CLI."""
__version__ = "0.1.0"
