"""petal as a Flower app: clients train an adapter locally with `petal train`, the server
aggregates only the adapter's tensors (PEFT names, as NumPy arrays) with Flower's strategies."""
