"""Cluster configs (Ray cluster launcher for AWS and GCP, KubeRay RayCluster and RayJob), the
job runtime env, `python -m cluster.checks`, which validates them offline, a simulated cluster
(`simulate.py`), hosts on one machine for a real one (`local_hosts.py`) and what a run that lost
workers must still show (`recovery.py`). See README.md here."""
