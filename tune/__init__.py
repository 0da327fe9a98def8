"""Hyperparameter search with Ray Tune over full pretraining runs: `space` parses the search
space, `search` runs it (ASHA on per-epoch reports, ranked by a downstream metric) and writes
the results."""
