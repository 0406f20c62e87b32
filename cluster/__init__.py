"""The Ray cluster side: loopback multi-node clusters, job submission, manifests (issue 7)."""
