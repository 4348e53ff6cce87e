"""Shared plumbing every part of hpr_peft may use: decoder-block discovery, per-call token positions,
the one hook mechanism, the one model-I/O helper, progress bars, atomic file writes and the loaders
of the bundled offline models. Nothing here imports another part of hpr_peft."""
