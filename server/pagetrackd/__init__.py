"""pagetrackd: Linux KVM's x86 page-track facility as a daemon."""

from importlib.metadata import PackageNotFoundError, version

try:
    #: the one version of the project: pyproject.toml's, as installed
    __version__ = version("pagetrack")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
