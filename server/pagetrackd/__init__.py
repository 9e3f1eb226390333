"""pagetrackd: Linux KVM's x86 page-track facility as a daemon."""

__all__: list[str] = []
