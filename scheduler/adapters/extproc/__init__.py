"""Envoy ext_proc Endpoint Picker (GIE protocol) and kvsched's own gRPC API around the Scheduler."""

from scheduler.adapters.extproc.config import ExtProcConfig
from scheduler.adapters.extproc.server import ExtProcServer
from scheduler.adapters.extproc.tls import TLSSettings

__all__ = ["ExtProcConfig", "ExtProcServer", "TLSSettings"]
