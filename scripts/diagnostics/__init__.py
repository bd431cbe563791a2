"""One-off studies the README cites (clip sweep, BiSup and low-rank diagnostics, KV scale dtype)."""
