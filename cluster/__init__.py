"""Cluster configs (Ray cluster launcher for AWS and GCP, KubeRay RayCluster and RayJob), the
job runtime env, and `python -m cluster.checks`, which validates them offline. See README.md here."""
