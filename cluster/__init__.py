"""Cluster configs (Ray cluster launcher for AWS and GCP, KubeRay RayCluster and RayJob), the
job runtime env, `python -m cluster.checks`, which validates them offline, a simulated cluster
(`simulate.py`), hosts on one machine (`local_hosts.py`) with a real Ray cluster on them started
by a config's own commands (`local_cluster.py`), and what a run that lost workers must still show
(`recovery.py`). See README.md here."""
