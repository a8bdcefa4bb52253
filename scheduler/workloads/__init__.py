"""Workloads for load tests: production traces (Mooncake) and seeded generators."""

from scheduler.workloads.model import Workload, WorkloadRequest

__all__ = ["Workload", "WorkloadRequest"]
