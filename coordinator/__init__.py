"""sixgate control plane: config, CLI, capture and fan-out, supervision of the workers."""
