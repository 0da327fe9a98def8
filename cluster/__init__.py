"""Cluster configs and job submission (Ray cluster launcher, KubeRay); filled by the cluster issue."""
