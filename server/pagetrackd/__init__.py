"""pagetrackd: Linux KVM's x86 page-track facility as a daemon."""

__version__ = "0.1.0"

__all__ = ["__version__"]
