"""Kubernetes manifests derived from queues.yaml (``fleet render k8s|keda``)."""
