"""Scores: confusion matrices, the one instance-matching implementation, and the tables written
from them."""
