"""Package data: presets and the shipped sample rows."""
