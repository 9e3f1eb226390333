"""``pagetrack export nats``: every record of a tenant's VMs into NATS JetStream, once.

A client of the public Watch API: for each VM it reads from JetStream how far the export
got, Watches from the next seq and publishes events, gaps and region records to
``<prefix>.<tenant>.<vm>.{events,gaps,regions}``. See docs/export.md.
"""

from pagetrack.export.config import ExportConfig, StreamConfig, load_config
from pagetrack.export.exporter import Exporter
from pagetrack.export.metrics import ExportMetrics
from pagetrack.export.subjects import Position, subject

__all__ = [
    "ExportConfig", "ExportMetrics", "Exporter", "Position", "StreamConfig", "load_config",
    "subject",
]
