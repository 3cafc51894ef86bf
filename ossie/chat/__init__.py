"""The harmony chat format: rendering and parsing (harmony), and steering the model into what a request
demands (constraints)."""
