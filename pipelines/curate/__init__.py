"""Data curation before pretraining (`selfsup curate`): duplicates removed and concepts balanced
over the embeddings of a checkpoint's encoder (docs/ARCHITECTURE.md, "Curation")."""
