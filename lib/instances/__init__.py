"""Instance labels from predicted maps (seeded watershed), their measurements, filter rules, and
the classical baseline."""
