"""Evaluation: sampling, samplers, held-out accuracy, reward-model scoring, reports and plots,
the demo and data statistics. Uses the rest of the engine and the loaders; nothing in the engine
imports it (the CLI loads its commands by name)."""
