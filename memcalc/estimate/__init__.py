"""Pure estimators: validated configs in, integer bytes out. No printing, no unit formatting."""
