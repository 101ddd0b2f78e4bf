"""provision: from powered-off bare-metal racks to Slurm and k0s nodes."""

__version__ = "0.1.0"
