"""Linear and attention-MIL heads trained on stored embeddings, and their registry (issue 5)."""
