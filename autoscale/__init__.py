"""The autoscaler: queue metrics, a scaling policy, local and Kubernetes backends (next issue)."""
