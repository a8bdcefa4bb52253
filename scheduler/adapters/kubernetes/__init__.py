"""Kubernetes adapters: InferencePool discovery, SchedulingPolicy hot reload, InferenceObjectives."""
