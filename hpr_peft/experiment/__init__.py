"""The application layer: the cross-validated TruthfulQA job and its plots."""
