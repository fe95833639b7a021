"""The vipo training engine: configuration, CLI and (as they land) models, objectives,
reference strategies and the train loop."""
