"""Layer 1: what this machine is and can do: device, precision, measured speeds, live usage."""
