"""Where replicas live: worker processes on this machine, or Kubernetes Deployments."""
