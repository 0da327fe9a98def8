"""Hyperparameter search with Ray Tune over pretraining runs; filled by the Tune issue."""
