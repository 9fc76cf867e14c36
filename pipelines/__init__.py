"""Prefect flows over the bertscale library: one per stage, and one that chains them all."""
