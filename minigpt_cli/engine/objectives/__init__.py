"""Layer 5: the training objectives: the losses' tensor maths and the log-probs they read."""
