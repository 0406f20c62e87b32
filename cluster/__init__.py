"""The Ray cluster side: a loopback multi-node cluster with an MLflow server (`local`), sweeps
as Ray jobs (`jobs`), and manifests for real clusters (`manifests/`: KubeRay, the AWS cluster
launcher, the container image)."""
