"""Adversarial suite (issue 6): every case asserts the status and exactly what the upstream received."""
